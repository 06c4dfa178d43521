"""How faithful are a toy model's cross-attention maps? ``diffviz eval-attention``.

For two-object prompts ("a red circle and a blue square") the model generates an image from seed
``seed + i`` while every cross-attention layer is recorded at every step: head-averaged maps of the
conditional half of the CFG batch, the maps a ``diffviz generate`` run stores. Every third prompt gives
both objects the same shape ("a green square and a red square"), so that only the colour word tells
the two apart. For the UNet model a whole batch of prompts runs at once through ``probe`` (fast);
``--recorder`` goes through ``capture.recorder`` one prompt at a time (a test checks both give the
same maps), and that is the only way for other families (the toy MM-DiT, ``--model toyworld-mmdit``).
The prompts are held out only in the sense that their images are new: the world is small, and every
colour/shape pairing also occurs in training captions.

The toy world's colours are pure, so segmenting the *generated* image by colour (``world.segment``)
gives each object's mask, and the prompt says which colour and shape word belongs to which object.
Each word's map (the sum of its token rows, found through the family's token list and the recorder's
``key_positions``) is scored with ``analysis.scoring``: pointing, IoU at τ = 0.4 and own vs other.
A colour word's own mask is its object and the other mask the other object (also when both have the
same shape). A shape word owns its object's mask; when both objects share its shape it owns both
masks (their union), has no other object, and gets pointing and IoU but no own-vs-other score.

The map of a word is aggregated DAAM-style: every layer's map at every step upsampled in one bilinear
step straight to the image size, then summed over layers and steps. The same scores are given per
layer (summed over steps) and per step bucket (early / middle / late thirds, summed over layers), for
the raw cross maps and, when capture records them (``--concept-maps``), the concept maps.
**Adherence** is the fraction of images whose two objects both came out with the prompt's colour and
shape, and nothing else coloured (no other colour, no second blob of a named one).

``ground_truth`` in the report (UNet models) scores the same maps against *true* masks: world images
noised to a few timesteps and passed once through the UNet with their caption. It does not depend on
what the model generates, so it also scores the random-weight control, whose generations contain no
readable objects.

The JSON report's top level holds the colour-word figures ``pointing``, ``miou``, ``own_vs_other``,
plus ``adherence`` and ``shape_pointing``; everything else is detail. With several models
(``--model A --model B``, ``--compare``) the table puts them side by side and the report holds
``{"models": {label: report}}``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from analysis import scoring
from analysis.scoring import TAU, TOKEN_KINDS, score_view, token_scores  # noqa: F401 - the eval's scoring API

from . import world

BUCKETS = ("early", "middle", "late")
#: 64 prompts with two shapes and 32 with one shared shape.
DEFAULT_PROMPTS = 96
#: Every this-many-th prompt gives both objects the same shape.
SAME_SHAPE_EVERY = 3
DEFAULT_STEPS = 30
DEFAULT_SEED = 0
#: Same default as ``diffviz generate`` (capture.config.GenerateConfig.cfg_scale).
DEFAULT_CFG = 7.5
#: Model names ``--model`` knows besides folders: the shipped toy models.
MODEL_DIRS = {"toyworld": Path(__file__).resolve().parent / "model",
              "toyworld-mmdit": Path(__file__).resolve().parent / "model_mmdit"}
SOURCES = ("cross", "concept")


# --- prompts ----------------------------------------------------------------------------------

def held_out_prompts(n: int, seed: int = 0, same_shape_every: int = SAME_SHAPE_EVERY) -> list[dict]:
    """``n`` two-object prompts "a C1 S1 and a C2 S2" (two different colours), every ``same_shape_every``-th
    with S1 == S2; each kind cycles through all its pairings in both orders, shuffled by ``seed``.

    Each entry is ``{"prompt", "objects": [(colour, shape)] * 2, "words": [(colour word, shape word)
    indices per object], "same_shape"}``.
    """
    distinct, same = [], []
    for c1 in world.COLOUR_NAMES:
        for s1 in world.SHAPES:
            for c2 in world.COLOUR_NAMES:
                for s2 in world.SHAPES:
                    if c1 != c2:
                        (same if s1 == s2 else distinct).append(((c1, s1), (c2, s2)))
    rng = np.random.default_rng([seed, 16])
    pools = {False: [distinct[i] for i in rng.permutation(len(distinct))],
             True: [same[i] for i in rng.permutation(len(same))]}
    used = {False: 0, True: 0}
    out = []
    for j in range(n):
        kind = bool(same_shape_every) and j % same_shape_every == same_shape_every - 1
        a, b = pools[kind][used[kind] % len(pools[kind])]
        used[kind] += 1
        out.append({"prompt": f"a {a[0]} {a[1]} and a {b[0]} {b[1]}", "objects": [a, b],
                    "words": [(1, 2), (5, 6)], "same_shape": a[1] == b[1]})
    return out


def word_rows(family, tokenizers: dict, prompt: str, key_positions) -> list[list[int]]:
    """Per word of ``prompt`` (split on spaces), the rows of the recorded stack that hold its tokens:
    the family's tokens of that word (every token set), through ``key_positions`` (row -> position)."""
    info = family.tokens(tokenizers, prompt)
    words = prompt.split()
    if len(info.words) != len(words):
        raise ValueError(f"the tokenizer splits {prompt!r} into words {info.words}, not {words}")
    row_of = {int(p): r for r, p in enumerate(key_positions)}
    rows: list[list[int]] = [[] for _ in words]
    for t in info.tokens:
        if t.get("word") is not None and int(t["index"]) in row_of:
            rows[int(t["word"])].append(row_of[int(t["index"])])
    return rows


