"""How faithful are the toy model's cross-attention maps? ``diffviz eval-attention``.

For two-object prompts ("a red circle and a blue square": two colours, two shapes, every
pairing in turn) the model generates an image from seed ``seed + i`` while every
cross-attention layer is recorded at every step: head-averaged maps of the conditional
half of the CFG batch, the maps a ``diffviz generate`` run stores. By default a whole batch
of prompts runs at once through ``probe`` (fast); ``--recorder`` goes through
``capture.recorder`` one prompt at a time, and a test checks that both give the same maps.
The prompts are held out only in the sense that their images are new: the world is small,
and every colour/shape pairing also occurs in training captions.

The toy world's colours are pure, so segmenting the *generated* image by colour
(``world.segment``) gives each object's mask, and the prompt says which colour and shape
word belongs to which object. Scores, per colour word and per shape word, for each image
where both objects were found:

* **IoU** — the token's map, normalised by its maximum, thresholded at τ = 0.4 (DAAM's
  choice), against the object's mask;
* **pointing game** — does the map's maximum fall inside the object's mask?
* **own vs other** — the share of the map's mass on its own object, out of the mass on
  both objects (0.5 is chance).

The map of a token is aggregated DAAM-style: every layer's map (upsampled bilinearly to
the 32×32 image) summed over layers and steps. The same scores are given per layer (summed
over steps) and per step bucket (early / middle / late thirds, summed over layers).
**Adherence** is the fraction of images whose two objects both came out with the prompt's
colour and shape, and nothing else coloured (no other colour, no second blob of a named one).

``ground_truth`` in the report scores the same maps against *true* masks: world images
noised to a few timesteps and passed once through the UNet with their caption. It does
not depend on what the model generates, so it also scores the random-weight control,
whose generations contain no readable objects.

The JSON report's top level holds the colour-token figures ``pointing``, ``miou``,
``own_vs_other``, plus ``adherence`` and ``shape_pointing``; everything else is detail.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from . import world

TAU = 0.4
BUCKETS = ("early", "middle", "late")
DEFAULT_PROMPTS = 64
DEFAULT_STEPS = 30
DEFAULT_SEED = 0
#: Same default as ``diffviz generate`` (capture.config.GenerateConfig.cfg_scale).
DEFAULT_CFG = 7.5
TOKEN_KINDS = ("colour", "shape")


# --- scoring (numpy) --------------------------------------------------------------------------

def token_scores(amap: np.ndarray, own: np.ndarray, other: np.ndarray, tau: float = TAU) -> dict:
    """Pointing, IoU at ``tau`` and own-vs-other mass of one non-negative map [H, W]."""
    peak = float(amap.max())
    hit = bool(own.flat[int(np.argmax(amap))]) if peak > 0 else False
    region = amap >= tau * peak if peak > 0 else np.zeros_like(own)
    union = (region | own).sum()
    iou = float((region & own).sum() / union) if union else 0.0
    m_own, m_other = float(amap[own].sum()), float(amap[other].sum())
    share = m_own / (m_own + m_other) if m_own + m_other > 0 else 0.5
    return {"pointing": float(hit), "iou": iou, "own_vs_other": share}


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def score_view(maps: np.ndarray, items: list[dict], tau: float = TAU) -> dict:
    """Scores of one view (maps [N, K, H, W]) over all scorable tokens, per token kind."""
    out = {}
    for kind in TOKEN_KINDS:
        acc = {"pointing": [], "iou": [], "own_vs_other": []}
        for it in items:
            for obj, (own, other) in enumerate(it["masks"]):
                s = token_scores(maps[it["index"], it["tokens"][obj][kind]], own, other, tau)
                for k, v in s.items():
                    acc[k].append(v)
        out[kind] = {"pointing": _mean(acc["pointing"]), "miou": _mean(acc["iou"]),
                     "own_vs_other": _mean(acc["own_vs_other"]), "n": len(acc["pointing"])}
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

def _upsample(maps: np.ndarray, size: int) -> np.ndarray:
    """[..., r, r] -> [..., size, size], bilinear (half-pixel centres), as torch's interpolate."""
    import torch
    import torch.nn.functional as F
    t = torch.as_tensor(np.ascontiguousarray(maps), dtype=torch.float32)
    lead = t.shape[:-2]
    t = t.reshape(-1, 1, *t.shape[-2:])
    if t.shape[-1] != size:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t.reshape(*lead, size, size).numpy()


