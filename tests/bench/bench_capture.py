"""Benchmark: the plain pipeline against the same pipeline with attention recording, in one process.

    python tests/bench/bench_capture.py                 # default model, CPU, quick-start settings
    python tests/bench/bench_capture.py --sd15          # full-size SD-1.5 UNet (random weights), 512², fp16, CUDA
    python tests/bench/bench_capture.py --sd15 --tiny-check   # the same code path, shrunk to run on a CPU
    python tests/bench/bench_capture.py --sdxl          # the tests' tiny SDXL pipeline (random weights), 64x128, CPU
    python tests/bench/bench_capture.py --sd3           # the tests' tiny SD3 / Flux pipelines, 64x96, CPU
    python tests/bench/bench_capture.py --flux
    python tests/bench/bench_capture.py --pixart        # the tests' tiny PixArt-Σ pipeline, 48x84 (binned to 192x336), CPU
    python tests/bench/bench_capture.py --families      # every tiny family above (and Qwen-Image, FLUX.2, SANA), one
                                                        # line each (CPU)
    python tests/bench/bench_capture.py --mmdit-size    # an SD3-medium-width MM-DiT (random weights, 4 blocks), 512², CPU
    python tests/bench/bench_capture.py --flux2-size    # FLUX.2's block structure at that width (3 blocks), 512², CPU
    python tests/bench/bench_capture.py --flux-size     # a Flux-size transformer (random weights), 1024², fp16, CUDA:
                                                        # one forward per step, plain vs recorded, with peak memory

Quick-start settings: 30 steps, cross maps at 32, self maps at 16, 12 layers (every layer the model has
when it has fewer). "recorded" runs the pipeline inside ``record_attention`` with the maps moved to the
CPU once per step (``callback_on_step_end``); previews, metrics and writing are not part of either side.
Runs alternate (plain, recorded, ...) after one warm-up each; the medians and their ratio are printed.
Targets: <= 1.3x on CPU (default model, tiny SD3/Flux), <= 1.10x on a GPU (SD-1.5, 12 layers),
<= 1.15x and peak memory <= 1.2x for the Flux-size transformer on a GPU (every block recorded).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from capture import families  # noqa: E402
from capture import pipeline as pipeline_mod  # noqa: E402
from capture.recorder import record_attention  # noqa: E402

PROMPT = "a red circle on the left and a blue square"


def sd15_pipeline(device: str, dtype: torch.dtype, tiny: bool):
    """SD-1.5's architecture from its published config, random weights, no download (tiny: shrunk widths)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from capture.toyworld.architecture import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 77
    widths = (32, 32, 64, 64) if tiny else (320, 640, 1280, 1280)
    text_dim = 32 if tiny else 768
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=widths,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=text_dim, attention_head_dim=8, norm_num_groups=32 if not tiny else 16,
            act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
            norm_eps=1e-5, center_input_sample=False)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=4 * text_dim,
            num_hidden_layers=2 if tiny else 12, num_attention_heads=4 if tiny else 12, max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=512, scaling_factor=0.18215,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 16, 32, 32) if tiny else (128, 256, 512, 512), layers_per_block=2,
            norm_num_groups=16 if tiny else 32)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed(pipe, *, steps: int, size: tuple[int, int], record: dict | None, device: str, collect: bool = True,
          output_type: str = "pil"):
    """(wall seconds, this process's CPU seconds, output) for one image. ``collect=False`` computes the maps
    on the device but never copies them (a diagnostic that separates compute from the per-step copy)."""
    kwargs = dict(num_inference_steps=steps, height=size[0], width=size[1], guidance_scale=7.5,
                  generator=torch.Generator("cpu").manual_seed(0), output_type=output_type)
    if type(pipe).__name__ in OWN_CALL:  # the call diffviz makes (Qwen-Image: true CFG, two calls a step)
        from capture.config import GenerateConfig

        family = families.for_pipeline(pipe)
        del kwargs["guidance_scale"]
        kwargs.update(family.pipeline_kwargs(GenerateConfig(prompt=PROMPT, cfg_scale=4.0), family.peek_pipe(pipe)))
        record = None if record is None else {**record, "prompt": PROMPT}
    elif hasattr(pipe, "transformer"):  # MM-DiT: the tiny T5's length, and the prompt whose tokens are stored
        kwargs["max_sequence_length"] = 16
        if type(pipe).__name__.startswith("PixArt"):
            kwargs["clean_caption"] = False
        record = None if record is None else {**record, "prompt": PROMPT}
    if device == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    if record is None:
        out = pipe(prompt=PROMPT, **kwargs).images
    else:
        with record_attention(pipe, height=size[0], width=size[1], **record) as rec:
            callback = rec.callback_on_step_end if collect else (lambda *a: {})
            out = pipe(prompt=PROMPT, **families.for_pipeline(pipe).callback_kwargs(callback), **kwargs).images
        assert not collect or (len(rec.steps) == steps and len(rec.steps[-1].cross) == len(rec.layers))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu, out


