"""The toy world: seeded scenes, correct masks, captions that tell the truth, and the tokenizer that reads them."""
from __future__ import annotations

import numpy as np
import pytest

from capture.toyworld import world


@pytest.fixture(scope="module")
def batch():
    return world.make_batch(np.random.default_rng(7), 300)


def test_same_seed_same_world():
    a = world.make_batch(np.random.default_rng(3), 50)
    b = world.make_batch(np.random.default_rng(3), 50)
    c = world.make_batch(np.random.default_rng(4), 50)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    assert a.captions == b.captions and np.array_equal(a.roles, b.roles)
    assert not np.array_equal(a.images, c.images)


def test_masks_paint_exactly_the_image(batch):
    palette = {name: np.array(rgb, dtype=np.uint8) for name, rgb in world.COLOURS.items()}
    covered = batch.masks.any(axis=1)
    # Masks never overlap, and everything outside them is background.
    assert (batch.masks.sum(axis=1) <= 1).all()
    assert (batch.images[~covered] == np.array(world.BACKGROUND, dtype=np.uint8)).all()
    for i in range(len(batch.scenes)):
        k = int(batch.scenes.count[i])
        assert not batch.masks[i, k:].any()
        colours = [world.COLOUR_NAMES[c] for c in batch.scenes.colour[i, :k]]
        assert len(set(colours)) == k  # distinct colours per scene
        for slot, name in enumerate(colours):
            m = batch.masks[i, slot]
            assert m.sum() >= 20
            assert (batch.images[i][m] == palette[name]).all()
            ys, xs = np.nonzero(m)
            s, x0, y0 = (int(v[i, slot]) for v in (batch.scenes.size, batch.scenes.x0, batch.scenes.y0))
            assert ys.min() >= y0 and ys.max() < y0 + s and xs.min() >= x0 and xs.max() < x0 + s
            assert 1 <= x0 and x0 + s <= world.IMAGE_SIZE - 1 and 1 <= y0 and y0 + s <= world.IMAGE_SIZE - 1


def test_shapes_have_their_area_and_classify_back(batch):
    expected = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
    for i in range(len(batch.scenes)):
        for slot in range(int(batch.scenes.count[i])):
            shape = world.SHAPES[batch.scenes.shape[i, slot]]
            s = int(batch.scenes.size[i, slot])
            fill = batch.masks[i, slot].sum() / (s * s)
            assert abs(fill - expected[shape]) < 0.13, (shape, s, fill)
            assert world.classify_shape(batch.masks[i, slot]) == shape


def test_segment_recovers_every_mask(batch):
    for i in range(60):
        seg = world.segment(batch.images[i])
        k = int(batch.scenes.count[i])
        assert len(seg) == k
        for slot in range(k):
            assert np.array_equal(seg[world.COLOUR_NAMES[batch.scenes.colour[i, slot]]], batch.masks[i, slot])


def test_segment_tolerates_noise_and_ignores_specks():
    b = world.make_batch(np.random.default_rng(11), 1, counts=(0, 1, 0))
    rng = np.random.default_rng(0)
    noisy = np.clip(b.images[0].astype(int) + rng.integers(-40, 41, size=b.images[0].shape), 0, 255).astype(np.uint8)
    seg = world.segment(noisy)
    for slot in range(2):
        assert np.array_equal(seg[world.COLOUR_NAMES[b.scenes.colour[0, slot]]], b.masks[0, slot])
    speck = np.full((32, 32, 3), 255, dtype=np.uint8)
    speck[3:5, 3:5] = (255, 0, 0)                      # 4 red pixels: too small to be an object
    assert world.segment(speck) == {}


def test_captions_tell_the_truth(batch):
    sides = world.true_sides(batch.scenes)
    for i, words in enumerate(batch.words):
        assert 1 <= len(words) <= world.MAX_WORDS
        assert batch.captions[i] == " ".join(words)
        k = int(batch.scenes.count[i])
        assert words.count("and") == k - 1
        for slot in range(k):
            colour_at, shape_at, size_at, side_at = batch.roles[i, slot]
            assert words[colour_at] == world.COLOUR_NAMES[batch.scenes.colour[i, slot]]
            assert words[shape_at] == world.SHAPES[batch.scenes.shape[i, slot]] and shape_at == colour_at + 1
            if size_at >= 0:
                s = batch.scenes.size[i, slot]
                assert words[size_at] == ("small" if s <= world.SMALL_MAX else "big")
                assert s <= world.SMALL_MAX or s >= world.BIG_MIN
            if side_at >= 0:
                assert sides[i, slot, world.SIDES.index(words[side_at])]
                assert words[side_at - 2:side_at] == ["on", "the"]
        assert not (batch.roles[i, k:] >= 0).any()
    # Word order varies: objects appear in both orders over a batch.
    firsts = {tuple(batch.roles[i, :2, 0] < 0) for i in range(len(batch.words)) if batch.scenes.count[i] == 2}
    orders = {bool(batch.roles[i, 0, 0] < batch.roles[i, 1, 0]) for i in range(len(batch.words)) if batch.scenes.count[i] == 2}
    assert orders == {True, False} and firsts == {(False, False)}


def test_tokenizer_covers_the_grammar_one_token_per_word(batch):
    from capture.toyworld.architecture import DEFAULT_WORDS, build_tokenizer
    from capture.toyworld.train import token_table

    tok = build_tokenizer()
    used = {w for words in batch.words for w in words}
    assert used <= set(DEFAULT_WORDS)
    ids, bos, eos, length = token_table(tok)
    assert len(set(ids.values())) == len(DEFAULT_WORDS)
    # The training encoder gives exactly what the pipeline's tokenizer gives.
    mine = world.encode_words(batch.words[:40] + [[]], ids, bos, eos, length)
    theirs = tok(batch.captions[:40] + [""], padding="max_length", max_length=length, truncation=True)["input_ids"]
    assert mine.tolist() == theirs


def test_two_object_prompts_are_fixed_and_varied():
    a = world.two_object_prompts(40, seed=0)
    assert a == world.two_object_prompts(40, seed=0)
    assert len({p["prompt"] for p in a[:36]}) == 36          # every pairing once before repeating
    for p in a:
        (c1, s1), (c2, s2) = p["objects"]
        assert c1 != c2 and s1 != s2
        assert p["prompt"] == f"a {c1} {s1} and a {c2} {s2}"
