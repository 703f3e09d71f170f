"""Training-time regularisers of issue #14: an exponential moving average of the weights (--ema)
and batch-level mixup/cutmix (--mixup, --cutmix). Both belong to the training loop; the
model's heads and losses are :mod:`retinocli.models.heads`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


# ---------------------------------------------------------------------------- EMA


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of ``model``'s weights and batch-norm buffers.

    torch's rule: the first update copies the weights, each later one sets
    ``ema = decay * ema + (1 - decay) * weights``.
    """
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


# ---------------------------------------------------------------------------- mixup / cutmix


class BatchMix:
    """Mixup and/or CutMix of a batch, deterministic from (seed, rank, epoch, step).

    With both on, each batch uses one of them (even odds). The loss mixes:
    ``lam * loss(out, y) + (1 - lam) * loss(out, y[perm])``, which for cross-entropy and
    CORAL equals training on the mixed (soft) targets and for regression pulls the output
    toward the mixed grade.
    """

    def __init__(self, *, mixup: float = 0.0, cutmix: float = 0.0, seed: int = 0, rank: int = 0):
        self.mixup, self.cutmix, self.seed, self.rank, self.epoch = mixup, cutmix, seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int):
        """-> (mixed x, y, y of the partner images, lam)."""
        rng = np.random.default_rng([self.seed, self.rank, self.epoch, step])
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or rng.random() < 0.5)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(rng.beta(alpha, alpha))
        perm = torch.from_numpy(rng.permutation(len(x))).to(x.device)
        if use_cutmix:
            h, w = x.shape[-2:]
            ch, cw = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
        else:
            x = lam * x + (1 - lam) * x[perm]
        return x, y, y[perm], lam