def forwards(model, inputs: dict, rec, steps: int) -> None:
    """``steps`` forwards of ``model`` on ``inputs``; with ``rec`` (an AttentionRecorder) installed and collected
    once per forward, as a pipeline's step callback would."""
    with torch.no_grad():
        if rec:
            rec.install()
        try:
            for _ in range(steps):
                model(**inputs, return_dict=False)
                if rec:
                    rec.collect()
        finally:
            if rec:
                rec.remove()


def flux_size(args) -> int:
    """Flux-dev's transformer shape (19 double + 38 single blocks, 24 heads of 128, T5 512) with random
    weights, called once per "step" on fixed inputs: plain, then with every block recorded."""
    from diffusers import FluxTransformer2DModel

    from capture.joint import plan_joint_layers
    from capture.recorder import AttentionRecorder

    tiny = args.tiny_check
    device = args.device or ("cpu" if tiny else "cuda")
    dtype = torch.float32 if device == "cpu" else torch.float16
    shape = dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]) if tiny else \
        dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
             joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=[16, 56, 56], guidance_embeds=True)
    side, text = (16, 16) if tiny else (64, 512)  # image tokens per side (1024 / 8 / 2), T5 length
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(in_channels=64, **shape).to(dtype).eval()
        axis = torch.arange(float(side))
        ids = torch.stack(torch.meshgrid(torch.zeros(1), axis, axis, indexing="ij"), -1)
        inputs = dict(hidden_states=torch.randn(1, side * side, 64, dtype=dtype),
                      encoder_hidden_states=torch.randn(1, text, shape["joint_attention_dim"], dtype=dtype),
                      pooled_projections=torch.randn(1, shape["pooled_projection_dim"], dtype=dtype),
                      timestep=torch.tensor([0.5], dtype=dtype), img_ids=ids.reshape(-1, 3).to(dtype),
                      txt_ids=torch.zeros(text, 3, dtype=dtype),
                      guidance=torch.tensor([3.5], dtype=dtype) if shape.get("guidance_embeds") else None)
    plans, _ = plan_joint_layers(model, (side, side), resolution=32, self_resolution=16)
    positions = list(range(12))  # a 12-token prompt at the start of the T5 sequence
    steps, repeats = (2, 2) if tiny else (4, 3)

    def run(recorded: bool) -> tuple[float, int]:
        rec = AttentionRecorder(model, plans, context_length=text, positions=positions, image_first=False) if recorded else None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        forwards(model, inputs, rec, steps)
        if device == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
        return (time.perf_counter() - start) / steps, peak

    run(False), run(True)  # warm-up
    plain, recorded = [], []
    for _ in range(repeats):
        plain.append(run(False))
        recorded.append(run(True))
    mp, mr = statistics.median(t for t, _ in plain), statistics.median(t for t, _ in recorded)
    print(f"Flux-size transformer{' (tiny check)' if tiny else ''}, random weights, {side * side} image + {text} "
          f"text tokens, {str(dtype)[6:]}, {device}: {len(plans)} recorded blocks, median of {repeats}")
    print(f"plain            : {mp:.3f} s/step")
    print(f"with recording   : {mr:.3f} s/step")
    print(f"ratio            : {mr / mp:.3f}x  (target <= 1.15x)")
    if device == "cuda":
        pp, pr = max(m for _, m in plain), max(m for _, m in recorded)
        print(f"peak memory      : {pp / 2**30:.2f} GiB plain, {pr / 2**30:.2f} GiB recorded, ratio {pr / pp:.3f}x "
              f"(target <= 1.2x)")
    return 0