def object_words(rows: list[list[int]], positions, masks, same_shape: bool) -> list[dict]:
    """The scorable words of a two-object prompt: each object's colour and shape word with its masks."""
    out = []
    for o, (ci, si) in enumerate(positions):
        own, other = masks[o], masks[1 - o]
        out.append(scoring.word("colour", rows[ci], own, other))
        # A shape both objects share names both: its word owns the union and has no other object.
        out.append(scoring.word("shape", rows[si], own | other, None) if same_shape
                   else scoring.word("shape", rows[si], own, other))
    return out


def judge_image(image: np.ndarray, objects: list[tuple[str, str]]) -> dict:
    """Segment a generated image and compare it with the prompt's objects."""
    regions = world.colour_regions(image)
    seg = {name: r[0] for name, r in regions.items()}
    found = [seg.get(c) for c, _ in objects]
    colours_ok = all(m is not None for m in found)
    shapes = [world.classify_shape(m) if m is not None else None for m in found]
    shapes_ok = [s == want for s, (_, want) in zip(shapes, objects)]
    # Anything else coloured: a colour the prompt does not name, or a second blob of one it does.
    wanted = {c for c, _ in objects}
    extra = sorted({name for name, r in regions.items() if name not in wanted or len(r) > 1})
    return {"segments": seg, "found": found, "colours_ok": colours_ok, "shapes": shapes,
            "shapes_ok": shapes_ok, "extra": extra,
            "adherent": colours_ok and all(shapes_ok) and not extra}


# --- recording --------------------------------------------------------------------------------

