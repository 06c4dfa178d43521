"""The grounding loss: every content word's attention should sit on its own object, all of it and evenly."""
from __future__ import annotations

import math

import torch


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

