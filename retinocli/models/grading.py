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

Frozen on validation with the model (issue #15) and applied wherever probabilities are made:

temperature     Guo et al.'s temperature scaling, ``softmax(log p / T)``
                (:func:`retinocli.reporting.calibration.apply_temperature`; for the softmax head
                exactly ``softmax(logits / T)``). It never changes the argmax. The ordinal head's
                cut points are fitted on the tempered expected grade, so its grade rule stays
                one rule. The regression head keeps ``T = 1``: ``softmax(-|w - k| / scale)``
                tempered is ``scale * T``, and ``scale`` is already fitted by validation NLL.
referral        the referable-DR operating point: ``P(grade >= 2) >= threshold`` refers, the
                threshold chosen on validation for a target sensitivity and never re-tuned.
                Absent (older models): 0.5, reported as not frozen.
fusion          the fellow-eye model of :func:`retinocli.reporting.clinical.fit_fusion`, with
                its own frozen referral threshold; applied only when asked (``--fuse-eyes``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from retinocli.reporting.metrics import REFERABLE_GRADE

HEADS = ("classification", "regression", "ordinal")
#: The referral threshold of a model that has none frozen (trained before issue #15).
DEFAULT_THRESHOLD = 0.5


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
    """How a model's raw output becomes probabilities, a grade and a referral (stored in checkpoint and ONNX)."""

    head: str = "classification"
    num_grades: int = 5
    cutpoints: tuple[float, ...] | None = None  # K-1 sorted thresholds (regression, ordinal)
    scale: float = 0.5  # regression's probability spread, in grades
    temperature: float = 1.0  # divides the log-probabilities; 1: not calibrated
    referral: dict[str, Any] | None = None  # frozen operating point: threshold, target, val sens/spec
    fusion: dict[str, Any] | None = None  # clinical.fit_fusion's model plus its own "referral"

    def __post_init__(self) -> None:
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        for part in (self.referral, (self.fusion or {}).get("referral")):
            if part is not None and not np.isfinite(float(part["threshold"])):
                raise ValueError(f"referral threshold must be a number, got {part['threshold']}")

    @property
    def cuts(self) -> np.ndarray:
        if self.cutpoints is None:
            return default_cutpoints(self.num_grades)
        return np.asarray(self.cutpoints, np.float64)

    @property
    def width(self) -> int:
        return head_width(self.head, self.num_grades)

    @property
    def frozen(self) -> bool:
        """Whether a referral threshold was frozen on validation (else :data:`DEFAULT_THRESHOLD`)."""
        return self.referral is not None

    def threshold(self, *, fused: bool = False) -> float:
        """The referral threshold on ``P(grade >= 2)``; ``fused``: the fusion model's own."""
        referral = (self.fusion or {}).get("referral") if fused else self.referral
        return float(referral["threshold"]) if referral else DEFAULT_THRESHOLD

    def uncalibrated(self, raw: np.ndarray) -> np.ndarray:
        """[batch, width] raw outputs -> [batch, K] float64 probabilities before the temperature."""
        raw = np.asarray(raw, np.float64).reshape(len(raw), -1)
        if self.head == "classification":
            z = raw - raw.max(1, keepdims=True)
            e = np.exp(z)
            return e / e.sum(1, keepdims=True)
        if self.head == "ordinal":
            return ordinal_probs(raw)
        return regression_probs(raw[:, 0], self.cuts, self.scale)

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities after the temperature (the identity at ``T = 1``), float32."""
        if self.temperature == 1.0 or len(probs) == 0:
            return np.asarray(probs, np.float32)
        from retinocli.reporting.calibration import apply_temperature

        return apply_temperature(probs, self.temperature).astype(np.float32)

    def uncalibrate(self, probs: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`calibrate` (``softmax(log p * T)``), for ECE before scaling."""
        if self.temperature == 1.0 or len(probs) == 0:
            return np.asarray(probs, np.float64)
        from retinocli.reporting.calibration import apply_temperature

        return apply_temperature(probs, 1.0 / self.temperature)

    def probabilities(self, raw: np.ndarray) -> np.ndarray:
        """[batch, width] raw outputs -> [batch, K] float32 calibrated probabilities."""
        return self.calibrate(self.uncalibrated(raw))

    def grades(self, probs: np.ndarray) -> np.ndarray:
        """Grades from :meth:`probabilities` (also averaged over TTA views)."""
        probs = np.asarray(probs, np.float64)
        if self.head == "ordinal":  # the expected grade, thresholded
            return cut(probs @ np.arange(probs.shape[1]), self.cuts)
        return probs.argmax(1).astype(np.int64)

    def referable(self, probs: np.ndarray, *, fused: bool = False) -> np.ndarray:
        """Referral per row of :meth:`probabilities`: ``P(grade >= 2) >= threshold``."""
        return referable_score(probs) >= self.threshold(fused=fused)

    def to_dict(self) -> dict[str, Any]:
        return {"head": self.head, "num_grades": self.num_grades,
                "cutpoints": None if self.cutpoints is None else [float(c) for c in self.cutpoints],
                "scale": float(self.scale), "temperature": float(self.temperature),
                "referral": None if self.referral is None else dict(self.referral),
                "fusion": None if self.fusion is None else dict(self.fusion)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Grader":
        """The grader a dict describes; keys absent in older files take their defaults."""
        d = d or {}
        cuts = d.get("cutpoints")
        referral, fusion = d.get("referral"), d.get("fusion")
        return cls(head=str(d.get("head", "classification")), num_grades=int(d.get("num_grades", 5)),
                   cutpoints=None if cuts is None else tuple(float(c) for c in cuts),
                   scale=float(d.get("scale", 0.5)), temperature=float(d.get("temperature", 1.0)),
                   referral=None if referral is None else dict(referral),
                   fusion=None if fusion is None else dict(fusion))

    @property
    def is_default(self) -> bool:
        """A plain softmax classifier with nothing fitted: what older exports leave unsaid."""
        return self == Grader(num_grades=self.num_grades)


def referable_score(probs: np.ndarray) -> np.ndarray:
    """``P(grade >= 2)`` per row, summed in float64 (the same in evaluate and predict)."""
    return np.asarray(probs, np.float64)[:, REFERABLE_GRADE:].sum(1)


def fit_grader(head: str, raw: np.ndarray, y: np.ndarray, num_grades: int = 5, *,
               temperature: bool = False) -> Grader:
    """The grader for ``head`` with cut points (and regression's scale) fitted on validation
    outputs ``raw`` and true grades ``y`` (see :mod:`retinocli.models.cutpoints`).

    ``temperature``: also fit the temperature by validation NLL
    (:func:`retinocli.reporting.calibration.fit_temperature`), before the ordinal cut points,
    which are then fitted on the tempered expected grade. Regression keeps ``T = 1``.
    """
    from retinocli.models.cutpoints import fit_cutpoints, fit_scale

    y = np.asarray(y, np.int64)
    if head == "regression":
        s = scores(head, raw)
        cuts = tuple(float(c) for c in fit_cutpoints(s, y, num_grades))
        return Grader(head, num_grades, cuts, fit_scale(s, y, np.asarray(cuts)))
    from retinocli.reporting.calibration import apply_temperature, fit_temperature

    grader = Grader(head, num_grades)
    probs = grader.uncalibrated(raw)
    if temperature and len(y):
        grader = replace(grader, temperature=fit_temperature(probs, y))
    if head == "classification":
        return grader
    s = apply_temperature(probs, grader.temperature) @ np.arange(num_grades)
    return replace(grader, cutpoints=tuple(float(c) for c in fit_cutpoints(s, y, num_grades)))