def bucket_of(step: int, steps: int) -> int:
    return min(len(BUCKETS) - 1, step * len(BUCKETS) // steps)


def _family(pipe):
    from capture import families
    return families.for_pipeline(pipe)


def _concept_kwargs(concept: bool) -> dict | None:
    """``record_attention``'s keyword that turns concept maps on (None when capture has none)."""
    if not concept:
        return {}
    from capture.recorder import record_attention
    return {"concept": True} if "concept" in inspect.signature(record_attention).parameters else None


def record_prompt(pipe, prompt: str, *, seed: int, steps: int, cfg: float, concept: bool = False) -> dict:
    """Generate one image with ``capture.recorder`` on every layer (cross maps only, and concept maps).

    Returns ``{"image": uint8 [H, W, 3], "names", "cross": per layer float32 [3, T, h, w] (the maps
    summed per step bucket, at the layer's grid), "concept": the same or None, "key_positions"}``.
    """
    import torch
    from capture.recorder import record_attention

    extra = _concept_kwargs(concept)
    if extra is None:
        raise ValueError("capture does not record concept maps yet (record_attention has no concept flag)")
    nb = len(BUCKETS)
    family = _family(pipe)
    # the family's own call arguments (SD3: T5's sequence length), as ``diffviz generate`` passes them
    kwargs = family.pipeline_kwargs(SimpleNamespace(negative_prompt=None, cfg_scale=cfg), family.peek_pipe(pipe))
    # prompt=: joint families then store the prompt's token rows only (rec.key_positions says where they sit)
    with torch.no_grad(), record_attention(pipe, self_=False, resolution=64, prompt=prompt, **extra) as rec:
        out = pipe(prompt, num_inference_steps=steps, output_type="np", **kwargs,
                   generator=torch.Generator("cpu").manual_seed(seed),
                   callback_on_step_end=rec.callback_on_step_end)
    if not rec.layers:
        raise RuntimeError(f"no layer was recorded for {prompt!r}: {'; '.join(rec.warnings) or 'see the warnings'}")
    names = [plan.name for plan in rec.layers]
    sums = {src: [None] * len(names) for src in SOURCES}
    for s, maps in enumerate(rec.steps):
        b = bucket_of(s, steps)
        for src in SOURCES:
            got = getattr(maps, src, None) or {}
            for li in got:
                m = np.asarray(got[li], np.float32)
                if sums[src][li] is None:
                    sums[src][li] = np.zeros((nb,) + m.shape, np.float32)
                sums[src][li][b] += m
    concept_maps = sums["concept"] if any(x is not None for x in sums["concept"]) else None
    if concept_maps is not None and any(x is None for x in concept_maps):
        raise ValueError("concept maps were recorded for some layers only")
    image = (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)
    return {"image": image, "names": names, "cross": sums["cross"], "concept": concept_maps,
            "key_positions": list(getattr(rec, "key_positions", range(rec.context_length)))}


def record_batch(pipe, prompts: list[str], *, seeds: list[int], steps: int, cfg: float) -> list[dict]:
    """The same as ``record_prompt`` (one dict per prompt) for a whole batch at once, through ``probe``
    (UNet pipelines only; for training on a GPU). ``tests/test_toyworld_eval.py`` checks both agree."""
    import torch
    from . import probe

    nb = len(BUCKETS)
    store = probe.ProbeStore()
    original = dict(pipe.unet.attn_processors)
    names = probe.install(pipe.unet, store)
    k = pipe.tokenizer.model_max_length
    state = {"step": 0, "sums": None}
    n = len(prompts)

    def hook(module, args, output):
        b = bucket_of(state["step"], steps)
        if state["sums"] is None:
            state["sums"] = [None] * len(names)
        for li, name in enumerate(names):
            m = store.maps[name][-n:]                               # conditional half [n, HW, K]
            g = int(round(math.sqrt(m.shape[1])))
            m = m.transpose(1, 2).reshape(n, k, g, g).float()
            if state["sums"][li] is None:
                state["sums"][li] = torch.zeros((n, nb, k, g, g), device=m.device)
            state["sums"][li][:, b] += m
        state["step"] += 1

    handle = pipe.unet.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = pipe(prompts, guidance_scale=cfg, num_inference_steps=steps, output_type="np",
                       generator=[torch.Generator("cpu").manual_seed(s) for s in seeds])
    finally:
        handle.remove()
        pipe.unet.set_attn_processor(original)
    images = (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)
    sums = [s.cpu().numpy() for s in state["sums"]]
    return [{"image": images[i], "names": list(names), "cross": [s[i] for s in sums], "concept": None,
             "key_positions": list(range(k))} for i in range(n)]


def views_of(layer_sums: list[np.ndarray], names: list[str], height: int, width: int) -> dict[str, np.ndarray]:
    """Every scored view ``[T, H, W]`` of one prompt from its per-layer bucket sums ``[3, T, h, w]``:
    each layer's map upsampled straight to the image, then summed (aggregate, per layer, per bucket)."""
    up = [[scoring.upsample(s[b], height, width) for b in range(len(BUCKETS))] for s in layer_sums]
    views = {"aggregate": sum(sum(u) for u in up)}
    for name, u in zip(names, up):
        views[f"layer:{name}"] = sum(u)
    for b, bucket in enumerate(BUCKETS):
        views[f"bucket:{bucket}"] = sum(u[b] for u in up)
    return views


# --- the ground-truth check: attention on the world's own images ---------------------------------

GT_TIMESTEPS = (800, 500, 200)


def evaluate_on_world(pipe, *, n_images: int = DEFAULT_PROMPTS, seed: int = DEFAULT_SEED,
                      timesteps: tuple[int, ...] = GT_TIMESTEPS, tau: float = TAU) -> dict:
    """Attention against *true* masks, independent of what the model would generate (UNet pipelines).

    Two-object world images are noised to each timestep and denoised by one UNet call with their
    caption (conditional only); every layer's cross map is upsampled straight to the image, summed
    over layers, and scored against the rendered masks. A model whose generations are unreadable
    (the random control) still gets scores here, near chance.
    """
    import torch
    from . import probe

    b = world.make_batch(np.random.default_rng([seed, 77]), n_images, counts=(0, 1, 0), p_size=0.0, p_side=0.0)
    device = next(pipe.unet.parameters()).device
    dtype = next(pipe.unet.parameters()).dtype
    k = pipe.tokenizer.model_max_length
    ids = torch.as_tensor(pipe.tokenizer(b.captions, padding="max_length", max_length=k,
                                         truncation=True)["input_ids"], device=device)
    family = _family(pipe)
    tokenizers = family.peek_pipe(pipe).tokenizers
    items = []
    for i in range(n_images):
        rows = word_rows(family, tokenizers, b.captions[i], range(k))
        positions = [(int(b.roles[i, o, 0]), int(b.roles[i, o, 1])) for o in range(2)]
        same = bool(b.scenes.shape[i, 0] == b.scenes.shape[i, 1])
        items.append({"index": i, "same_shape": same,
                      "words": object_words(rows, positions, [b.masks[i, 0], b.masks[i, 1]], same)})
    store = probe.ProbeStore()
    original = dict(pipe.unet.attn_processors)
    names = probe.install(pipe.unet, store)
    gen = torch.Generator("cpu").manual_seed(seed)
    size = b.images.shape[1:3]
    out = {}
    try:
        with torch.no_grad():
            x = torch.as_tensor(b.images, device=device).permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0
            lat = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
            ctx = pipe.text_encoder(ids)[0]
            total = None
            for t in timesteps:
                noise = torch.randn(lat.shape, generator=gen).to(device, dtype)
                tt = torch.full((n_images,), int(t), device=device, dtype=torch.long)
                store.clear()
                pipe.unet(pipe.scheduler.add_noise(lat, noise, tt), tt, ctx)
                layers = []
                for n in names:
                    m = store.maps[n].float()
                    g = int(round(math.sqrt(m.shape[1])))
                    layers.append(m.transpose(1, 2).reshape(n_images, -1, g, g).cpu().numpy())
                acc = scoring.daam(layers, *size)                     # [N, K, H, W]
                total = acc if total is None else total + acc
                out[str(t)] = score_view(acc, items, tau)
    finally:
        pipe.unet.set_attn_processor(original)
    same = [it for it in items if it["same_shape"]]
    return {"aggregate": score_view(total, items, tau), "per_timestep": out,
            "same_shape": score_view(total, same, tau), "n_same_shape": len(same),
            "n_images": n_images, "timesteps": list(timesteps),
            "method": "world images noised to each timestep, one conditional UNet call with their caption; "
                      "each layer upsampled straight to the image and summed, scored against the rendered masks"}


# --- the evaluation ---------------------------------------------------------------------------

def evaluate(pipe, *, n_prompts: int = DEFAULT_PROMPTS, seed: int = DEFAULT_SEED, cfg: float = DEFAULT_CFG,
             steps: int = DEFAULT_STEPS, batched: bool = True, batch_size: int = 64,
             tau: float = TAU, progress=None, prompts: list[dict] | None = None, concept: bool = False,
             ground_truth: bool = True) -> dict:
    """Generate, segment and score; returns the full report (see the module docstring).

    ``prompts`` (``held_out_prompts``' entries) replaces the default held-out set. ``batched`` applies to
    UNet pipelines without ``concept``; other families are recorded one prompt at a time.
    """
    prompts = held_out_prompts(n_prompts, seed=seed) if prompts is None else list(prompts)
    n = len(prompts)
    if n < 1:
        raise ValueError("evaluate: no prompts")
    unet = hasattr(pipe, "unet")
    batched = batched and unet and not concept
    family = _family(pipe)
    tokenizers = family.peek_pipe(pipe).tokenizers
    pipe.set_progress_bar_config(disable=True)

    def records():
        if batched:
            for start in range(0, n, batch_size):
                chunk = prompts[start:start + batch_size]
                yield from record_batch(pipe, [p["prompt"] for p in chunk],
                                        seeds=[seed + start + j for j in range(len(chunk))], steps=steps, cfg=cfg)
        else:
            for i, p in enumerate(prompts):
                yield record_prompt(pipe, p["prompt"], seed=seed + i, steps=steps, cfg=cfg, concept=concept)
                if progress:
                    progress(i + 1, n)

    t0 = time.time()
    scores: dict[str, list[dict]] = {}     # "<source>|<view>" -> every scored word (tagged same_shape)
    judged, names, size, has_concept = [], None, None, False
    for i, (p, rec) in enumerate(zip(prompts, records())):
        names = rec["names"]
        size = rec["image"].shape[:2]
        j = judge_image(rec["image"], p["objects"])
        judged.append(j)
        has_concept |= rec["concept"] is not None
        if not j["colours_ok"]:
            continue
        rows = word_rows(family, tokenizers, p["prompt"], rec["key_positions"])
        words = object_words(rows, p["words"], j["found"], p["same_shape"])
        for src in SOURCES:
            if rec[src] is None:
                continue
            for view, stack in views_of(rec[src], names, *size).items():
                for s in scoring.score_words(stack, words, tau):
                    scores.setdefault(f"{src}|{view}", []).append({**s, "same_shape": p["same_shape"]})
    gen_seconds = time.time() - t0

    def scored(src: str) -> dict:
        def view(name, only=None):
            got = [s for s in scores.get(f"{src}|{name}", []) if only is None or s["same_shape"] == only]
            return scoring.summarise(got)
        return {"aggregate": view("aggregate"),
                "per_layer": {name: view(f"layer:{name}") for name in names},
                "per_bucket": {b: view(f"bucket:{b}") for b in BUCKETS},
                "same_shape": view("aggregate", True), "distinct_shape": view("aggregate", False)}

    cross = scored("cross")
    truth = evaluate_on_world(pipe, n_images=n, seed=seed, tau=tau) if ground_truth and unet else None
    agg = cross["aggregate"]
    n_scored = sum(j["colours_ok"] for j in judged)
    scorable = [(p, j) for p, j in zip(prompts, judged) if j["colours_ok"]]
    areas = [m.sum() for _, j in scorable for m in j["found"]]
    both = [(j["found"][o].sum(), j["found"][1 - o].sum()) for _, j in scorable for o in range(2)]
    pixels = size[0] * size[1]
    report = {
        "adherence": sum(j["adherent"] for j in judged) / n,
        "pointing": agg["colour"]["pointing"] or 0.0,
        "miou": agg["colour"]["miou"] or 0.0,
        "own_vs_other": agg["colour"]["own_vs_other"] or 0.0,
        "shape_pointing": agg["shape"]["pointing"] or 0.0,
        "shape_miou": agg["shape"]["miou"] or 0.0,
        "shape_own_vs_other": agg["shape"]["own_vs_other"] or 0.0,
        "same_shape_pointing": cross["same_shape"]["colour"]["pointing"],
        "same_shape_own_vs_other": cross["same_shape"]["colour"]["own_vs_other"],
        "n_prompts": n,
        "n_same_shape_prompts": sum(p["same_shape"] for p in prompts),
        "n_scored_images": n_scored,
        "generation": {
            "colours_found": n_scored / n,
            "shapes_right": (sum(sum(j["shapes_ok"]) for _, j in scorable) / (2 * n_scored) if n_scored else 0.0),
            "extra_objects": sum(bool(j["extra"]) for j in judged) / n,
        },
        "chance": {
            "pointing_uniform": float(np.mean(areas) / pixels) if areas else None,
            "own_vs_other_uniform": float(np.mean([a / (a + b) for a, b in both])) if both else None,
        },
        "ground_truth": truth,
        "layers": list(names),
        "per_layer": cross["per_layer"],
        "per_bucket": cross["per_bucket"],
        "aggregate": agg,
        "same_shape": cross["same_shape"],
        "distinct_shape": cross["distinct_shape"],
        "concept": scored("concept") if has_concept else None,
        "method": {
            "tau": tau, "threshold": "map / max(map) >= tau", "aggregation":
            "each layer's head-mean map upsampled (bilinear, half-pixel centres) straight to the image in one "
            "step, summed over layers and steps",
            "buckets": "steps split in thirds: early, middle, late",
            "scored": "images where both prompted colours were segmented; the colour and shape words of both "
                      "objects (a word's map: the sum of its token rows)",
            "same_shape": "colour words: own object vs the other object of the same shape; the shared shape "
                          "word owns both masks (IoU and pointing against their union, no own-vs-other)",
            "adherence": "both objects with the prompt's colour and shape; no other colour, and no second blob "
                         "of a named colour (regions of at least world.MIN_OBJECT_PIXELS pixels)",
        },
        "config": {"seed": seed, "cfg": cfg, "steps": steps, "prompts": [p["prompt"] for p in prompts],
                   "generation_seconds": round(gen_seconds, 2), "family": family.name,
                   "recorder": "probe (batched)" if batched else "capture.recorder"},
        "images": [{"prompt": p["prompt"], "adherent": j["adherent"], "colours_found": j["colours_ok"],
                    "shapes": j["shapes"], "extra": j["extra"]} for p, j in zip(prompts, judged)],
    }
    return report


def summary(report: dict) -> dict:
    """The headline figures (and the best layer) of a report, for logs."""
    keys = ("adherence", "pointing", "miou", "own_vs_other", "shape_pointing", "shape_miou",
            "shape_own_vs_other", "same_shape_pointing", "same_shape_own_vs_other", "n_scored_images")
    out = {k: (_r(report[k]) if isinstance(report[k], float) else report[k]) for k in keys}
    out["buckets"] = {b: {k: _r(v["colour"][k2]) for k, k2 in (("pointing", "pointing"), ("miou", "miou"))}
                      | {"shape_pointing": _r(v["shape"]["pointing"])} for b, v in report["per_bucket"].items()}
    out.update({f"generation_{k}": _r(v) for k, v in report["generation"].items()})
    if report["ground_truth"] is not None:
        gt = report["ground_truth"]["aggregate"]
        out["true_masks"] = {"pointing": _r(gt["colour"]["pointing"]), "miou": _r(gt["colour"]["miou"]),
                             "own_vs_other": _r(gt["colour"]["own_vs_other"]),
                             "shape_pointing": _r(gt["shape"]["pointing"])}
    out["layers"] = {name: [_r(v["colour"]["pointing"]), _r(v["colour"]["miou"]), _r(v["colour"]["own_vs_other"]),
                            _r(v["shape"]["pointing"])] for name, v in report["per_layer"].items()}
    return out


def _r(v):
    return None if v is None else round(float(v), 4)


# --- the printed table ------------------------------------------------------------------------

COLUMNS = (("c.point", "colour", "pointing"), ("c.mIoU", "colour", "miou"), ("c.own", "colour", "own_vs_other"),
           ("s.point", "shape", "pointing"), ("s.mIoU", "shape", "miou"), ("s.own", "shape", "own_vs_other"))
LABEL = 58
CELL = 7


def _cells(v: dict | None) -> str:
    def f(x):
        return "-" if x is None else f"{x:.2f}"
    if v is None:
        return " ".join(f"{'-':>{CELL}}" for _ in COLUMNS)
    return " ".join(f"{f(v[kind][key]):>{CELL}}" for _, kind, key in COLUMNS)


def format_table(reports: dict) -> str:
    """The printed table: one report, or ``{label: report}`` side by side (a column group per model).

    Rows: the aggregate, each layer (by index; the name when the models agree on it), each step bucket,
    the same-shape and distinct-shape prompts, the true-mask checks; with concept maps each row comes
    twice, ``[raw cross]`` and ``[concept]``. Then one line per model: adherence, counts, chance.
    """
    if "aggregate" in reports:
        reports = {reports["config"].get("model", "model"): reports}
    labels = list(reports)
    group = len(COLUMNS) * (CELL + 1)
    top = " " * LABEL + "".join(f" | {lab[:group - 1]:<{group - 1}}" for lab in labels)
    head = f"{'view':<{LABEL}}" + "".join(" | " + " ".join(f"{c:>{CELL}}" for c, _, _ in COLUMNS) for _ in labels)
    rows = [top, head, "-" * len(head)] if len(labels) > 1 else [head, "-" * len(head)]
    concept = any(r.get("concept") for r in reports.values())

    def row(name, pick):
        srcs = ((("raw cross", lambda r: r), ("concept", lambda r: r.get("concept"))) if concept
                else (("", lambda r: r),))
        for tag, source in srcs:
            cells = []
            for r in reports.values():
                s = source(r)
                cells.append(_cells(pick(s) if s else None))
            label = f"{name} [{tag}]" if tag else name
            rows.append(f"{label[:LABEL]:<{LABEL}}" + "".join(" | " + c for c in cells))

    row("aggregate (all layers, all steps)", lambda r: r["aggregate"])
    layer_lists = [r.get("layers") or list(r["per_layer"]) for r in reports.values()]
    for li in range(max(len(x) for x in layer_lists)):
        here = {x[li] for x in layer_lists if li < len(x)}
        shared = len(here) == 1 and all(li < len(x) for x in layer_lists)
        name = f"layer {li}: {here.pop()}" if shared else f"layer {li}"
        row(name, lambda r, li=li: _layer(r, li))
    for b in BUCKETS:
        row(f"steps: {b}", lambda r, b=b: r["per_bucket"].get(b))
    row("same-shape prompts (aggregate)", lambda r: r.get("same_shape"))
    row("distinct-shape prompts (aggregate)", lambda r: r.get("distinct_shape"))
    truths = [r.get("ground_truth") for r in reports.values() if r.get("ground_truth")]
    if truths:
        for t in truths[0]["per_timestep"]:
            rows.append(f"{('true masks, world images noised to t=' + t):<{LABEL}}" + "".join(
                " | " + _cells(r["ground_truth"]["per_timestep"].get(t) if r.get("ground_truth") else None)
                for r in reports.values()))
        rows.append(f"{'true masks, summed over those timesteps':<{LABEL}}" + "".join(
            " | " + _cells(r["ground_truth"]["aggregate"] if r.get("ground_truth") else None)
            for r in reports.values()))
    rows.append("")
    for lab, r in reports.items():
        g, c = r["generation"], r["chance"]
        pre = f"{lab}: " if len(labels) > 1 else ""
        chance_p = "-" if c["pointing_uniform"] is None else f"{c['pointing_uniform']:.2f}"
        chance_o = "-" if c["own_vs_other_uniform"] is None else f"{c['own_vs_other_uniform']:.2f}"
        rows.append(f"{pre}adherence {r['adherence']:.2f}  (colours found {g['colours_found']:.2f}, shapes right "
                    f"{g['shapes_right']:.2f}, extra objects {g['extra_objects']:.2f}); scored images "
                    f"{r['n_scored_images']} of {r['n_prompts']} ({r.get('n_same_shape_prompts', 0)} same-shape "
                    f"prompts); chance: pointing {chance_p}, own-vs-other {chance_o}")
        if len(labels) > 1:
            names = r.get("layers") or list(r["per_layer"])
            rows.append(f"{pre}layers " + ", ".join(f"{i} {nm}" for i, nm in enumerate(names)))
    first = next(iter(reports.values()))
    rows.append(f"IoU threshold: map/max >= {first['method']['tau']}; a shared shape word owns both masks "
                "(no own-vs-other)")
    return "\n".join(rows)


def _layer(r: dict, li: int) -> dict | None:
    names = r.get("layers") or list(r["per_layer"])
    return r["per_layer"].get(names[li]) if li < len(names) else None


# --- CLI --------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffviz eval-attention",
                                description="score cross-attention maps against the toy world's ground truth")
    p.add_argument("--model", action="append", default=None,
                   help="pipeline folder, or toyworld / toyworld-mmdit (the shipped toy models); give it twice or "
                        "more to put models side by side (default: the embedded toy-world model)")
    p.add_argument("--compare", action="store_true", help="side by side: toyworld and toyworld-mmdit")
    p.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS,
                   help="number of held-out prompts, every third with one shared shape (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="image i uses seed + i (default %(default)s)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--cfg", type=float, default=DEFAULT_CFG, help="guidance scale (default %(default)s)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--recorder", action="store_true",
                   help="record through capture.recorder, one prompt at a time (slower; the same maps as the default "
                        "batched probe, which a test checks; always so for non-UNet models)")
    p.add_argument("--concept-maps", action="store_true",
                   help="also score the concept maps (joint models), beside the raw cross maps")
    p.add_argument("--random-weights", action="store_true",
                   help="control: same model with its denoiser and text encoders re-initialised at random")
    return p


