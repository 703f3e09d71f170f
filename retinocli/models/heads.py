"""Torch side of issue #14: grading heads and their losses, GeM pooling. (The numpy
post-processing lives in :mod:`retinocli.models.grading`; EMA weights and mixup/cutmix, training
mechanics, in :mod:`retinocli.engine.regularize`.)

The ordinal loss is CORAL (Cao, Mirjalili & Raschka 2020), written here rather than taken from
``coral-pytorch``: it is ten lines (binary cross-entropy of K-1 shared-weight logits against
the "grade > k" levels), the package would add a dependency for them, and its layer has the
same parameterisation as :class:`CoralHead` (one weight vector, K-1 biases). Unlike its layer,
training starts the biases at the grades' prior (:func:`coral_prior_bias`), not (K-1..1)/(K-1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retinocli import NUM_GRADES
from retinocli.models.grading import head_width


class CoralHead(nn.Module):
    """K-1 cumulative logits sharing one weight vector: ``x @ w + b_k`` (rank consistent).

    The biases start at coral-pytorch's (K-1..1)/(K-1); training sets them to the grades' prior
    with :func:`coral_prior_bias` (:func:`retinocli.engine.parts.build_parts`).
    """

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


def coral_prior_bias(frequencies) -> torch.Tensor:
    """CORAL biases at which a featureless image gets the grades' prior: ``logit(P(grade > k))``.

    The middle grades' probabilities are differences of neighbouring sigmoids, so they can
    never exceed what the biases' gaps allow: from coral-pytorch's start (gaps of 0.25) no
    grade between the first and last gets more than 6 %. With AdamW at 1e-3 a bias moves about
    1e-3 a step, so on a small set the gaps hardly grow (a RetinaMNIST recipe run ended with
    biases 1.03/0.77/0.48/0.22, the same as they started). ``frequencies``: the grades' share of
    the training loss (counts times class weights); an absent grade counts half the rarest one.
    """
    f = torch.as_tensor(frequencies, dtype=torch.float64).clamp(min=0)
    if not bool((f > 0).any()):
        raise ValueError("coral_prior_bias needs at least one graded image")
    f = torch.where(f > 0, f, 0.5 * f[f > 0].min())  # no infinite bias for a grade not seen
    above = (f.sum() - f.cumsum(0))[:-1] / f.sum()  # P(grade > k), k = 0..K-2
    return torch.logit(above).float()


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
    """The training loss of a head, mean over readable images (target ``ignore_index`` skipped).

    classification: cross-entropy (class weights, label smoothing); ordinal: CORAL;
    regression: Huber (SmoothL1, beta 1) of the output against the grade. ``weight`` (per
    grade) weights images for all three. ``ignore_index`` is the target of an unreadable
    image (:data:`retinocli.engine.dataset.IGNORE`; torch's cross-entropy default).
    """

    def __init__(self, head: str, *, weight: torch.Tensor | None = None, label_smoothing: float = 0.0,
                 ignore_index: int = -100):
        super().__init__()
        self.head = head
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.head == "classification":
            return F.cross_entropy(out, y, weight=self.weight, label_smoothing=self.label_smoothing,
                                   ignore_index=self.ignore_index)
        valid = y != self.ignore_index
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