TINY = {"sdxl": ("build_sdxl", (64, 128)), "sd3": ("build_sd3", (64, 96)), "flux": ("build_flux", (64, 96)),
        "pixart": ("build_pixart", (48, 84)),
        # tests/tiny_families.py; SANA's 384x640 is one of its 512-px bins (12x20 tokens)
        "qwen_image": ("build_qwen_image", (64, 96)), "flux2": ("build_flux2", (64, 96)), "sana": ("build_sana", (384, 640))}
#: pipelines timed with the keywords their family's generate passes (not the older families' fixed ones)
OWN_CALL = {"QwenImagePipeline", "Flux2Pipeline", "SanaPipeline"}


def tiny_pipe(name: str, device: str):
    """One of the tests' tiny random-weight pipelines, saved and loaded as a folder; (pipe, size)."""
    from tests import tiny_families, tiny_pipelines

    builder, size = TINY[name]
    module = tiny_pipelines if hasattr(tiny_pipelines, builder) else tiny_families
    folder = getattr(module, builder)(Path(tempfile.mkdtemp()) / f"tiny-{name}")
    return pipeline_mod.load_pipeline(str(folder), device), size


def families_ratios(args) -> int:
    """The recorded/plain ratio of each family's tiny pipeline (and the default toy model), CPU time, 12 layers."""
    steps, repeats = args.steps or 10, args.repeats or 5
    record = dict(max_layers=args.max_layers, resolution=32, self_resolution=16)
    print(f"recorded / plain per family, {steps} steps, median of {repeats} (process CPU time, wall in brackets)")
    for name in args.only.split(",") if args.only else ["toy", "toy-mmdit", *TINY]:
        if name == "toy":
            pipe = pipeline_mod.load_pipeline(None, "cpu")
            size = pipeline_mod.native_size(pipe)
        elif name == "toy-mmdit":
            pipe = pipeline_mod.load_pipeline("toyworld-mmdit", "cpu")
            size = (32, 32)
        else:
            pipe, size = tiny_pipe(name, "cpu")
        timed(pipe, steps=steps, size=size, record=None, device="cpu")
        timed(pipe, steps=steps, size=size, record=record, device="cpu")
        plain, recorded = [], []
        for _ in range(repeats):
            plain.append(timed(pipe, steps=steps, size=size, record=None, device="cpu")[:2])
            recorded.append(timed(pipe, steps=steps, size=size, record=record, device="cpu")[:2])
        wp, wr = (statistics.median(t for t, _ in runs) for runs in (plain, recorded))
        cp, cr = (statistics.median(c for _, c in runs) for runs in (plain, recorded))
        print(f"{name:10s}: {cr / cp:.3f}x cpu ({cp:.3f} s -> {cr:.3f} s)  [{wr / wp:.3f}x wall]  (target <= 1.3x)")
    return 0


def mmdit_size(args) -> int:
    """SD3-medium's transformer width (24 heads of 64, joint dim 4096, T5 256 + CLIP 77) at reduced depth, random
    weights, one forward per step on fixed inputs at 512² (32x32 image tokens with patch 2), plain and recorded."""
    from diffusers import SD3Transformer2DModel

    from capture.joint import plan_joint_layers
    from capture.recorder import AttentionRecorder

    depth = 4
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=64, patch_size=2, in_channels=16, num_layers=depth, attention_head_dim=64,
                                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=96).eval()
    text = 77 + 256
    inputs = dict(hidden_states=torch.randn(2, 16, 64, 64), encoder_hidden_states=torch.randn(2, text, 4096),
                  pooled_projections=torch.randn(2, 2048), timestep=torch.tensor([500.0, 500.0]))
    plans, _ = plan_joint_layers(model, (32, 32), resolution=32, self_resolution=16)
    label = (f"SD3-medium-width MM-DiT, {depth} blocks, random weights, 1024 image + {text} text tokens, CFG batch 2, "
             f"float32, cpu: {len(plans)} recorded blocks")
    return forward_ratio(args, label, model, inputs, lambda: AttentionRecorder(
        model, plans, context_length=text, positions=list(range(12)), image_first=True))


