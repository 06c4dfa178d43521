"""Denoiser stage of the MM-DiT family: the SD3 transformer and its three text encoders, jointly.

Rectified flow as SD3 trains it: x_t = (1 - σ) x0 + σ ε with σ from a logit-normal (shifted as the
scheduler shifts its sigmas), the transformer predicts the velocity v = ε - x0 at timestep 1000 σ,
plain MSE. With ``ground_weight`` > 0 the grounding loss of the UNet family runs on the joint
layers' image->text probabilities (``mmdit.JointProbeProcessor``), on both token sets: each content
word at its CLIP position (after BOS) and at its T5 position (16 + word index).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .. import mmdit
from ..probe import ProbeStore
from .common import Logger, StepBudget, WorldStream, batches, ema_decay_at, lr_at, to_pixels, token_table
from .grounding import grounding_loss


def t5_table(tokenizer_3) -> tuple[dict, int, int]:
    """word -> T5 id, </s>, <pad> (one piece per grammar word)."""
    from ..architecture import DEFAULT_WORDS
    ids = {}
    for w in DEFAULT_WORDS:
        enc = tokenizer_3(w, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ValueError(f"grammar word {w!r} is not a single T5 token")
        ids[w] = enc[0]
    return ids, tokenizer_3.eos_token_id, tokenizer_3.pad_token_id


class MMDiTStream(WorldStream):
    """The world stream with T5 ids and token positions in both sets: ``tokens`` [B, 3, 8]."""

    def __init__(self, seed: int, batch: int, tables: tuple, p_empty: float = 0.1):
        (word_ids, bos, eos, length), (self.t5_ids, self.t5_eos, self.t5_pad) = tables
        super().__init__(seed, batch, word_ids, bos, eos, length, p_empty=p_empty)

    def make(self, k: int) -> dict:
        data = super().make(k)
        words = data["words"]
        data["t5"] = mmdit.t5_ids(words, self.t5_ids, self.t5_eos, self.t5_pad)
        tok = data["tokens"]
        t5_pos = np.where(tok >= 0, tok - 1 + self.length, -1)
        data["tokens"] = np.concatenate([tok, t5_pos], axis=2)
        return data


def sample_sigmas(n: int, shift: float, gen: torch.Generator, device: str) -> torch.Tensor:
    """σ = shift·u / (1 + (shift - 1)·u), u = sigmoid(N(0, 1)): SD3's logit-normal, shifted like the scheduler."""
    u = torch.sigmoid(torch.randn(n, generator=gen, device=device))
    return shift * u / (1 + (shift - 1) * u)


def train_mmdit(pipe, *, steps: int | None, time_budget: float | None, batch: int, lr: float, seed: int,
                device: str, log: Logger, ground_weight: float = 0.1, ema_decay: float = 0.999,
                ema_warmup: float = 4.0, p_empty: float = 0.1, lr_floor: float = 0.1, workers: int = 0,
                warmup: int = 200, hard_stop: float | None = None, probe_steps: int = 150,
                checkpoint=None) -> dict:
    """Train ``pipe.transformer`` and its text encoders; leaves the EMA weights in place. Returns step counts, seconds."""
    tr, vae = pipe.transformer, pipe.vae
    encoders = (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
    for m in (tr, vae) + encoders:
        m.to(device)
    vae.eval().requires_grad_(False)
    tr.train()
    for m in encoders:
        m.train()
    store = ProbeStore(enabled=ground_weight > 0)
    mmdit.install(tr, store)
    params = [p for m in (tr,) + encoders for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    stream = MMDiTStream(seed, batch, (token_table(pipe.tokenizer), t5_table(pipe.tokenizer_3)), p_empty=p_empty)
    gen = torch.Generator(device=device).manual_seed(seed)
    sf, shift_z = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    shift = pipe.scheduler.config.shift
    budget = StepBudget(steps, time_budget, probe_steps, log, "mmdit")
    t0 = budget.t0
    total, step = steps, 0
    losses, glosses = [], []
    for data in batches(stream, workers):
        if total is not None and step >= total:
            break
        total = budget.at(step)
        cur_lr = lr_at(step, total or 10**9, lr, warmup, lr_floor)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        with torch.no_grad():
            lat = (vae.encode(to_pixels(data["images"], device)).latent_dist.mean - shift_z) * sf
        noise = torch.randn(lat.shape, generator=gen, device=device)
        sigma = sample_sigmas(lat.shape[0], shift, gen, device)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * lat + s * noise
        store.clear()
        embeds, pooled = mmdit.encode(pipe, torch.as_tensor(data["ids"], device=device),
                                      torch.as_tensor(data["t5"], device=device))
        pred = tr(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=embeds,
                  pooled_projections=pooled).sample
        mse = ((pred.float() - (noise - lat)) ** 2).mean()
        loss = mse
        gl = torch.zeros((), device=device)
        if ground_weight > 0:
            gl = grounding_loss(store.maps, torch.as_tensor(data["masks"], device=device).float(),
                                torch.as_tensor(data["tokens"], device=device))
            loss = loss + ground_weight * gl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - ema_decay_at(step, ema_decay, ema_warmup))
        if step % 10 == 0:
            losses.append(mse.item())
            glosses.append(gl.item())
        step += 1
        now = time.time()
        if step % 200 == 0 or step == 1:
            log(stage="mmdit", step=step, of=total, lr=round(cur_lr, 6), mse=round(float(np.mean(losses[-20:])), 5),
                ground=round(float(np.mean(glosses[-20:])), 4), elapsed=round(now - t0, 1))
        if checkpoint is not None and step % 500 == 0:
            checkpoint(step, params, ema)
        if hard_stop is not None and now - t0 > hard_stop:
            log(stage="mmdit", event="hard stop", step=step, of=total)
            break
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    mmdit.uninstall(tr)
    tr.eval()
    for m in encoders:
        m.eval()
    return {"denoiser_steps": total, "denoiser_steps_done": step, "denoiser_seconds": round(time.time() - t0, 1),
            "final_mse": round(float(np.mean(losses[-20:])), 5), "final_ground": round(float(np.mean(glosses[-20:])), 4)}
