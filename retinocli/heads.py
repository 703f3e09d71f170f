"""Training-side pieces of issue #14: grading heads and their losses, GeM pooling, EMA weights,
and batch-level mixup/cutmix. (The numpy post-processing lives in :mod:`retinocli.grading`.)

The ordinal loss is CORAL (Cao, Mirjalili & Raschka 2020), written here rather than taken from
``coral-pytorch``: it is ten lines (binary cross-entropy of K-1 shared-weight logits against
the "grade > k" levels), the package would add a dependency for them, and its layer has the
same parameterisation as :class:`CoralHead` (one weight vector, K-1 biases initialised
(K-1..1)/(K-1)).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retinocli import NUM_GRADES
from retinocli.grading import head_width

IGNORE = -100  # unreadable images' target (retinocli.data.IGNORE)


class CoralHead(nn.Module):
    """K-1 cumulative logits sharing one weight vector: ``x @ w + b_k`` (rank consistent)."""

    def __init__(self, in_features: int, num_grades: int):
        super().__init__()
        self.linear = nn.Linear(in_features, 1, bias=False)
        self.bias = nn.Parameter(torch.arange(num_grades - 1, 0, -1).float() / (num_grades - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.bias


class GeM(nn.Module):
    """Generalised-mean pooling ``mean(x^p)^(1/p)`` with a learnable ``p`` (1: average, large: max)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1), keepdim=True).pow(1.0 / self.p)


def make_head(head: str, in_features: int, num_grades: int) -> nn.Module:
    if head == "ordinal":
        return CoralHead(in_features, num_grades)
    return nn.Linear(in_features, head_width(head, num_grades))


def install(model: nn.Module, *, head: str, pool: str, num_grades: int) -> nn.Module:
    """Give a torchvision ResNet the ``head`` (as ``fc``) and ``pool`` (as ``avgpool``)."""
    in_features = model.fc.in_features if isinstance(model.fc, nn.Linear) else model.fc.linear.in_features
    model.fc = make_head(head, in_features, num_grades)
    if pool == "gem":
        model.avgpool = GeM()
    return model


def coral_loss(out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image CORAL loss: BCE of each cumulative logit against ``y > k``, summed over k."""
    levels = (y[:, None] > torch.arange(out.shape[1], device=y.device)[None, :]).to(out.dtype)
    return F.binary_cross_entropy_with_logits(out, levels, reduction="none").sum(1)


class HeadLoss(nn.Module):
    """The training loss of a head, mean over readable images (target ``IGNORE`` skipped).

    classification: cross-entropy (class weights, label smoothing); ordinal: CORAL;
    regression: Huber (SmoothL1, beta 1) of the output against the grade. ``weight`` (per
    grade) weights images for all three.
    """

    def __init__(self, head: str, *, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.head = head
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.head == "classification":
            return F.cross_entropy(out, y, weight=self.weight, label_smoothing=self.label_smoothing,
                                   ignore_index=IGNORE)
        valid = y != IGNORE
        yv, ov = y[valid], out[valid]
        if self.head == "ordinal":
            per = coral_loss(ov, yv)
        else:
            per = F.smooth_l1_loss(ov[:, 0], yv.to(ov.dtype), reduction="none", beta=1.0)
        w = self.weight[yv] if self.weight is not None else torch.ones_like(per)
        return (per * w).sum() / w.sum().clamp(min=1e-12)


def rough_grades(head: str, out: torch.Tensor) -> torch.Tensor:
    """Rough grades for the training accuracy shown per step (default thresholds, no cut points)."""
    if head == "classification":
        return out.argmax(1)
    if head == "ordinal":
        return (out > 0).sum(1)
    return out[:, 0].round().clamp(0, NUM_GRADES - 1).long()


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
