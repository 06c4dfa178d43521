"""Fast, valid, random runs for tests: numpy data through the real ``RunWriter`` (no torch).

    from tests.synthetic import write_synthetic_run
    run_dir = write_synthetic_run(tmp_path / "run", steps=4, layers=2, tokens=5, r=8, s=4)

The data follow the contract's rules: cross maps are a softmax over ``context_length`` keys
(``tokens + pad`` of them) sliced to the prompt's tokens, so they sum to < 1 over tokens unless
``pad=0``; self maps are row-softmaxes; metrics and PCA come from ``analysis`` on the same data.
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
) -> Path:
    """Write a valid random run to ``path`` and return it.

    ``layer_resolutions`` gives each layer's stored cross grid (default ``r`` for all); a layer's
    self grid is ``min(s, its cross grid)``. ``pad`` extra keys stand for CLIP's padding slots.
    """
    rng = np.random.default_rng(seed)
    n, t = int(steps), int(tokens)
    k = t + int(pad)
    res = list(layer_resolutions) if layer_resolutions is not None else [r] * layers
    if len(res) != layers:
        raise ValueError("layer_resolutions needs one entry per layer")
    token_recs, words = synthetic_tokens(prompt, t)
    layer_recs = []
    for i, ri in enumerate(res):
        si = min(s, ri)
        layer_recs.append({
            "index": i,
            "name": f"down_blocks.{i}.attentions.0.transformer_blocks.0",
            "block": f"down_blocks.{i}",
            "native": [ri, ri],
            "cross_shape": [t, ri, ri] if cross else None,
            "self_shape": [si * si, si * si] if self_attention else None,
        })
    latents = np.cumsum(rng.standard_normal((n + 1, *latent_shape)), axis=0) * 0.5
    noise = rng.standard_normal((n, *latent_shape))
    entropy = np.zeros((layers, n))
    dists = np.zeros((layers, n, k))
    with RunWriter(path, overwrite=overwrite) as w:
        for step in range(n):
            cross_maps, self_maps = {}, {}
            for i, ri in enumerate(res):
                if cross:
                    full = _softmax(rng.standard_normal((k, ri, ri)) * 2.0, axis=0)
                    entropy[i, step] = M.attention_entropy(full)
                    dists[i, step] = M.token_distribution(full)
                    cross_maps[i] = full[:t]
                if self_attention:
                    si = min(s, ri)
                    self_maps[i] = _softmax(rng.standard_normal((si * si, si * si)) * 2.0, axis=1)
            image = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
            w.write_step(step, image=image, cross=cross_maps, self_=self_maps)
        metadata = {
            "run": {
                "prompt": prompt, "negative_prompt": "", "cfg_scale": 7.5, "num_steps": n, "seed": seed,
                "height": image_size, "width": image_size, "dtype": "float32", "device": "cpu",
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
                "cfg_half": "conditional", "heads": "mean",
                "cross": {"enabled": cross, "resolution": r, "tokens": "prompt", "full_distribution": k == t,
                          "sum_rule": contract.CROSS_SUM_RULE},
                "self": {"enabled": self_attention, "resolution": s, "sum_rule": contract.SELF_SUM_RULE},
            },
            "layers": layer_recs,
        }
        metrics = M.metrics_record(
            latents, entropy=entropy if cross else None, token_dists=dists if cross else None, num_tokens=t
        )
        w.finish(metadata, metrics, latent_pca_record(latents[1:]),
                 latents=latents if save_latents else None, noise=noise if save_latents else None)
    return Path(path)