def flux2_size(args) -> int:
    """FLUX.2's block structure and head size (heads of 128, parallel single-stream blocks, 512 text slots, no CFG
    batch) at SD3-medium's width (12 heads: 1536) and reduced depth (1 double + 2 single blocks), random weights, one
    forward per step on fixed inputs at 512² (32x32 image tokens), plain and recorded (the prompt's 12 tokens)."""
    from diffusers import Flux2Transformer2DModel

    from capture.joint import plan_joint_layers
    from capture.recorder import AttentionRecorder

    torch.manual_seed(0)
    model = Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=1, num_single_layers=2,
                                    attention_head_dim=128, num_attention_heads=12, joint_attention_dim=3 * 1536,
                                    axes_dims_rope=(32, 32, 32, 32)).eval()
    text, side = 512, 32
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros(side * side), rows.flatten(), cols.flatten(), torch.zeros(side * side)], -1)
    txt_ids = torch.stack([torch.zeros(text), torch.zeros(text), torch.zeros(text), torch.arange(text)], -1)
    inputs = dict(hidden_states=torch.randn(1, side * side, 128), encoder_hidden_states=torch.randn(1, text, 3 * 1536),
                  timestep=torch.tensor([0.5]), guidance=torch.tensor([4.0]), img_ids=img_ids, txt_ids=txt_ids)
    plans, _ = plan_joint_layers(model, (side, side), resolution=32, self_resolution=16)
    label = (f"FLUX.2-structure transformer at width 1536, 1 double + 2 single blocks, random weights, "
             f"{side * side} image + {text} text tokens, batch 1, float32, cpu: {len(plans)} recorded blocks")
    return forward_ratio(args, label, model, inputs, lambda: AttentionRecorder(
        model, plans, context_length=text, positions=list(range(31, 43)), image_first=False))


