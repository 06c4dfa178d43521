"""Fast, valid, random runs for tests: numpy data through the real ``RunWriter`` (no torch).

    from tests.synthetic import write_synthetic_run
    run_dir = write_synthetic_run(tmp_path / "run", steps=4, layers=2, tokens=5, r=8, s=4)

The data follow the contract's rules: cross maps are a softmax over ``context_length`` keys
(``tokens + pad`` of them, per head with ``per_head=True``) sliced to the prompt's tokens, so they sum
to < 1 over tokens unless ``pad=0``; self maps are row-softmaxes; metrics and PCA come from
``analysis`` on the same data. Schema 2 by default; ``grid=(4, 8)`` for non-square maps.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

import numpy as np

from analysis import metrics as M
from analysis.trajectory import latent_pca_record
from export import contract
from export.writer import RunWriter

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def synthetic_tokens(prompt: str, tokens: int) -> tuple[list[dict], list[str]]:
    """``tokens`` CLIP-style token records (start, words, end) for ``prompt`` and its word list."""
    words = prompt.split() or ["x"]
    if tokens < 1:
        raise ValueError("tokens must be >= 1")
    inner = list(itertools.islice(itertools.cycle(range(len(words))), max(tokens - 2, 0)))
    recs = [{"text": BOS, "word": None, "special": True}]
    recs += [{"text": words[w] + "</w>", "word": w, "special": False} for w in inner]
    if tokens >= 2:
        recs.append({"text": EOS, "word": None, "special": True})
    out = [{"index": i, "id": 1000 + i, **r} for i, r in enumerate(recs[:tokens])]
    return out, words


def write_synthetic_run(
    path: str | Path,
    *,
    steps: int = 4,
    layers: int = 2,
    tokens: int = 5,
    r: int = 8,
    s: int = 4,
    seed: int = 0,
    prompt: str = "a red circle",
    pad: int = 3,
    image_size: int = 16,
    latent_shape: Sequence[int] = (4, 4, 4),
    cross: bool = True,
    self_attention: bool = True,
    save_latents: bool = True,
    layer_resolutions: Sequence[int] | None = None,
    overwrite: bool = True,
    schema_version: int = contract.SCHEMA_VERSION,
    per_head: bool = False,
    heads: int = 2,
    grid: tuple[int, int] | None = None,
    self_grid: tuple[int, int] | None = None,
    image_hw: tuple[int, int] | None = None,
) -> Path:
    """Write a valid random run to ``path`` and return it.

    ``layer_resolutions`` gives each layer's stored square cross grid (default ``r`` for all); a
    layer's self grid is then ``min(s, its cross grid)``. ``grid=(h, w)`` instead gives every layer a
    (possibly non-square) cross grid, with self grid ``self_grid`` (default: the cross grid). ``pad``
    extra keys stand for CLIP's padding slots. ``image_hw=(H, W)`` overrides the square ``image_size``.

    ``schema_version=2`` (the default) adds ``family``, ``token_sets``, ``layers[].kind/heads/self_grid``
    and ``images/final.png``; ``per_head`` stores ``[heads, T, h, w]`` cross maps, each head its own
    softmax over the keys. ``schema_version=1`` writes a run as schema 1 did (square grids only).
    """
    rng = np.random.default_rng(seed)
    n, t = int(steps), int(tokens)
    k = t + int(pad)
    v2 = schema_version >= 2
    if not v2 and (per_head or grid is not None or self_grid is not None or image_hw is not None):
        raise ValueError("per_head, grid, self_grid and image_hw need schema_version=2")
    if grid is not None and layer_resolutions is not None:
        raise ValueError("give grid or layer_resolutions, not both")
    res = list(layer_resolutions) if layer_resolutions is not None else [r] * layers
    if len(res) != layers:
        raise ValueError("layer_resolutions needs one entry per layer")
    if grid is not None:
        grids = [tuple(grid)] * layers
        self_grids = [tuple(self_grid or grid)] * layers
    else:
        grids = [(ri, ri) for ri in res]
        self_grids = [(min(s, ri),) * 2 for ri in res]
    height, width = image_hw if image_hw is not None else (image_size, image_size)
    nh = int(heads) if per_head else None
    token_recs, words = synthetic_tokens(prompt, t)
    layer_recs = []
    for i, (g, sg) in enumerate(zip(grids, self_grids)):
        rec = {
            "index": i,
            "name": f"down_blocks.{i}.attentions.0.transformer_blocks.0",
            "block": f"down_blocks.{i}",
            "native": list(g),
            "cross_shape": contract.cross_shape(t, g, nh) if cross else None,
            "self_shape": contract.self_shape(sg) if self_attention else None,
        }
        if v2:
            rec.update(kind="unet", heads=int(heads), self_grid=list(sg) if self_attention else None)
        layer_recs.append(rec)
    latents = np.cumsum(rng.standard_normal((n + 1, *latent_shape)), axis=0) * 0.5
    noise = rng.standard_normal((n, *latent_shape))
    entropy = np.zeros((layers, n))
    dists = np.zeros((layers, n, k))
    with RunWriter(path, overwrite=overwrite) as w:
        for step in range(n):
            cross_maps, self_maps = {}, {}
            for i, ((h, wd), sg) in enumerate(zip(grids, self_grids)):
                if cross:
                    # each head is a softmax over all k keys; metrics see the head-mean, as capture's do
                    full = _softmax(rng.standard_normal((nh or 1, k, h, wd)) * 2.0, axis=1)
                    mean = full.mean(axis=0)
                    entropy[i, step] = M.attention_entropy(mean)
                    dists[i, step] = M.token_distribution(mean)
                    cross_maps[i] = full[:, :t] if per_head else mean[:t]
                if self_attention:
                    cells = sg[0] * sg[1]
                    self_maps[i] = _softmax(rng.standard_normal((cells, cells)) * 2.0, axis=1)
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            w.write_step(step, image=image, cross=cross_maps, self_=self_maps)
        metadata = {
            "schema_version": schema_version,
            "run": {
                "prompt": prompt, "negative_prompt": "", "cfg_scale": 7.5, "num_steps": n, "seed": seed,
                "height": height, "width": width, "dtype": "float32", "device": "cpu",
                "scheduler": "DDIMScheduler", "model": {"source": "default", "id": "synthetic"},
            },
            "tokens": token_recs,
            "words": words,
            "context_length": k,
            "timesteps": [int(x) for x in np.linspace(999, 0, n, endpoint=False).round()],
            "latent_shape": list(latent_shape),
            "noise_source": "unet_forward_hook",
            "preview": "pred_original_sample",
            "attention": {
                "cfg_half": "conditional", "heads": contract.HEADS_PER_HEAD if per_head else contract.HEADS_MEAN,
                "cross": {"enabled": cross, "resolution": r if grid is None else max(grid), "tokens": "prompt",
                          "full_distribution": k == t, "sum_rule": contract.CROSS_SUM_RULE},
                "self": {"enabled": self_attention, "resolution": max(s, *(max(g) for g in self_grids)),
                         "sum_rule": contract.SELF_SUM_RULE},
            },
            "layers": layer_recs,
        }
        if v2:
            metadata["family"] = contract.V1_FAMILY  # Stable Diffusion, the family schema 1 runs imply
            metadata["token_sets"] = [{"encoder": "text_encoder", "tokenizer": "tokenizer", "offset": 0, "length": t,
                                       "agrees": True}]
            w.write_final_image(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        metrics = M.metrics_record(
            latents, entropy=entropy if cross else None, token_dists=dists if cross else None, num_tokens=t
        )
        w.finish(metadata, metrics, latent_pca_record(latents[1:]),
                 latents=latents if save_latents else None, noise=noise if save_latents else None)
    return Path(path)


# --------------------------------------------------------------------------- joint (MM-DiT) runs

T5_END = "</s>"
#: ``family`` blocks of the joint runs: the encoders each token set comes from.
JOINT_FAMILIES = {
    "sd3": {
        "name": "sd3", "pipeline": "StableDiffusion3Pipeline",
        "text_encoders": [{"name": "text_encoder", "class": "CLIPTextModelWithProjection", "tokenizer": "tokenizer"},
                          {"name": "text_encoder_2", "class": "CLIPTextModelWithProjection", "tokenizer": "tokenizer_2"},
                          {"name": "text_encoder_3", "class": "T5EncoderModel", "tokenizer": "tokenizer_3"}],
        "tokens_from": "tokenizer",
    },
    "flux": {
        "name": "flux", "pipeline": "FluxPipeline",
        "text_encoders": [{"name": "text_encoder", "class": "CLIPTextModel", "tokenizer": "tokenizer"},
                          {"name": "text_encoder_2", "class": "T5EncoderModel", "tokenizer": "tokenizer_2"}],
        "tokens_from": "tokenizer_2",
    },
}
#: SD3's T5 tokens follow the 77 CLIP positions of the text sequence.
SD3_T5_OFFSET = 77


def joint_tokens(prompt: str, family: str) -> tuple[list[dict], list[str], list[dict]]:
    """``(tokens, words, token_sets)`` of a joint run. SD3: a CLIP set (start, one token per word, end) at
    offset 0, then a T5 set at offset 77; Flux: the T5 set alone at offset 0. In the T5 set the longest word
    is split into two pieces (a sub-word to merge) and an end token closes it. Both sets share the word list."""
    words = prompt.split() or ["x"]
    split = max(range(len(words)), key=lambda w: (len(words[w]), -w))
    t5: list[dict] = []
    for w, word in enumerate(words):
        pieces = ["▁" + word[: len(word) // 2], word[len(word) // 2:]] if w == split and len(word) > 1 else ["▁" + word]
        t5 += [{"text": p, "word": w, "special": False} for p in pieces]
    t5.append({"text": T5_END, "word": None, "special": True})
    sets = []
    if family == "sd3":
        clip = ([{"text": BOS, "word": None, "special": True}]
                + [{"text": word + "</w>", "word": w, "special": False} for w, word in enumerate(words)]
                + [{"text": EOS, "word": None, "special": True}])
        sets.append(("text_encoder", "tokenizer", 0, clip))
        sets.append(("text_encoder_3", "tokenizer_3", SD3_T5_OFFSET, t5))
    elif family == "flux":
        sets.append(("text_encoder_2", "tokenizer_2", 0, t5))
    else:
        raise ValueError(f"family must be 'sd3' or 'flux', not {family!r}")
    tokens, token_sets = [], []
    for encoder, tokenizer, offset, recs in sets:
        token_sets.append({"encoder": encoder, "tokenizer": tokenizer, "offset": offset, "length": len(recs), "agrees": True})
        for k, rec in enumerate(recs):
            tokens.append({"index": offset + k, "id": 2000 + len(tokens), **rec, "set": encoder})
    return tokens, words, token_sets


def write_joint_run(
    path: str | Path,
    *,
    family: str = "sd3",
    steps: int = 3,
    joint_layers: int = 2,
    single_layers: int | None = None,
    grid: tuple[int, int] = (4, 6),
    image_hw: tuple[int, int] = (16, 24),
    prompt: str = "a red circle",
    seed: int = 0,
    pad: int = 3,
    latent_shape: Sequence[int] = (4, 4, 6),
    text: bool = True,
    save_latents: bool = True,
    overwrite: bool = True,
    validate: bool = True,
) -> Path:
    """Write a valid random schema-2 joint-attention run (``family`` "sd3" or "flux") to ``path``; return it.

    Layers: ``joint_layers`` MM-DiT blocks (``transformer_blocks.i``), then (Flux; default 1) ``single_layers``
    single-stream blocks (``single_transformer_blocks.j``), every one on the (non-square) ``grid``. Each layer and
    step is one softmax over the keys ``[image cells; text sequence]`` (the stored tokens plus ``pad`` others), as
    an MM-DiT computes it: an image query's row gives the cross map (its text part, ``[T, h, w]``, summing to < 1
    over tokens) and the self map (its image part, ``[n, n]``, rows < 1); a token's query row gives its text map
    (its image part, ``[T, h, w]``, each token's map summing to < 1 over the cells), written as manifest kind
    "text" when ``text``. Metrics come from the cross part renormalised over the text keys.
    """
    if family not in JOINT_FAMILIES:
        raise ValueError(f"family must be one of {sorted(JOINT_FAMILIES)}, not {family!r}")
    rng = np.random.default_rng(seed)
    n = int(steps)
    singles = (1 if family == "flux" else 0) if single_layers is None else int(single_layers)
    h, w = (int(v) for v in grid)
    cells = h * w
    token_recs, words, token_sets = joint_tokens(prompt, family)
    t = len(token_recs)
    k = t + int(pad)  # text keys: the stored tokens first, then the rest of the sequence
    names = ([("joint", f"transformer_blocks.{i}", "transformer_blocks") for i in range(joint_layers)]
             + [("single", f"single_transformer_blocks.{j}", "single_transformer_blocks") for j in range(singles)])
    layers = len(names)
    layer_recs = [{
        "index": i, "name": name, "block": block, "kind": kind, "native": [h, w], "heads": 2,
        "cross_shape": contract.cross_shape(t, (h, w)), "self_shape": contract.self_shape((h, w)), "self_grid": [h, w],
        "text_shape": [t, h, w] if text else None,
    } for i, (kind, name, block) in enumerate(names)]
    height, width = image_hw
    latents = np.cumsum(rng.standard_normal((n + 1, *latent_shape)), axis=0) * 0.5
    noise = rng.standard_normal((n, *latent_shape))
    entropy = np.zeros((layers, n))
    dists = np.zeros((layers, n, k))
    with RunWriter(path, overwrite=overwrite, validate=validate) as wr:
        for step in range(n):
            cross_maps, self_maps, text_maps = {}, {}, {}
            for i in range(layers):
                # one joint softmax: rows are queries [image cells; stored tokens], columns keys [image cells; text]
                rows = _softmax(rng.standard_normal((cells + t, cells + k)) * 2.0, axis=1)
                image_rows, token_rows = rows[:cells], rows[cells:]
                text_part = image_rows[:, cells:].T.reshape(k, h, w)  # [K, h, w]
                cross_maps[i] = text_part[:t]
                self_maps[i] = image_rows[:, :cells]
                entropy[i, step] = M.attention_entropy(text_part)
                dists[i, step] = M.token_distribution(text_part)
                if text:
                    text_maps[i] = token_rows[:, :cells].reshape(t, h, w)
            wr.write_step(step, image=rng.integers(0, 256, (height, width, 3), dtype=np.uint8), cross=cross_maps,
                          self_=self_maps, text=text_maps)
        attention = {
            "cfg_half": "conditional", "heads": contract.HEADS_MEAN,
            "cross": {"enabled": True, "resolution": max(h, w), "tokens": "prompt", "full_distribution": False,
                      "sum_rule": contract.JOINT_CROSS_SUM_RULE},
            "self": {"enabled": True, "resolution": max(h, w), "sum_rule": contract.JOINT_SELF_SUM_RULE},
            "text": {"enabled": bool(text), "sum_rule": contract.TEXT_SUM_RULE},
        }
        metadata = {
            "schema_version": 2,
            "run": {
                "prompt": prompt, "negative_prompt": "", "cfg_scale": 7.0, "num_steps": n, "seed": seed,
                "height": height, "width": width, "dtype": "float32", "device": "cpu",
                "scheduler": "FlowMatchEulerDiscreteScheduler", "model": {"source": "default", "id": f"synthetic-{family}"},
            },
            "family": JOINT_FAMILIES[family],
            "token_sets": token_sets,
            "tokens": token_recs,
            "words": words,
            "context_length": token_sets[-1]["offset"] + token_sets[-1]["length"] + int(pad),
            "timesteps": [int(x) for x in np.linspace(1000, 0, n, endpoint=False).round()],
            "latent_shape": list(latent_shape),
            "noise_source": "scheduler_model_output",
            "preview": "pred_original_sample",
            "attention": attention,
            "layers": layer_recs,
        }
        wr.write_final_image(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        metrics = M.metrics_record(latents, entropy=entropy, token_dists=dists, num_tokens=t)
        wr.finish(metadata, metrics, latent_pca_record(latents[1:]),
                  latents=latents if save_latents else None, noise=noise if save_latents else None)
    return Path(path)
