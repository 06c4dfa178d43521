"""What every training stage shares: the seeded world stream, token tables, schedules, the log."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.utils.data as tud

from .. import world

ROLE_COUNT = len(world.ROLE_NAMES)
#: Probabilities of one, two and three objects per training scene: mostly two, the case
#: that prompt adherence and own-vs-other are scored on.
TRAIN_COUNTS = (0.2, 0.6, 0.2)


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
        return {"images": b.images, "masks": b.masks, "ids": ids, "tokens": tok, "words": words}

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
    from ..architecture import DEFAULT_WORDS
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




class StepBudget:
    """``--time-budget``: the step count is chosen from the speed of steps [probe_steps/3, probe_steps), inside
    the LR warm-up, whose learning rates do not depend on the total, so ``--steps <chosen>`` repeats the run."""

    def __init__(self, steps: int | None, time_budget: float | None, probe_steps: int, log, stage: str):
        self.total, self.time_budget, self.probe_steps = steps, time_budget, probe_steps
        self.log, self.stage = log, stage
        self.probe_start = probe_steps // 3
        self.t0 = self.t_probe = time.time()

    def at(self, step: int) -> int | None:
        """The total as known at ``step`` (None until it is chosen); call once per step, before its work."""
        if self.total is None and step == self.probe_steps:
            rate = (time.time() - self.t_probe) / (self.probe_steps - self.probe_start)
            self.total = max(self.probe_steps + 1,
                             int((self.time_budget - (time.time() - self.t0)) / rate) + self.probe_steps)
            self.log(stage=self.stage, event="step count chosen", steps=self.total, sec_per_step=round(rate, 4))
        if step == self.probe_start:
            self.t_probe = time.time()
        return self.total