def forward_ratio(args, label: str, model, inputs: dict, recorder) -> int:
    """Median per-step time of ``model(**inputs)``, plain and with ``recorder()`` installed, alternating."""
    steps, repeats = args.steps or 3, args.repeats or 3

    def run(recorded: bool) -> tuple[float, float]:
        rec = recorder() if recorded else None
        start, cpu = time.perf_counter(), time.process_time()
        forwards(model, inputs, rec, steps)
        return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps

    run(False), run(True)
    plain, recorded = [], []
    for _ in range(repeats):
        plain.append(run(False))
        recorded.append(run(True))
    wp, wr = (statistics.median(t for t, _ in r) for r in (plain, recorded))
    cp, cr = (statistics.median(c for _, c in r) for r in (plain, recorded))
    print(f"{label}, median of {repeats}")
    print(f"plain            : {wp:.3f} s/step  ({cp:.3f} s CPU)")
    print(f"with recording   : {wr:.3f} s/step  ({cr:.3f} s CPU)")
    print(f"ratio            : {cr / cp:.3f}x cpu, {wr / wp:.3f}x wall  (target <= 1.3x)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sd15", action="store_true", help="full-size SD-1.5 UNet, random weights (needs CUDA)")
    p.add_argument("--sdxl", action="store_true", help="the tests' tiny random-weight SDXL pipeline, 64x128 (CPU)")
    p.add_argument("--sd3", action="store_true", help="the tests' tiny random-weight SD3 pipeline, 64x96 (CPU)")
    p.add_argument("--flux", action="store_true", help="the tests' tiny random-weight Flux pipeline, 64x96 (CPU)")
    p.add_argument("--pixart", action="store_true", help="the tests' tiny random-weight PixArt-Σ pipeline (CPU)")
    p.add_argument("--families", action="store_true", help="every tiny family, the recorded/plain ratio of each (CPU)")
    p.add_argument("--only", default="", help="with --families: these families only (comma-separated: toy, "
                                              f"toy-mmdit, {', '.join(TINY)})")
    p.add_argument("--mmdit-size", action="store_true",
                   help="an SD3-medium-width MM-DiT transformer (random weights, reduced depth), 512², CPU")
    p.add_argument("--flux2-size", action="store_true",
                   help="FLUX.2's block structure at SD3-medium width (random weights, 3 blocks), 512², CPU")
    p.add_argument("--flux-size", action="store_true",
                   help="a Flux-size transformer, random weights, 1024², fp16 (CUDA; --tiny-check shrinks it for a CPU)")
    p.add_argument("--tiny-check", action="store_true", help="with --sd15: shrink it to smoke-test the code path on a CPU")
    p.add_argument("--device", default=None, help="default: cpu, or cuda with --sd15 (cpu with --tiny-check)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per side (default 5; 2 with --tiny-check)")
    p.add_argument("--steps", type=int, default=None, help="default 30 (2 with --tiny-check)")
    p.add_argument("--max-layers", type=int, default=12)
    p.add_argument("--threads", type=int, default=None, help="torch threads (a shared CPU gives steadier ratios at 1)")
    p.add_argument("--with-generate", action="store_true", help="also time one full generate() (previews, metrics, writing)")
    p.add_argument("--diagnose", action="store_true",
                   help="also time recording without the per-step copy, and check that outputs are identical")
    p.add_argument("--profile", action="store_true", help="profile one plain and one recorded image (torch.profiler)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.flux_size:
        return flux_size(args)
    if args.mmdit_size:
        return mmdit_size(args)
    if args.flux2_size:
        return flux2_size(args)
    if args.families:
        return families_ratios(args)
    tiny = args.sd15 and args.tiny_check
    device = args.device or ("cuda" if args.sd15 and not tiny else "cpu")
    steps = args.steps or (2 if tiny else 30)
    repeats = args.repeats or (2 if tiny else 5)
    record = dict(max_layers=args.max_layers, resolution=32, self_resolution=16)
    if args.sd15:
        dtype = torch.float16 if device == "cuda" else torch.float32
        pipe = sd15_pipeline(device, dtype, tiny)
        size = (128, 128) if tiny else (512, 512)
        label = f"SD-1.5 UNet{' (tiny check)' if tiny else ''}, random weights, {size[0]}x{size[1]}, {str(dtype)[6:]}, {device}"
    elif args.sdxl:
        from tests.tiny_pipelines import build_sdxl

        folder = build_sdxl(Path(tempfile.mkdtemp()) / "tiny-sdxl")
        pipe = pipeline_mod.load_pipeline(str(folder), device)
        size = (64, 128)
        label = f"tiny SDXL, random weights, 64x128, {pipe.unet.dtype}, {device}, {torch.get_num_threads()} threads"
    elif args.pixart:
        pipe, size = tiny_pipe("pixart", device)
        label = f"tiny pixart, random weights, 48x84 (binned to 192x336), {pipe.transformer.dtype}, {device}"
    elif args.sd3 or args.flux:
        from tests.tiny_pipelines import build_flux, build_sd3

        name = "sd3" if args.sd3 else "flux"
        folder = (build_sd3 if args.sd3 else build_flux)(Path(tempfile.mkdtemp()) / f"tiny-{name}")
        pipe = pipeline_mod.load_pipeline(str(folder), device)
        size = (64, 96)
        label = f"tiny {name}, random weights, 64x96, {pipe.transformer.dtype}, {device}, {torch.get_num_threads()} threads"
    else:
        pipe = pipeline_mod.load_pipeline(None, device)
        size = pipeline_mod.native_size(pipe)
        label = f"default model, {size[0]}x{size[1]}, {pipe.unet.dtype}, {device}, {torch.get_num_threads()} threads"
    with record_attention(pipe, height=size[0], width=size[1], prompt=PROMPT, **record) as rec:
        layers = [plan.name for plan in rec.layers]
    print(f"{label}: {steps} steps, {len(layers)} recorded layers, cross 32, self 16, median of {repeats}")

    timed(pipe, steps=steps, size=size, record=None, device=device)  # warm-up both paths
    timed(pipe, steps=steps, size=size, record=record, device=device)
    plain, recorded, nocopy = [], [], []
    for _ in range(repeats):
        plain.append(timed(pipe, steps=steps, size=size, record=None, device=device)[:2])
        recorded.append(timed(pipe, steps=steps, size=size, record=record, device=device)[:2])
        if args.diagnose:
            nocopy.append(timed(pipe, steps=steps, size=size, record=record, device=device, collect=False)[:2])
    mp, mr = (statistics.median(t for t, _ in runs) for runs in (plain, recorded))
    cp, cr = (statistics.median(c for _, c in runs) for runs in (plain, recorded))
    print(f"plain pipeline   : {mp:.3f} s/image  ({', '.join(f'{t:.3f}' for t, _ in plain)})")
    print(f"with recording   : {mr:.3f} s/image  ({', '.join(f'{t:.3f}' for t, _ in recorded)})")
    if nocopy:
        mn = statistics.median(t for t, _ in nocopy)
        print(f"maps not copied  : {mn:.3f} s/image  (diagnostic: recording compute only, ratio {mn / mp:.3f}x)")
    target = 1.10 if device == "cuda" else 1.3
    print(f"ratio            : {mr / mp:.3f}x  (target <= {target}x)")
    if device == "cpu":  # CPU time is steadier than wall time on a shared machine
        print(f"cpu-time ratio   : {cr / cp:.3f}x  ({cp:.3f} s vs {cr:.3f} s of process CPU time per image)")

    if args.diagnose:  # recording must not change the output (on a GPU too)
        a = timed(pipe, steps=steps, size=size, record=None, device=device, output_type="latent")[2]
        b = timed(pipe, steps=steps, size=size, record=None, device=device, output_type="latent")[2]
        c = timed(pipe, steps=steps, size=size, record=record, device=device, output_type="latent")[2]
        print(f"final latents: plain == plain {torch.equal(a, b)}, plain == recorded {torch.equal(a, c)}, "
              f"max |diff| {(a.float() - c.float()).abs().max().item():.3g}, finite {bool(torch.isfinite(c).all())}")

    if args.diagnose and device == "cuda":  # which fused SDPA kernels take a pooling matrix as the value
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q = torch.randn(1, 8, 4096, 40, device=device, dtype=torch.float16)
        for cells in (256, 64):
            v = torch.rand(1, 8, 4096, cells, device=device, dtype=torch.float16)
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                            SDPBackend.MATH):
                try:
                    with sdpa_kernel([backend]):
                        torch.nn.functional.scaled_dot_product_attention(q, q, v)
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        for _ in range(20):
                            torch.nn.functional.scaled_dot_product_attention(q, q, v)
                        torch.cuda.synchronize()
                    print(f"sdpa 64x64 self map -> {cells} cells, {backend.name}: {(time.perf_counter() - t0) / 20 * 1e3:.3f} ms")
                except RuntimeError as exc:
                    print(f"sdpa 64x64 self map -> {cells} cells, {backend.name}: unavailable ({str(exc).splitlines()[0][:80]})")

    if args.profile:  # where the extra host time goes: launches and the busiest ops, plain vs recorded
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        for name, rec in (("plain", None), ("recorded", record)):
            with profile(activities=activities) as prof:
                timed(pipe, steps=steps, size=size, record=rec, device=device)
            events = prof.key_averages()
            launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
            syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key == "cudaMemcpyAsync")
            print(f"profile {name}: {launches / steps:.0f} kernel launches/step, {syncs} syncs+copies")
            print(events.table(sort_by="self_cuda_time_total" if device == "cuda" else "self_cpu_time_total",
                               row_limit=14, max_name_column_width=40))

    if args.with_generate:  # the whole capture: previews, metrics, streaming to disk, strict validation
        from capture.config import GenerateConfig
        from capture.run import generate
        from export.contract import dataset_bytes
        from export.validate import validate_run

        with tempfile.TemporaryDirectory() as tmp:
            config = GenerateConfig(prompt=PROMPT, num_steps=steps, max_layers=args.max_layers, device=device,
                                    height=size[0], width=size[1], output_dir=str(Path(tmp) / "run"), max_dataset_mb=1000)
            start = time.perf_counter()
            path = generate(config, pipeline=pipe)
            took = time.perf_counter() - start
            problems = validate_run(path, strict=True)
            print(f"full generate()  : {took:.3f} s for {steps} steps ({took / mp:.2f}x the plain pipeline), "
                  f"{dataset_bytes(path) / 1e6:.1f} MB, strict validation: {problems or 'ok'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