def bucket_of(step: int, steps: int) -> int:
    return min(len(BUCKETS) - 1, step * len(BUCKETS) // steps)


def record_prompt(pipe, prompt: str, *, seed: int, steps: int, cfg: float) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Generate one image with ``capture.recorder`` on every layer (cross maps only).

    Returns the image (uint8 [H, W, 3]), the layer names, and the per-(layer, bucket) sums of
    the maps, float32 [L, 3, context_length, r_max, r_max] (every layer upsampled to the largest grid).
    """
    import torch
    from capture.recorder import record_attention

    nb = len(BUCKETS)
    with torch.no_grad(), record_attention(pipe, self_=False, resolution=64) as rec:
        out = pipe(prompt, guidance_scale=cfg, num_inference_steps=steps, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(seed),
                   callback_on_step_end=rec.callback_on_step_end)
    names = [plan.name for plan in rec.layers]
    r = max(plan.cross_grid[0] for plan in rec.layers)
    sums = np.zeros((len(names), nb, rec.context_length, r, r), dtype=np.float32)
    for s, maps in enumerate(rec.steps):
        b = bucket_of(s, steps)
        for li in range(len(names)):
            sums[li, b] += _upsample(maps.cross[li], r)
    image = (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)
    return image, names, sums


def record_batch(pipe, prompts: list[str], *, seeds: list[int], steps: int, cfg: float):
    """The same as ``record_prompt`` for a whole batch at once, through ``probe`` (for training on a GPU).

    ``tests/test_toyworld_eval.py`` checks that both give the same maps.
    """
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
        step = state["step"]
        b = bucket_of(step, steps)
        if state["sums"] is None:
            r = max(int(round(math.sqrt(store.maps[name].shape[1]))) for name in names)
            state["sums"] = torch.zeros((n, len(names), nb, k, r, r), device=output[0].device)
        r = state["sums"].shape[-1]
        for li, name in enumerate(names):
            m = store.maps[name][-n:]                               # conditional half [n, HW, K]
            g = int(round(math.sqrt(m.shape[1])))
            m = m.transpose(1, 2).reshape(n * k, 1, g, g).float()
            if g != r:
                m = torch.nn.functional.interpolate(m, size=(r, r), mode="bilinear", align_corners=False)
            state["sums"][:, li, b] += m.reshape(n, k, r, r)
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
    return images, names, state["sums"].cpu().numpy()


# --- the ground-truth check: attention on the world's own images ---------------------------------

GT_TIMESTEPS = (800, 500, 200)


def evaluate_on_world(pipe, *, n_images: int = DEFAULT_PROMPTS, seed: int = DEFAULT_SEED,
                      timesteps: tuple[int, ...] = GT_TIMESTEPS, tau: float = TAU) -> dict:
    """Attention against *true* masks, independent of what the model would generate.

    Two-object world images are noised to each timestep and denoised by one UNet call with
    their caption (conditional only); every layer's cross map is summed as in ``evaluate``
    and scored against the rendered masks. A model whose generations are unreadable (the
    random control) still gets scores here, near chance.
    """
    import torch
    from . import probe

    b = world.make_batch(np.random.default_rng([seed, 77]), n_images, counts=(0, 1, 0), p_size=0.0, p_side=0.0)
    device = next(pipe.unet.parameters()).device
    dtype = next(pipe.unet.parameters()).dtype
    ids = torch.as_tensor(pipe.tokenizer(b.captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                         truncation=True)["input_ids"], device=device)
    store = probe.ProbeStore()
    original = dict(pipe.unet.attn_processors)
    names = probe.install(pipe.unet, store)
    gen = torch.Generator("cpu").manual_seed(seed)
    items = []
    for i in range(n_images):
        tokens = [{"colour": int(b.roles[i, o, 0]) + 1, "shape": int(b.roles[i, o, 1]) + 1} for o in range(2)]
        items.append({"index": i, "tokens": tokens, "masks": [(b.masks[i, 0], b.masks[i, 1]), (b.masks[i, 1], b.masks[i, 0])]})
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
                r = max(int(round(math.sqrt(store.maps[n].shape[1]))) for n in names)
                acc = 0.0
                for n in names:
                    m = store.maps[n].float()
                    g = int(round(math.sqrt(m.shape[1])))
                    m = m.transpose(1, 2).reshape(-1, 1, g, g)
                    acc = acc + torch.nn.functional.interpolate(m, size=(r, r), mode="bilinear", align_corners=False)
                acc = acc.reshape(n_images, -1, r, r).cpu().numpy()
                total = acc if total is None else total + acc
                out[str(t)] = score_view(_upsample(acc, world.IMAGE_SIZE), items, tau)
    finally:
        pipe.unet.set_attn_processor(original)
    return {"aggregate": score_view(_upsample(total, world.IMAGE_SIZE), items, tau), "per_timestep": out,
            "n_images": n_images, "timesteps": list(timesteps),
            "method": "world images noised to each timestep, one conditional UNet call with their caption; "
                      "layers summed, scored against the rendered masks"}


# --- the evaluation ---------------------------------------------------------------------------

def evaluate(pipe, *, n_prompts: int = DEFAULT_PROMPTS, seed: int = DEFAULT_SEED, cfg: float = DEFAULT_CFG,
             steps: int = DEFAULT_STEPS, batched: bool = True, batch_size: int = 64,
             tau: float = TAU, progress=None) -> dict:
    """Generate, segment and score; returns the full report (see the module docstring)."""
    prompts = world.two_object_prompts(n_prompts, seed=seed)
    pipe.set_progress_bar_config(disable=True)
    images, sums, names = [], [], None
    t0 = time.time()
    if batched:
        for start in range(0, n_prompts, batch_size):
            chunk = prompts[start:start + batch_size]
            imgs, names, s = record_batch(pipe, [p["prompt"] for p in chunk],
                                          seeds=[seed + start + j for j in range(len(chunk))], steps=steps, cfg=cfg)
            images += list(imgs)
            sums += list(s)
    else:
        for i, p in enumerate(prompts):
            img, names, s = record_prompt(pipe, p["prompt"], seed=seed + i, steps=steps, cfg=cfg)
            images.append(img)
            sums.append(s)
            if progress:
                progress(i + 1, n_prompts)
    gen_seconds = time.time() - t0
    size = images[0].shape[0]
    sums = np.stack(sums)                                          # [N, L, B, K, r, r]
    # Upsampling is linear, so summing first and upsampling each view once is the same.
    views = {"aggregate": _upsample(sums.sum(axis=(1, 2)), size)}
    for li, name in enumerate(names):
        views[f"layer:{name}"] = _upsample(sums[:, li].sum(axis=1), size)
    for bi, bucket in enumerate(BUCKETS):
        views[f"bucket:{bucket}"] = _upsample(sums[:, :, bi].sum(axis=1), size)

    judged, items = [], []
    for i, (p, img) in enumerate(zip(prompts, images)):
        j = judge_image(img, p["objects"])
        judged.append(j)
        words = p["prompt"].split()
        if not j["colours_ok"]:
            continue
        tokens, masks = [], []
        for o, (colour, shape) in enumerate(p["objects"]):
            ci = words.index(colour)
            si = ci + 1
            assert words[si] == shape
            tokens.append({"colour": ci + 1, "shape": si + 1})   # +1: the start token
            masks.append((j["found"][o], j["found"][1 - o]))
        items.append({"index": i, "tokens": tokens, "masks": masks})

    scored = {name: score_view(v, items, tau) for name, v in views.items()}
    truth = evaluate_on_world(pipe, n_images=n_prompts, seed=seed, tau=tau)
    agg = scored["aggregate"]
    areas = [m[0].sum() for it in items for m in it["masks"]]
    both = [(m[0].sum(), m[1].sum()) for it in items for m in it["masks"]]
    n = len(prompts)
    report = {
        "adherence": sum(j["adherent"] for j in judged) / n,
        "pointing": agg["colour"]["pointing"] or 0.0,
        "miou": agg["colour"]["miou"] or 0.0,
        "own_vs_other": agg["colour"]["own_vs_other"] or 0.0,
        "shape_pointing": agg["shape"]["pointing"] or 0.0,
        "shape_miou": agg["shape"]["miou"] or 0.0,
        "shape_own_vs_other": agg["shape"]["own_vs_other"] or 0.0,
        "n_prompts": n,
        "n_scored_images": len(items),
        "generation": {
            "colours_found": sum(j["colours_ok"] for j in judged) / n,
            "shapes_right": (sum(sum(j["shapes_ok"]) for j in judged if j["colours_ok"]) / (2 * len(items))
                             if items else 0.0),
            "extra_objects": sum(bool(j["extra"]) for j in judged) / n,
        },
        "chance": {
            "pointing_uniform": float(np.mean(areas) / (size * size)) if areas else None,
            "own_vs_other_uniform": float(np.mean([a / (a + b) for a, b in both])) if both else None,
        },
        "ground_truth": truth,
        "per_layer": {name[len("layer:"):]: v for name, v in scored.items() if name.startswith("layer:")},
        "per_bucket": {name[len("bucket:"):]: v for name, v in scored.items() if name.startswith("bucket:")},
        "aggregate": agg,
        "method": {
            "tau": tau, "threshold": "map / max(map) >= tau", "aggregation":
            "bilinear upsampling of each layer's head-mean map to the image, summed over layers and steps",
            "buckets": "steps split in thirds: early, middle, late",
            "scored": "images where both prompted colours were segmented; tokens of both objects",
            "adherence": "both objects with the prompt's colour and shape; no other colour, and no second blob "
                         "of a named colour (regions of at least world.MIN_OBJECT_PIXELS pixels)",
        },
        "config": {"seed": seed, "cfg": cfg, "steps": steps, "prompts": [p["prompt"] for p in prompts],
                   "generation_seconds": round(gen_seconds, 2), "recorder": "probe (batched)" if batched
                   else "capture.recorder"},
        "images": [{"prompt": p["prompt"], "adherent": j["adherent"], "colours_found": j["colours_ok"],
                    "shapes": j["shapes"], "extra": j["extra"]} for p, j in zip(prompts, judged)],
    }
    return report


def summary(report: dict) -> dict:
    """The headline figures (and the best layer) of a report, for logs."""
    keys = ("adherence", "pointing", "miou", "own_vs_other", "shape_pointing", "shape_miou",
            "shape_own_vs_other", "n_scored_images")
    out = {k: (round(report[k], 4) if isinstance(report[k], float) else report[k]) for k in keys}
    out["buckets"] = {b: {k: _r(v["colour"][k2]) for k, k2 in (("pointing", "pointing"), ("miou", "miou"))}
                      | {"shape_pointing": _r(v["shape"]["pointing"])} for b, v in report["per_bucket"].items()}
    out.update({f"generation_{k}": _r(v) for k, v in report["generation"].items()})
    gt = report["ground_truth"]["aggregate"]
    out["true_masks"] = {"pointing": _r(gt["colour"]["pointing"]), "miou": _r(gt["colour"]["miou"]),
                         "own_vs_other": _r(gt["colour"]["own_vs_other"]), "shape_pointing": _r(gt["shape"]["pointing"])}
    out["layers"] = {name: [_r(v["colour"]["pointing"]), _r(v["colour"]["miou"]), _r(v["colour"]["own_vs_other"]),
                            _r(v["shape"]["pointing"])] for name, v in report["per_layer"].items()}
    return out


def _r(v):
    return None if v is None else round(float(v), 4)


def format_table(report: dict) -> str:
    """The printed table: aggregate, per layer, per bucket; colour and shape tokens."""
    def f(v):
        return "  -  " if v is None else f"{v:5.2f}"

    head = f"{'view':<48} {'c.point':>7} {'c.mIoU':>7} {'c.own':>7} {'s.point':>7} {'s.mIoU':>7} {'s.own':>7}"
    rows = [head, "-" * len(head)]

    def row(name, v):
        c, s = v["colour"], v["shape"]
        rows.append(f"{name:<48} {f(c['pointing']):>7} {f(c['miou']):>7} {f(c['own_vs_other']):>7} "
                    f"{f(s['pointing']):>7} {f(s['miou']):>7} {f(s['own_vs_other']):>7}")

    row("aggregate (all layers, all steps)", report["aggregate"])
    for name, v in report["per_layer"].items():
        row(name, v)
    for name, v in report["per_bucket"].items():
        row(f"steps: {name}", v)
    for t, v in report["ground_truth"]["per_timestep"].items():
        row(f"true masks, world images noised to t={t}", v)
    row("true masks, summed over those timesteps", report["ground_truth"]["aggregate"])
    g, c = report["generation"], report["chance"]
    rows += ["",
             f"adherence {report['adherence']:.2f}  (colours found {g['colours_found']:.2f}, shapes right "
             f"{g['shapes_right']:.2f}, extra objects {g['extra_objects']:.2f})",
             f"scored images {report['n_scored_images']} of {report['n_prompts']}; IoU threshold: map/max >= "
             f"{report['method']['tau']}; chance: pointing {f(c['pointing_uniform'])}, own-vs-other "
             f"{f(c['own_vs_other_uniform'])}"]
    return "\n".join(rows)


# --- CLI --------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffviz eval-attention",
                                description="score cross-attention maps against the toy world's ground truth")
    p.add_argument("--model", default=None, help="pipeline folder (default: the embedded toy-world model)")
    p.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS, help="number of held-out prompts (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="image i uses seed + i (default %(default)s)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--cfg", type=float, default=DEFAULT_CFG, help="guidance scale (default %(default)s)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--recorder", action="store_true",
                   help="record through capture.recorder, one prompt at a time (slower; the same maps as the default "
                        "batched probe, which a test checks)")
    p.add_argument("--random-weights", action="store_true",
                   help="control: same model with the UNet and text encoder re-initialised at random")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    prog = "diffviz eval-attention"
    if args.prompts < 1:
        print(f"{prog}: error: --prompts must be at least 1", file=sys.stderr)
        return 2
    if args.steps < 3:
        print(f"{prog}: error: --steps must be at least 3 (one per step bucket)", file=sys.stderr)
        return 2
    if not math.isfinite(args.cfg) or args.cfg < 0:
        print(f"{prog}: error: --cfg must be a non-negative number", file=sys.stderr)
        return 2
    if args.model is not None and not (Path(args.model) / "model_index.json").is_file():
        print(f"{prog}: error: --model {args.model} is not a pipeline folder (no model_index.json)", file=sys.stderr)
        return 2
    if args.report is not None:
        rp = Path(args.report)
        if rp.is_dir() or not rp.parent.is_dir():
            print(f"{prog}: error: --report {args.report}: not a writable file path", file=sys.stderr)
            return 2
    from capture.config import ConfigError
    from capture.pipeline import ModelLoadError, load_pipeline
    try:
        pipe = load_pipeline(args.model, device=args.device, dtype="float32")
    except (ConfigError, ModelLoadError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.random_weights:
        pipe = random_twin(pipe)
    report = evaluate(pipe, n_prompts=args.prompts, seed=args.seed, cfg=args.cfg, steps=args.steps,
                      batched=not args.recorder,
                      progress=lambda i, n: print(f"\r{i}/{n} prompts", end="", file=sys.stderr, flush=True))
    if args.recorder:
        print(file=sys.stderr)
    report["config"]["model"] = args.model or "default (toyworld)"
    report["config"]["random_weights"] = bool(args.random_weights)
    print(format_table(report))
    if args.report:
        tmp = Path(args.report).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(args.report)
        print(f"report written to {args.report}")
    return 0


def random_twin(pipe):
    """The control: a pipeline of the same shape whose UNet and text encoder are freshly random.

    Both are rebuilt from ``pipe``'s own configs, so the twin matches whatever model was loaded.
    The VAE, tokenizer and scheduler stay (they hold no attention); ``pipe`` itself is not changed.
    """
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel
    device = next(pipe.unet.parameters()).device
    torch.manual_seed(12345)
    unet = UNet2DConditionModel.from_config(pipe.unet.config).to(device)
    text_encoder = CLIPTextModel(pipe.text_encoder.config).to(device)
    twin = StableDiffusionPipeline(vae=pipe.vae, text_encoder=text_encoder, tokenizer=pipe.tokenizer,
                                   unet=unet, scheduler=pipe.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    twin.set_progress_bar_config(disable=True)
    return twin


if __name__ == "__main__":
    raise SystemExit(main())
