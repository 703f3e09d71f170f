"""Raw head outputs -> five grade probabilities and one grade, for every head. No torch here.

One module used by training's validation and ``retino evaluate`` (PyTorch outputs after
``.numpy()``) and by the onnxruntime predictor (the ONNX graph outputs the raw head as
``logits``), so a checkpoint and its export grade the same image the same way.

Heads and what their raw output ``raw`` [batch, width] means:

classification  width K: logits. Probabilities are the softmax; the grade is their argmax.
ordinal         width K-1: CORAL cumulative logits, ``sigmoid(raw[:, k]) = P(grade > k)``.
                The cumulative probabilities are made monotone (running minimum, so
                P(>0) >= P(>1) >= ...) and differenced: P(0) = 1 - P(>0),
                P(k) = P(>k-1) - P(>k), P(K-1) = P(>K-2); they are >= 0 and sum to 1 by
                construction. The grade thresholds the expected grade
                ``sum_k k P(k) = sum_k P(>k)`` with the fitted cut points.
regression      width 1: a grade on a continuous scale. The grade is the number of cut points
                below it. Probabilities: the output is first mapped piecewise-linearly so that
                the cut points land on 0.5, 1.5, ... (slope 1 beyond the outer ones), then
                ``softmax(-|w - k| / scale)`` with ``scale`` fitted on validation (NLL). Its
                argmax is the nearest grade to ``w``, which is the cut-point grade: one rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

HEADS = ("classification", "regression", "ordinal")


def head_width(head: str, num_grades: int) -> int:
    """Number of raw outputs of ``head`` for ``num_grades`` grades."""
    return {"classification": num_grades, "ordinal": num_grades - 1, "regression": 1}[head]


def default_cutpoints(num_grades: int) -> np.ndarray:
    """0.5, 1.5, ..., the thresholds of plain rounding."""
    return np.arange(num_grades - 1, dtype=np.float64) + 0.5


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warnings for large |x|


def ordinal_cumulative(raw: np.ndarray) -> np.ndarray:
    """P(grade > k) for k = 0..K-2, made non-increasing in k."""
    return np.minimum.accumulate(_sigmoid(np.asarray(raw, np.float64)), axis=1)


def ordinal_probs(raw: np.ndarray) -> np.ndarray:
    cum = ordinal_cumulative(raw)
    n = len(cum)
    return np.concatenate([1.0 - cum[:, :1], cum[:, :-1] - cum[:, 1:], cum[:, -1:]], axis=1).reshape(n, -1)


def warp(x: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Piecewise-linear map sending ``cuts`` to 0.5, 1.5, ...; slope 1 outside them."""
    x = np.asarray(x, np.float64)
    target = default_cutpoints(len(cuts) + 1)
    w = np.interp(x, cuts, target)
    return np.where(x < cuts[0], target[0] + x - cuts[0], np.where(x > cuts[-1], target[-1] + x - cuts[-1], w))


def regression_probs(x: np.ndarray, cuts: np.ndarray, scale: float) -> np.ndarray:
    w = warp(np.asarray(x, np.float64).reshape(-1), cuts)
    k = np.arange(len(cuts) + 1)
    z = -np.abs(w[:, None] - k[None, :]) / scale
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def scores(head: str, raw: np.ndarray) -> np.ndarray:
    """The continuous score the cut points threshold (regression: the output; ordinal:
    the expected grade). Classification has none."""
    raw = np.asarray(raw, np.float64)
    if head == "regression":
        return raw.reshape(-1)
    if head == "ordinal":
        return ordinal_cumulative(raw).sum(1)
    raise ValueError(f"the {head} head has no score to cut")


def cut(score: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Grade = how many cut points lie strictly below the score."""
    return np.searchsorted(np.asarray(cuts, np.float64), np.asarray(score, np.float64), side="left").astype(np.int64)


@dataclass(frozen=True)
class Grader:
    """How a model's raw output becomes probabilities and a grade (stored in checkpoint and ONNX)."""

    head: str = "classification"
    num_grades: int = 5
    cutpoints: tuple[float, ...] | None = None  # K-1 sorted thresholds (regression, ordinal)
    scale: float = 0.5  # regression's probability spread, in grades

    @property
    def cuts(self) -> np.ndarray:
        if self.cutpoints is None:
            return default_cutpoints(self.num_grades)
        return np.asarray(self.cutpoints, np.float64)

    @property
    def width(self) -> int:
        return head_width(self.head, self.num_grades)

    def probabilities(self, raw: np.ndarray) -> np.ndarray:
        """[batch, width] raw outputs -> [batch, K] float32 probabilities."""
        raw = np.asarray(raw, np.float64).reshape(len(raw), -1)
        if self.head == "classification":
            z = raw - raw.max(1, keepdims=True)
            e = np.exp(z)
            p = e / e.sum(1, keepdims=True)
        elif self.head == "ordinal":
            p = ordinal_probs(raw)
        else:
            p = regression_probs(raw[:, 0], self.cuts, self.scale)
        return p.astype(np.float32)

    def grades(self, probs: np.ndarray) -> np.ndarray:
        """Grades from :meth:`probabilities` (also averaged over TTA views)."""
        probs = np.asarray(probs, np.float64)
        if self.head == "ordinal":  # the expected grade, thresholded
            return cut(probs @ np.arange(probs.shape[1]), self.cuts)
        return probs.argmax(1).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"head": self.head, "num_grades": self.num_grades,
                "cutpoints": None if self.cutpoints is None else [float(c) for c in self.cutpoints],
                "scale": float(self.scale)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Grader":
        d = d or {}
        cuts = d.get("cutpoints")
        return cls(head=str(d.get("head", "classification")), num_grades=int(d.get("num_grades", 5)),
                   cutpoints=None if cuts is None else tuple(float(c) for c in cuts),
                   scale=float(d.get("scale", 0.5)))


def fit_grader(head: str, raw: np.ndarray, y: np.ndarray, num_grades: int = 5) -> Grader:
    """The grader for ``head`` with cut points (and regression's scale) fitted on validation
    outputs ``raw`` and true grades ``y`` (see :mod:`retinocli.models.cutpoints`)."""
    from retinocli.models.cutpoints import fit_cutpoints, fit_scale

    if head == "classification":
        return Grader(head, num_grades)
    s = scores(head, raw)
    cuts = tuple(float(c) for c in fit_cutpoints(s, y, num_grades))
    scale = fit_scale(s, y, np.asarray(cuts)) if head == "regression" else 0.5
    return Grader(head, num_grades, cuts, scale)
