"""Train the toy-world model: ``diffviz train-toyworld``.

Three stages, one script, the same code path on CPU and GPU:

1. **VAE** (``--vae-steps``): the tiny ``AutoencoderKL`` of ``architecture`` learns to
   reconstruct world images (MSE + a small KL), then its decoder is hardened on noisy latents
   (``harden_decoder``). Its latent scale is measured and written into the config
   (``scaling_factor = 1 / std``), as Stable Diffusion does.
2. **UNet + text encoder**, jointly, on the frozen VAE's latents: epsilon prediction
   (``--prediction v_prediction`` for v) with min-SNR-5 weighting, 10 % empty captions
   (``--p-empty``, for classifier-free guidance), EMA weights that average most of the run
   (``ema_decay_at``, ``--ema-warmup``; ``--ema-also`` keeps other averages to compare),
   and — with ``--ground-weight`` > 0 — a *grounding loss* on the cross-attention maps
   (``grounding_loss``): every content word (colour, shape, size, side) of a caption
   should put its attention on its own object's mask, all of it and evenly. The maps it
   trains are the maps the model uses, computed by ``probe.ProbeProcessor`` (equal to
   ``AttnProcessor2_0``).
3. **Decoder adaptation** (``--decoder-adapt-steps``, ``adapt_decoder``): the decoder alone
   learns to map the latents the trained UNet actually samples back to the true images, so the
   UNet's slightly rounded squares decode as squares. ``--adapt-decoder-of FOLDER`` runs only
   this stage on a trained folder, with the same result as the one command.

Scenes are drawn fresh every step from ``world`` (batch k comes from seed (seed, k), so the
data stream does not depend on the number of loader workers), mostly two-object scenes
(``TRAIN_COUNTS``). ``--time-budget`` picks the step count from the measured speed of steps
inside the LR warm-up (whose learning rates do not depend on the total) and logs it;
``--steps N`` repeats that run, on any device, without the timing. The defaults are the
shipped model's recipe, which is sized for this project's 2-core CPU: VAE 450 steps of
batch 64 and 200 steps of decoder hardening, then 1925 UNet steps of batch 128 at lr 1e-3,
one causal text layer, grounding weight 0.1, EMA warm-up 4, then 300 steps of decoder
adaptation on 2560 sampled latents. ``diffviz train-toyworld --device cpu --threads 2`` ran it
in 49 minutes there on a slow day, about 43 at the speed the first two stages ran the time before
(``training.json`` has the measured times and the variants tried). On a GPU the same code runs
under bf16 autocast.

The result is a complete ``StableDiffusionPipeline`` folder (fp16 safetensors) saved with
``save_pretrained``; ``training.json`` beside ``model_index.json`` records how it was made.
A single-file checkpoint (``--checkpoint``) holds all weights plus that record, and
``--from-checkpoint`` turns one into a pipeline folder.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.utils.data as tud
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import world

DEFAULT_OUT = "toyworld-model"
#: UNet steps of the shipped model (chosen by --time-budget 2100 on the 2-core CPU); the other defaults are its recipe too.
SHIPPED_STEPS = 1925
ROLE_COUNT = len(world.ROLE_NAMES)
#: Probabilities of one, two and three objects per training scene: mostly two, the case
#: that prompt adherence and own-vs-other are scored on.
TRAIN_COUNTS = (0.2, 0.6, 0.2)


# --- data -------------------------------------------------------------------------------------

class WorldStream(tud.IterableDataset):
    """An endless, seeded stream of training batches; with loader workers, worker w makes batches w, w+W, …"""

    def __init__(self, seed: int, batch: int, word_ids: dict, bos: int, eos: int, length: int,
                 p_empty: float = 0.1, start: int = 0):
        self.seed, self.batch, self.word_ids = seed, batch, word_ids
        self.bos, self.eos, self.length = bos, eos, length
        self.p_empty, self.start = p_empty, start

    def make(self, k: int) -> dict:
        rng = np.random.default_rng([self.seed, k])
        b = world.make_batch(rng, self.batch, counts=TRAIN_COUNTS)
        if not self.word_ids:  # images only (the VAE stage)
            return {"images": b.images}
        words = [[] if rng.random() < self.p_empty else w for w in b.words]
        ids = world.encode_words(words, self.word_ids, self.bos, self.eos, self.length)
        tok = np.where(b.roles >= 0, b.roles + 1, -1)  # word index -> token index (after BOS)
        tok[np.array([len(w) == 0 for w in words])] = -1
        return {"images": b.images, "masks": b.masks, "ids": ids, "tokens": tok}

    def __iter__(self):
        k, stride = self.start, 1
        info = tud.get_worker_info()
        if info is not None:
            k, stride = self.start + info.id, info.num_workers
        while True:
            yield self.make(k)
            k += stride


def _identity(batch):
    return batch


def batches(stream: WorldStream, workers: int):
    """Iterate the stream, with ``workers`` loader processes (0: in this process). Same batches either way."""
    if workers <= 0:
        return iter(stream)
    return iter(tud.DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4,
                               collate_fn=_identity))


def token_table(tokenizer) -> tuple[dict, int, int, int]:
    """word -> id, BOS, EOS, context length, read from the tokenizer (one token per grammar word)."""
    ids = {}
    for w in tokenizer_words(tokenizer):
        enc = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ValueError(f"grammar word {w!r} is not a single token")
        ids[w] = enc[0]
    return ids, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.model_max_length


def tokenizer_words(tokenizer) -> list[str]:
    from .architecture import DEFAULT_WORDS
    return list(DEFAULT_WORDS)


# --- helpers ----------------------------------------------------------------------------------

def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this torch sees no CUDA device (use --device cpu or auto)")
    return name


def to_pixels(images, device):
    """uint8 [B, H, W, 3] -> float [-1, 1] [B, 3, H, W]."""
    x = torch.as_tensor(images, device=device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


class Logger:
    def __init__(self, path: str | None, quiet: bool = False):
        self.path, self.quiet = path, quiet
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, **record) -> None:
        record = {"time": round(time.time(), 1), **record}
        line = json.dumps(record)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        if not self.quiet:
            print(line, flush=True)


def lr_at(step: int, total: int, base: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from ``base`` down to ``floor * base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def ema_decay_at(step: int, cap: float, warmup: float) -> float:
    """EMA decay after optimiser step ``step`` (0-based): ``min(cap, (1 + step) / (warmup + step))``.

    ``warmup`` (K) sets how much of the run the average spans: iterate j ends up weighted about
    ∝ j^(K - 2). K = 10, diffusers' ``EMAModel`` warm-up, puts 61 % of the weight on the last
    10 % of the run; K = 4 (the shipped recipe) weights j ∝ j², 7/8 of it on the second half;
    K = 2 is the plain mean of all iterates.
    """
    return min(cap, (1 + step) / (warmup + step))


# --- stage 1: VAE -----------------------------------------------------------------------------

def train_vae(vae, *, steps: int, batch: int, lr: float, seed: int, device: str, log: Logger,
              kl_weight: float = 1e-5, workers: int = 0) -> None:
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(seed)
    t0 = time.time()
    stream = WorldStream(seed + 1000, batch, {}, 0, 0, 16, p_empty=0.0)
    it = batches(stream, workers)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=100)
        x = to_pixels(next(it)["images"], device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen, device=device)
        rec = vae.decode(z).sample
        mse = torch.mean((rec - x) ** 2)
        kl = post.kl().mean() / z[0].numel()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(stage="vae", step=step, mse=round(mse.item(), 5), kl=round(kl.item(), 4), elapsed=round(time.time() - t0, 1))
    vae.eval()


def _tune_decoder(vae, *, steps: int, lr: float, device: str, log: Logger, stage: str, batch_at) -> None:
    """Fine-tune the decoder alone to MSE, the encoder (so every latent the UNet learns) fixed.

    ``batch_at(step)`` gives (latents, target images in [-1, 1]).
    """
    vae.to(device).train().requires_grad_(True)
    for module in (vae.encoder, vae.quant_conv):
        module.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=20)
        z, x = batch_at(step)
        mse = torch.mean((vae.decode(z).sample - x) ** 2)
        opt.zero_grad(set_to_none=True)
        mse.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(stage=stage, step=step, mse=round(mse.item(), 5), elapsed=round(time.time() - t0, 1))
    vae.requires_grad_(True)
    vae.eval()


def _jitter(z: torch.Tensor, noise: float, std, gen: torch.Generator) -> torch.Tensor:
    """``z`` plus Gaussian noise whose std, per item, is drawn from U(0, ``noise``) times ``std``."""
    sigma = torch.rand((z.shape[0], 1, 1, 1), generator=gen, device=z.device) * noise * std
    return z + sigma * torch.randn(z.shape, generator=gen, device=z.device)


def harden_decoder(vae, *, steps: int, batch: int, lr: float, seed: int, device: str, log: Logger,
                   noise: float = 0.3) -> None:
    """Fine-tune the decoder alone on noisy latents, so that it decodes *near* latents to clean shapes.

    The encoder (so every latent the UNet will learn) stays fixed. Each image's latent gets
    Gaussian noise of a standard deviation drawn from U(0, ``noise``) in units of the latent's
    own std: the UNet's samples are never exact, and a decoder that has only seen exact
    latents draws their small errors as dents in a square's sides.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    it = iter(WorldStream(seed + 3000, batch, {}, 0, 0, 16, p_empty=0.0))
    std = None

    def batch_at(step):
        nonlocal std
        x = to_pixels(next(it)["images"], device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        std = z.std().item() if std is None else std
        return _jitter(z, noise, std, gen), x

    _tune_decoder(vae, steps=steps, lr=lr, device=device, log=log, stage="vae-harden", batch_at=batch_at)


def adapt_decoder(pipe, *, pairs: int, steps: int, batch: int, lr: float, seed: int, device: str, log: Logger,
                  strength: tuple[float, float] = (0.1, 0.4), cfg: float = 7.5, noise: float = 0.3) -> dict:
    """Fine-tune the decoder alone on the trained UNet's own latents, after the UNet stage.

    The UNet's squares come out with sloped sides and cut corners (fill ratio 0.85-0.9), and
    sampling does that even to true squares: world images noised to t = 300 and sampled back
    (DDIM, guidance 7.5) keep their colours and places but lose 38 of 77 squares. So ``pairs``
    world images (whole batches of up to 128) are noised to a strength drawn from U(``strength``)
    (one per batch) and sampled back with their true captions by ``StableDiffusionImg2ImgPipeline``,
    and the decoder learns to map those latents to the *true* image. Half of every batch is true
    latents with noise, as in ``harden_decoder``, so exact latents still decode exactly. From
    these low strengths the scene is still the source scene, which is why this works where
    decoding samples from t in [300, 900] (the scene no longer the source) taught the decoder to blur.
    """
    from diffusers import StableDiffusionImg2ImgPipeline

    word_ids, bos, eos, length = token_table(pipe.tokenizer)
    gen_batch = min(128, pairs)
    pipe.to(device)
    stream = WorldStream(seed + 4000, gen_batch, word_ids, bos, eos, length, p_empty=0.0)
    rng = np.random.default_rng(seed + 4000)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    sf = pipe.vae.config.scaling_factor
    t0 = time.time()
    latents, images = [], []
    with torch.no_grad():
        empty = torch.as_tensor(world.encode_words([[]] * gen_batch, word_ids, bos, eos, length), device=device)
        negative = pipe.text_encoder(empty)[0]
        for k in range(-(-pairs // gen_batch)):
            data = stream.make(k)
            x = to_pixels(data["images"], device)
            embeds = pipe.text_encoder(torch.as_tensor(data["ids"], device=device))[0]
            out = img2img(prompt_embeds=embeds, negative_prompt_embeds=negative, image=(x + 1) / 2,
                          strength=float(rng.uniform(*strength)), num_inference_steps=30, guidance_scale=cfg,
                          output_type="latent", generator=torch.Generator(device=device).manual_seed(seed + 4000 + k))
            latents.append(out.images / sf)
            images.append(x)
    latents, images = torch.cat(latents), torch.cat(images)
    made = round(time.time() - t0, 1)
    log(stage="decoder-adapt", event="pairs made", pairs=len(latents), elapsed=made)
    vae = pipe.vae
    gen = torch.Generator(device=device).manual_seed(seed + 4000)
    half = batch // 2

    def batch_at(step):
        idx = torch.randint(0, len(latents), (batch,), generator=gen, device=device)
        z, x = latents[idx], images[idx]
        with torch.no_grad():
            true = vae.encode(x[:half]).latent_dist.mean
            true = _jitter(true, noise, true.std(), gen)
        return torch.cat([z[half:], true]), torch.cat([x[half:], x[:half]])

    _tune_decoder(vae, steps=steps, lr=lr, device=device, log=log, stage="decoder-adapt", batch_at=batch_at)
    return {"pairs": len(latents), "steps": steps, "batch": batch, "lr": lr, "strength": list(strength), "cfg": cfg,
            "seconds": round(time.time() - t0, 1), "pairs_seconds": made}


def measure_vae(vae, *, seed: int, device: str, n: int = 256) -> dict:
    """Latent std (-> scaling factor) and how well reconstructions segment back to the true masks."""
    rng = np.random.default_rng(seed)
    b = world.make_batch(rng, n)
    with torch.no_grad():
        x = to_pixels(b.images, device)
        z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
    img = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    ious = []
    for i in range(n):
        seg = world.segment(img[i])
        for s in range(int(b.scenes.count[i])):
            m = seg.get(world.COLOUR_NAMES[b.scenes.colour[i, s]])
            gt = b.masks[i, s]
            ious.append(0.0 if m is None else float((m & gt).sum() / (m | gt).sum()))
    return {"latent_std": float(z.std().item()), "latent_mean": float(z.mean().item()),
            "recon_mse": float(torch.mean((rec - x) ** 2).item()), "recon_mask_iou": float(np.mean(ious))}


# --- stage 2: UNet + text encoder -------------------------------------------------------------

def grounding_loss(maps: dict, masks: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean over layers and content words of ``(1 - share)^2 + tv``: the word's map should sit on its object.

    * ``share``: the fraction of the word's attention mass inside its own object's mask
      (TokenCompose's token loss, Wang et al. 2024). It is 1 for a map that is only a dot
      at the object's centre, so on its own it leaves maps peaked, and a map thresholded at
      a fraction of its maximum then covers only the middle of the object.
    * ``tv``: the total-variation distance between the word's map, normalised to sum to 1,
      and the object's mask, normalised the same way. It is 0 only for a map that is flat
      over the whole object and 0 elsewhere — the map that a threshold cuts out exactly.

    ``maps``: layer -> [B, r*r, K] head-mean probabilities; ``masks``: [B, 3, 32, 32] float
    (average-pooled to each layer's grid); ``tokens``: [B, 3, 4] token index of each object's
    words (-1 absent).
    """
    import torch.nn.functional as F
    b = tokens.shape[0]
    pos = tokens.reshape(b, -1)                       # [B, 12]
    valid = (pos >= 0).float()
    obj = torch.arange(tokens.shape[1], device=pos.device).repeat_interleave(tokens.shape[2])
    if valid.sum() == 0:
        return torch.zeros((), device=pos.device)
    total = 0.0
    pooled: dict[int, torch.Tensor] = {}
    for probs in maps.values():
        hw = probs.shape[1]
        r = int(round(math.sqrt(hw)))
        if r not in pooled:
            pooled[r] = F.adaptive_avg_pool2d(masks, r).reshape(b, masks.shape[1], hw)
        m = pooled[r][:, obj]                          # [B, 12, HW]
        idx = pos.clamp(min=0).unsqueeze(1).expand(b, hw, pos.shape[1])
        a = torch.gather(probs.float(), 2, idx).transpose(1, 2)   # [B, 12, HW]
        mass = a.sum(-1) + 1e-8
        share = (a * m).sum(-1) / mass
        tv = 0.5 * (a / mass.unsqueeze(-1) - m / (m.sum(-1, keepdim=True) + 1e-8)).abs().sum(-1)
        total = total + ((((1.0 - share) ** 2) + tv) * valid).sum() / valid.sum()
    return total / len(maps)


def train_unet(pipe, *, steps: int | None, time_budget: float | None, batch: int, lr: float, seed: int,
               device: str, log: Logger, ground_weight: float = 0.0, ema_decay: float = 0.999,
               ema_warmup: float = 4.0, ema_also: tuple[float, ...] = (), p_empty: float = 0.1,
               lr_floor: float = 0.1, workers: int = 0, checkpoint: str | None = None,
               checkpoint_every: float = 60.0,
               record: dict | None = None, warmup: int = 200, min_snr: float = 5.0,
               hard_stop: float | None = None, probe_steps: int = 150) -> dict:
    from . import probe

    unet, te, vae, sched = pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler
    for m in (unet, te, vae):
        m.to(device)
    vae.eval().requires_grad_(False)
    unet.train()
    te.train()
    store = probe.ProbeStore(enabled=ground_weight > 0)
    if ground_weight > 0:
        probe.install(unet, store)
    params = [p for p in list(unet.parameters()) + list(te.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    # --ema-also: more averages of the same run, with other warm-ups, to choose K after training.
    also = {k: [p.detach().clone() for p in params] for k in ema_also}
    word_ids, bos, eos, length = token_table(pipe.tokenizer)
    stream = WorldStream(seed, batch, word_ids, bos, eos, length, p_empty=p_empty)
    gen = torch.Generator(device=device).manual_seed(seed)
    alphas = sched.alphas_cumprod.to(device)
    snr_all = alphas / (1 - alphas)
    velocity = sched.config.prediction_type == "v_prediction"
    sf = vae.config.scaling_factor
    use_amp = device == "cuda"
    if device == "cpu":
        # Speed only, same function: channels-last convolutions, and the plain softmax(QK^T)V
        # kernel, which beats the CPU flash kernel at head dimension 8 (1.27 -> 1.12 s/step here).
        unet.to(memory_format=torch.channels_last)
        kernel = lambda: sdpa_kernel(SDPBackend.MATH)  # noqa: E731
    else:
        kernel = contextlib.nullcontext
    t0 = time.time()
    last_ckpt = t0
    total = steps
    step = 0
    losses, glosses = [], []
    probe_start = probe_steps // 3
    if also and not checkpoint:
        raise ValueError("ema_also needs a checkpoint path: its averages are written beside it")
    if time_budget is not None and not 3 <= probe_steps <= warmup:
        raise ValueError(f"probe_steps must be in [3, {warmup}] (inside the warm-up)")

    def save_ckpt(tag: str) -> None:
        if checkpoint:
            with torch.no_grad():
                backup = [p.detach().clone() for p in params]
                for p, e in zip(params, ema):
                    p.copy_(e)
                save_checkpoint(pipe, checkpoint, {**(record or {}), "unet_steps_done": step, "unet_steps": total, "tag": tag})
                for p, b_ in zip(params, backup):
                    p.copy_(b_)

    for data in batches(stream, workers):
        if total is not None and step >= total:
            break
        # --time-budget: time steps [probe_steps/3, probe_steps), inside the LR warm-up, whose
        # learning rates do not depend on the total, so `--steps <chosen>` repeats this run exactly.
        if total is None and step == probe_steps:
            rate = (time.time() - t_probe) / (probe_steps - probe_start)
            total = max(probe_steps + 1, int((time_budget - (time.time() - t0)) / rate) + probe_steps)
            log(stage="unet", event="step count chosen", steps=total, sec_per_step=round(rate, 4))
        if step == probe_start:
            t_probe = time.time()
        cur_lr = lr_at(step, total or 10**9, lr, warmup, lr_floor)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        with torch.no_grad():
            x = to_pixels(data["images"], device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                lat = vae.encode(x).latent_dist.mean.float() * sf
        ids = torch.as_tensor(data["ids"], device=device)
        noise = torch.randn(lat.shape, generator=gen, device=device)
        t = torch.randint(0, sched.config.num_train_timesteps, (lat.shape[0],), generator=gen, device=device)
        noisy = sched.add_noise(lat, noise, t)
        store.clear()
        with kernel(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            ctx = te(ids)[0]
            pred = unet(noisy, t, ctx).sample
        snr = snr_all[t]
        # min-SNR-gamma (Hang et al. 2023): both targets weigh the x0 error by min(snr, gamma).
        if velocity:
            target, weight = sched.get_velocity(lat, noise, t), torch.clamp(snr, max=min_snr) / (snr + 1)
        else:
            target, weight = noise, torch.clamp(snr, max=min_snr) / snr
        mse = ((pred.float() - target) ** 2).mean(dim=(1, 2, 3))
        loss = (weight * mse).mean()
        gl = torch.zeros((), device=device)
        if ground_weight > 0:
            masks = torch.as_tensor(data["masks"], device=device).float()
            tokens = torch.as_tensor(data["tokens"], device=device)
            gl = grounding_loss(store.maps, masks, tokens)
            loss = loss + ground_weight * gl
        opt.zero_grad(set_to_none=True)
        with kernel():
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            now_params = [p.detach() for p in params]
            torch._foreach_lerp_(ema, now_params, 1 - ema_decay_at(step, ema_decay, ema_warmup))
            for k, track in also.items():
                torch._foreach_lerp_(track, now_params, 1 - ema_decay_at(step, ema_decay, k))
        losses.append(mse.mean().item() if step % 10 == 0 else None)
        if step % 10 == 0:
            glosses.append(gl.item())
        step += 1
        now = time.time()
        if step % 200 == 0 or step == 1:
            recent = [v for v in losses[-200:] if v is not None]
            log(stage="unet", step=step, of=total, lr=round(cur_lr, 6), mse=round(float(np.mean(recent)), 5),
                ground=round(float(np.mean(glosses[-20:])), 4), elapsed=round(now - t0, 1))
        if checkpoint and now - last_ckpt > checkpoint_every:
            save_ckpt("periodic")
            last_ckpt = now
        if hard_stop is not None and now - t0 > hard_stop:
            log(stage="unet", event="hard stop", step=step, of=total)
            break
    with torch.no_grad():
        for k, track in also.items():
            for p, e in zip(params, track):
                p.copy_(e)
            save_checkpoint(pipe, ema_also_path(checkpoint, k),
                            {**(record or {}), "unet_steps_done": step, "unet_steps": total, "ema_warmup": k})
        for p, e in zip(params, ema):
            p.copy_(e)
    if ground_weight > 0:
        probe.uninstall(unet)
    unet.to(memory_format=torch.contiguous_format)
    unet.eval()
    te.eval()
    info = {"unet_steps": total, "unet_steps_done": step, "unet_seconds": round(time.time() - t0, 1)}
    save_ckpt("final")
    return info


def _adapt(pipe, args, record: dict, device: str, log: Logger) -> None:
    if not args.decoder_adapt_steps:
        return
    record["decoder_adapt"] = adapt_decoder(pipe, pairs=args.decoder_adapt_pairs, steps=args.decoder_adapt_steps,
                                            batch=args.vae_batch, lr=args.vae_lr / 4, seed=args.seed,
                                            device=device, log=log)
    record["vae_adapted"] = measure_vae(pipe.vae, seed=args.seed + 2000, device=device)
    log(stage="decoder-adapt", event="done", **record["decoder_adapt"], **record["vae_adapted"])


# --- saving -----------------------------------------------------------------------------------

def round_to_fp16(*modules) -> None:
    """Round every parameter to the nearest float16 value, in place (the dtype stays float32)."""
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.copy_(p.half().float())


def ema_also_path(checkpoint: str, k: float) -> str:
    """Where ``--ema-also K`` writes the run's average with warm-up K: beside ``--checkpoint``."""
    path = Path(checkpoint)
    return str(path.with_name(f"{path.name.removesuffix('.safetensors')}.ema{k:g}.safetensors"))


def save_checkpoint(pipe, path: str, record: dict) -> None:
    """All weights (fp16) of one pipeline in one safetensors file, with the training record."""
    from safetensors.torch import save_file
    tensors = {}
    for comp in ("unet", "text_encoder", "vae"):
        for k, v in getattr(pipe, comp).state_dict().items():
            tensors[f"{comp}.{k}"] = v.detach().to("cpu", torch.float16).contiguous()
    meta = {"record": json.dumps(record), "scaling_factor": str(pipe.vae.config.scaling_factor)}
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def load_checkpoint(path: str):
    """A pipeline (float32) rebuilt from a single-file checkpoint, and its training record."""
    from safetensors import safe_open
    from .architecture import build_pipeline
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        record = json.loads(meta["record"])
        pipe = build_pipeline(text_layers=int(record["text_layers"]), prediction_type=record.get("prediction", "epsilon"))
        for comp in ("unet", "text_encoder", "vae"):
            module = getattr(pipe, comp)
            state = {k[len(comp) + 1:]: f.get_tensor(k).float() for k in f.keys() if k.startswith(comp + ".")}
            module.load_state_dict(state)
    pipe.vae.register_to_config(scaling_factor=float(meta["scaling_factor"]))
    return pipe, record


def save_pipeline(pipe, out: Path, record: dict) -> None:
    """``save_pretrained`` in fp16 safetensors, plus ``training.json``."""
    pipe.to(torch.float16)
    pipe.save_pretrained(str(out), safe_serialization=True)
    pipe.to(torch.float32)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


# --- CLI --------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffviz train-toyworld", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, help="pipeline folder to write (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-layers", type=int, default=1, help="transformer layers in the CLIP text encoder")
    p.add_argument("--prediction", default="epsilon", choices=["epsilon", "v_prediction"],
                   help="what the UNet predicts (the scheduler config records it)")
    p.add_argument("--ground-weight", type=float, default=0.1, help="weight of the attention grounding loss (0: off)")
    p.add_argument("--vae-steps", type=int, default=450)
    p.add_argument("--vae-batch", type=int, default=64)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-harden-steps", type=int, default=200,
                   help="then fine-tune the decoder alone on noisy latents for this many steps (0: off)")
    p.add_argument("--vae-from", default=None, help="take the trained VAE from this pipeline folder or checkpoint")
    p.add_argument("--decoder-adapt-steps", type=int, default=300,
                   help="after the UNet, fine-tune the decoder on the UNet's own latents for this many steps (0: off)")
    p.add_argument("--decoder-adapt-pairs", type=int, default=2560,
                   help="(UNet latent, true image) pairs made for --decoder-adapt-steps")
    p.add_argument("--adapt-decoder-of", default=None, metavar="FOLDER",
                   help="skip training: run only the decoder adaptation on this trained pipeline folder")
    p.add_argument("--steps", type=int, default=None,
                   help=f"UNet steps (default: {SHIPPED_STEPS}, the shipped model's count; or chosen by --time-budget)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds for the UNet stage; sets --steps from measured speed")
    p.add_argument("--probe-steps", type=int, default=150, help="steps timed to turn --time-budget into a step count")
    p.add_argument("--hard-stop", type=float, default=None, help="stop the UNet stage after this many seconds regardless")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999, help="cap of the EMA decay")
    p.add_argument("--ema-warmup", type=float, default=4.0,
                   help="EMA decay is min(--ema, (1+step)/(K+step)); a smaller K averages over more of the run")
    p.add_argument("--ema-also", type=float, nargs="+", default=(), metavar="K",
                   help="also keep the run's averages with these EMA warm-ups, as checkpoints beside --checkpoint")
    p.add_argument("--p-empty", type=float, default=0.1,
                   help="fraction of training captions left empty (the unconditional half of guidance)")
    p.add_argument("--lr-floor", type=float, default=0.1,
                   help="the cosine schedule ends at this fraction of --lr")
    p.add_argument("--workers", type=int, default=0, help="data loader processes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--checkpoint", default=None, help="also keep a single-file checkpoint here (rewritten periodically)")
    p.add_argument("--log", default=None, help="append JSON-lines progress here")
    p.add_argument("--from-checkpoint", default=None, help="skip training: turn this checkpoint into the --out folder")
    p.add_argument("--eval-prompts", type=int, default=0, help="after training, run eval-attention on this many prompts")
    p.add_argument("--eval-cfg", type=float, nargs="*", default=None, help="guidance scales for the closing evaluation")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"train-toyworld: error: {out} exists (use --overwrite to replace it)", file=sys.stderr)
        return 2
    for flag, value, low in (("--steps", args.steps, 0), ("--vae-steps", args.vae_steps, 1), ("--batch", args.batch, 1),
                             ("--vae-batch", args.vae_batch, 1), ("--workers", args.workers, 0),
                             ("--vae-harden-steps", args.vae_harden_steps, 0),
                             ("--decoder-adapt-steps", args.decoder_adapt_steps, 0),
                             ("--decoder-adapt-pairs", args.decoder_adapt_pairs, 1),
                             ("--eval-prompts", args.eval_prompts, 0)):
        if value is not None and value < low:
            print(f"train-toyworld: error: {flag} must be at least {low}, got {value}", file=sys.stderr)
            return 2
    for flag, value in (("--lr", args.lr), ("--vae-lr", args.vae_lr), ("--time-budget", args.time_budget)):
        if value is not None and not (math.isfinite(value) and value > 0):
            print(f"train-toyworld: error: {flag} must be a positive number, got {value}", file=sys.stderr)
            return 2
    for flag, bad, want in (("--ema", not 0.0 <= args.ema < 1.0, "in [0, 1)"),
                            ("--ema-warmup", not args.ema_warmup > 1, "above 1"),
                            ("--ground-weight", not args.ground_weight >= 0, "non-negative"),
                            ("--text-layers", args.text_layers < 0, "non-negative"),
                            ("--ema-also", any(not k > 1 for k in args.ema_also), "values above 1"),
                            ("--p-empty", not 0 <= args.p_empty < 1, "in [0, 1)"),
                            ("--lr-floor", not 0 <= args.lr_floor <= 1, "in [0, 1]")):
        if bad:
            print(f"train-toyworld: error: {flag} must be {want}", file=sys.stderr)
            return 2
    if args.ema_also and not args.checkpoint:
        print("train-toyworld: error: --ema-also needs --checkpoint (its averages are written beside it)", file=sys.stderr)
        return 2
    if not 3 <= args.probe_steps <= 200:
        print("train-toyworld: error: --probe-steps must be between 3 and 200 (the LR warm-up)", file=sys.stderr)
        return 2
    if args.steps is not None and args.time_budget is not None:
        print("train-toyworld: error: give --steps or --time-budget, not both", file=sys.stderr)
        return 2
    for flag in ("vae_from", "from_checkpoint", "adapt_decoder_of"):
        v = getattr(args, flag)
        if v is not None and not Path(v).exists():
            print(f"train-toyworld: error: --{flag.replace('_', '-')} {v} does not exist", file=sys.stderr)
            return 2
    from .architecture import build_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = pick_device(args.device)
    except ValueError as exc:
        print(f"train-toyworld: error: {exc}", file=sys.stderr)
        return 2
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    log = Logger(args.log)
    if args.from_checkpoint:
        pipe, record = load_checkpoint(args.from_checkpoint)
    elif args.adapt_decoder_of:
        from diffusers import StableDiffusionPipeline
        src = Path(args.adapt_decoder_of)
        pipe = StableDiffusionPipeline.from_pretrained(str(src), dtype=torch.float32, local_files_only=True)
        record = json.loads((src / "training.json").read_text()) if (src / "training.json").exists() else {}
        record.update(decoder_adapt_steps=args.decoder_adapt_steps, decoder_adapt_pairs=args.decoder_adapt_pairs)
        record.pop("evaluation", None)
        _adapt(pipe, args, record, device, log)
    else:
        record = {k: v for k, v in vars(args).items() if k not in {"out", "overwrite", "log", "checkpoint", "from_checkpoint", "adapt_decoder_of"}}
        record["device"] = device
        record["torch"] = torch.__version__
        pipe = build_pipeline(text_layers=args.text_layers, seed=args.seed, prediction_type=args.prediction)
        if args.vae_from:
            src = load_vae(args.vae_from)
            pipe.vae.load_state_dict(src.state_dict())
            pipe.vae.register_to_config(scaling_factor=src.config.scaling_factor)
            record["vae"] = {"from": str(args.vae_from), **measure_vae(pipe.vae.to(device).eval(), seed=args.seed + 2000, device=device)}
        else:
            train_vae(pipe.vae, steps=args.vae_steps, batch=args.vae_batch, lr=args.vae_lr, seed=args.seed,
                      device=device, log=log, workers=args.workers)
            if args.vae_harden_steps:
                harden_decoder(pipe.vae, steps=args.vae_harden_steps, batch=args.vae_batch, lr=args.vae_lr / 4,
                               seed=args.seed, device=device, log=log)
            info = measure_vae(pipe.vae, seed=args.seed + 2000, device=device)   # once, after both VAE stages
            pipe.vae.register_to_config(scaling_factor=round(1.0 / info["latent_std"], 4))
            record["vae"] = info
        log(stage="vae", **record["vae"], scaling_factor=pipe.vae.config.scaling_factor)
        steps = args.steps if (args.steps is not None or args.time_budget) else SHIPPED_STEPS
        if steps != 0:
            info = train_unet(pipe, steps=steps, time_budget=args.time_budget, batch=args.batch, lr=args.lr,
                              seed=args.seed, device=device, log=log, ground_weight=args.ground_weight,
                              ema_decay=args.ema, ema_warmup=args.ema_warmup, ema_also=tuple(args.ema_also),
                              p_empty=args.p_empty, lr_floor=args.lr_floor, workers=args.workers,
                              checkpoint=args.checkpoint, record=record, hard_stop=args.hard_stop,
                              probe_steps=args.probe_steps)
            record.update(info)
            log(stage="unet", event="done", **info)
            # What is shipped is fp16: the decoder adapts to the UNet as saved, so adapting a saved
            # folder (--adapt-decoder-of) gives the same weights as this one command.
            round_to_fp16(pipe.unet, pipe.text_encoder, pipe.vae)
            _adapt(pipe, args, record, device, log)
        else:
            record.update({"unet_steps": 0, "unet_steps_done": 0})
    if args.eval_prompts:
        from . import evaluate
        for cfg in args.eval_cfg or [evaluate.DEFAULT_CFG]:
            report = evaluate.evaluate(pipe, n_prompts=args.eval_prompts, seed=evaluate.DEFAULT_SEED, cfg=cfg,
                                       batched=True, batch_size=128)
            record.setdefault("evaluation", []).append(evaluate.summary(report))
            log(stage="eval", cfg=cfg, **evaluate.summary(report))
    pipe.to("cpu")
    tmp = out.with_name(out.name + ".tmp-train")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    save_pipeline(pipe, tmp, record)
    if out.exists():
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(stage="saved", out=str(out))
    return 0


def load_vae(source: str):
    """The VAE of a saved pipeline folder, or of a single-file checkpoint."""
    from diffusers import AutoencoderKL
    src = Path(source)
    if src.is_dir():
        return AutoencoderKL.from_pretrained(str(src / "vae") if (src / "vae").is_dir() else str(src)).float()
    pipe, _ = load_checkpoint(str(src))
    return pipe.vae


if __name__ == "__main__":
    raise SystemExit(main())