def _resolve_models(args, prog: str) -> list[tuple[str, str | None]] | str:
    """``[(label, folder or None for the default)]``, or a one-line error."""
    if args.compare and args.model:
        return f"{prog}: error: --compare already names the models; drop --model"
    wanted = ["toyworld", "toyworld-mmdit"] if args.compare else (args.model or ["toyworld"])
    out, seen = [], set()
    for m in wanted:
        if m in MODEL_DIRS:
            folder = MODEL_DIRS[m]
            if not (folder / "model_index.json").is_file():
                return f"{prog}: error: --model {m}: not shipped here (no {folder}/model_index.json)"
            label, location = m, (None if m == "toyworld" else str(folder))
        else:
            if not (Path(m) / "model_index.json").is_file():
                return f"{prog}: error: --model {m} is not a pipeline folder (no model_index.json)"
            label, location = Path(m).resolve().name or m, m
        base, k = label, 2
        while label in seen:
            label, k = f"{base}#{k}", k + 1
        seen.add(label)
        out.append((label, location))
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    prog = "diffviz eval-attention"

    def fail(message: str) -> int:
        print(message, file=sys.stderr)
        return 2

    if args.prompts < 1:
        return fail(f"{prog}: error: --prompts must be at least 1")
    if args.steps < 3:
        return fail(f"{prog}: error: --steps must be at least 3 (one per step bucket)")
    if not math.isfinite(args.cfg) or args.cfg < 0:
        return fail(f"{prog}: error: --cfg must be a non-negative number")
    models = _resolve_models(args, prog)
    if isinstance(models, str):
        return fail(models)
    if args.report is not None:
        rp = Path(args.report)
        if rp.is_dir() or not rp.parent.is_dir():
            return fail(f"{prog}: error: --report {args.report}: not a writable file path")
    if args.concept_maps and _concept_kwargs(True) is None:
        return fail(f"{prog}: error: --concept-maps: this capture does not record concept maps yet")
    from capture.config import ConfigError
    from capture.pipeline import ModelLoadError, load_pipeline
    reports = {}
    for label, location in models:
        try:
            pipe = load_pipeline(location, device=args.device, dtype="float32")
        except (ConfigError, ModelLoadError) as exc:
            return fail(f"{prog}: error: {label}: {exc}")
        if args.random_weights:
            pipe = random_twin(pipe)
        report = evaluate(pipe, n_prompts=args.prompts, seed=args.seed, cfg=args.cfg, steps=args.steps,
                          batched=not args.recorder, concept=args.concept_maps,
                          progress=lambda i, n, lab=label: print(f"\r{lab}: {i}/{n} prompts", end="",
                                                                 file=sys.stderr, flush=True))
        if not report["config"]["recorder"].startswith("probe"):
            print(file=sys.stderr)
        report["config"]["model"] = label if location is not None else "default (toyworld)"
        report["config"]["random_weights"] = bool(args.random_weights)
        reports[label] = report
    print(format_table(reports))
    if args.report:
        data = next(iter(reports.values())) if len(reports) == 1 else {"labels": list(reports), "models": reports}
        tmp = Path(args.report).with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(args.report)
        print(f"report written to {args.report}")
    return 0


def random_twin(pipe):
    """The control: a pipeline of the same class and shape whose denoiser and text encoders are freshly random.

    Every network but the VAE is rebuilt from ``pipe``'s own configs, so the twin matches whatever model
    was loaded. The VAE, tokenizers and scheduler stay (they hold no attention); ``pipe`` is not changed.
    """
    import torch
    from diffusers import ModelMixin

    torch.manual_seed(12345)
    parts = {}
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module) and name != "vae":
            param = next(comp.parameters())
            fresh = type(comp).from_config(comp.config) if isinstance(comp, ModelMixin) else type(comp)(comp.config)
            comp = fresh.to(device=param.device, dtype=param.dtype).eval()
        parts[name] = comp
    extra = {}
    if "requires_safety_checker" in inspect.signature(type(pipe).__init__).parameters:
        extra["requires_safety_checker"] = False
    twin = type(pipe)(**parts, **extra)
    twin.set_progress_bar_config(disable=True)
    return twin


if __name__ == "__main__":
    raise SystemExit(main())
