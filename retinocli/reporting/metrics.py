"""Grading metrics in plain numpy: confusion matrix, per-class scores, QWK, AUC, referable DR.

No torch and no scikit-learn: ``retino evaluate`` and ``retino report`` read predictions
saved to disk and must run where neither is installed. scikit-learn is the test oracle
(``tests/test_metrics.py``), and every function below names the sklearn call it matches.

Conventions:

* Labels are integer grades ``0 .. num_classes - 1``; lists or arrays are accepted.
  Wrong lengths, labels out of range and malformed ``probs`` raise ``ValueError``:
  they are bugs in the caller, not user input.
* A ratio with a zero denominator in :func:`per_class` (a class never predicted, a class
  absent from ``y_true``) is ``0.0``, as sklearn's ``zero_division=0``.
* A score that is undefined because only one class is present (AUC, QWK when every label
  is the same grade, sensitivity without referable cases) is ``nan``, never an exception,
  and no numpy warning is emitted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from retinocli import GRADE_NAMES, NUM_GRADES

__all__ = [
    "REFERABLE_GRADE", "accuracy", "balanced_accuracy", "check_labels", "check_pair", "check_probs",
    "check_scores", "cm_accuracy", "cm_balanced_accuracy", "cm_macro_f1", "cm_qwk", "confusion_matrix",
    "macro_f1", "majority_baseline", "ovr_macro_auc", "per_class", "quadratic_weighted_kappa", "ratio",
    "referable_scores", "roc_auc", "roc_curve", "safe_divide", "summarize",
]

#: Grades at or above this one (moderate, severe, proliferative) are referable DR.
REFERABLE_GRADE = 2


# --------------------------------------------------------------------------- validation


def check_labels(y: ArrayLike, num_classes: int, name: str) -> np.ndarray:
    """Return ``y`` as a 1-D int64 array of grades in ``[0, num_classes)``."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(f"{name} must hold integer grades")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integer grades, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= num_classes:
        raise ValueError(
            f"{name} holds labels outside 0..{num_classes - 1}: "
            f"min {arr.min()}, max {arr.max()}"
        )
    return arr


def check_pair(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`check_labels` of both, which must be the same length."""
    t = check_labels(y_true, num_classes, "y_true")
    p = check_labels(y_pred, num_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    return t, p


def check_scores(scores: ArrayLike, n: int, name: str = "scores") -> np.ndarray:
    """Return ``scores`` as ``n`` finite float64 values."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size != n:
        raise ValueError(f"{name} must be 1-D with {n} values, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} must be finite")
    return s


def check_probs(probs: ArrayLike, n: int, num_classes: int) -> np.ndarray:
    """Return ``probs`` as a finite float64 ``(n, num_classes)`` array."""
    p = np.asarray(probs, dtype=np.float64)
    if p.shape != (n, num_classes):
        raise ValueError(f"probs must have shape ({n}, {num_classes}), got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs must be finite")
    return p


def _square(cm: ArrayLike) -> np.ndarray:
    m = np.asarray(cm)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {m.shape}")
    return m


def safe_divide(num: np.ndarray, den: np.ndarray, fill: float) -> np.ndarray:
    """Element-wise ``num / den`` with ``fill`` where ``den == 0``, without warnings."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, fill, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def ratio(num: float, den: float) -> float:
    """``num / den`` as a float; ``nan`` when ``den`` is 0."""
    return float(num) / float(den) if den else float("nan")


# ------------------------------------------------------------------ confusion-matrix scores


def confusion_matrix(
    y_true: ArrayLike, y_pred: ArrayLike, num_classes: int = NUM_GRADES
) -> np.ndarray:
    """Count predictions per (true, predicted) grade.

    Returns:
        ``(num_classes, num_classes)`` int64 array; row = true grade, column = predicted.
        Equals ``sklearn.metrics.confusion_matrix(y_true, y_pred, labels=range(num_classes))``.
    """
    t, p = check_pair(y_true, y_pred, num_classes)
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def per_class(cm: ArrayLike) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support for every class of a confusion matrix.

    A zero denominator gives ``0.0`` (sklearn's ``zero_division=0``): precision of a
    class never predicted, recall of a class absent from ``y_true``. F1 is
    ``2 tp / (2 tp + fp + fn)``, which equals ``2 P R / (P + R)`` wherever that is defined.

    Returns:
        Dict of arrays of length ``num_classes``: ``precision``, ``recall``, ``f1``
        (float64) and ``support`` (int64, true count per class).
    """
    m = _square(cm)
    tp = np.diag(m).astype(np.float64)
    predicted = m.sum(axis=0)
    support = m.sum(axis=1)
    return {
        "precision": safe_divide(tp, predicted, 0.0),
        "recall": safe_divide(tp, support, 0.0),
        "f1": safe_divide(2 * tp, predicted + support, 0.0),
        "support": support.astype(np.int64),
    }


# Scores of one confusion matrix (row = true grade), shared with the bootstrap's weighted ones.
def cm_accuracy(cm: np.ndarray) -> float:
    return ratio(np.trace(cm), cm.sum())


def cm_balanced_accuracy(cm: np.ndarray) -> float:
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float(np.mean(np.diag(cm)[present] / support[present]))


def cm_macro_f1(cm: np.ndarray) -> float:
    present = (cm.sum(axis=1) > 0) | (cm.sum(axis=0) > 0)
    if not present.any():
        return float("nan")
    return float(np.mean(per_class(cm)["f1"][present]))


def cm_qwk(cm: np.ndarray) -> float:
    k = cm.shape[0]
    grades = np.arange(k)
    # The scale of the weights cancels in the ratio, so (i - j)^2 needs no normalising.
    weights = (grades[:, None] - grades[None, :]) ** 2
    n = cm.sum()
    observed = float((weights * cm).sum()) * n
    expected = float((weights * np.outer(cm.sum(axis=1), cm.sum(axis=0))).sum())
    if expected == 0:
        # Only when every true and predicted label is one and the same grade (or n == 0):
        # chance agreement is already perfect, so agreement beyond chance is undefined.
        return float("nan")
    return 1.0 - observed / expected


def accuracy(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int = NUM_GRADES) -> float:
    """Fraction of exact grade matches; ``nan`` for empty input."""
    return cm_accuracy(confusion_matrix(y_true, y_pred, num_classes))


def balanced_accuracy(
    y_true: ArrayLike, y_pred: ArrayLike, num_classes: int = NUM_GRADES
) -> float:
    """Mean recall over the grades present in ``y_true``.

    Grades absent from ``y_true`` have no recall and are left out, as
    ``sklearn.metrics.balanced_accuracy_score`` does (without its warning).
    """
    return cm_balanced_accuracy(confusion_matrix(y_true, y_pred, num_classes))


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int = NUM_GRADES) -> float:
    """Unweighted mean F1 over the grades present in ``y_true`` or ``y_pred``.

    Equals ``sklearn.metrics.f1_score(y_true, y_pred, average="macro", zero_division=0)``
    with its default ``labels`` (the union of labels seen in either array). A grade seen
    in neither has no errors to score and is left out; a grade seen in only one of them
    scores F1 = 0 and is kept, so predicting a grade that never occurs is penalised.
    """
    return cm_macro_f1(confusion_matrix(y_true, y_pred, num_classes))


def quadratic_weighted_kappa(
    y_true: ArrayLike, y_pred: ArrayLike, num_classes: int = NUM_GRADES
) -> float:
    """Cohen's kappa with quadratic weights ``(i - j)^2`` on the grade values.

    Equals ``sklearn.metrics.cohen_kappa_score(y_true, y_pred, weights="quadratic",
    labels=range(num_classes))``. Passing ``labels`` matters: with sklearn's default
    labels the weights follow the position among the grades present, so with grades
    {0, 1, 4} present, 1 -> 4 would cost as little as 0 -> 1.

    Degenerate case: when every label in both arrays is the same grade, chance agreement
    is already perfect and kappa is 0/0; this returns ``nan`` like sklearn, rather than
    1.0, consistently with an AUC on one class. Empty input also gives ``nan``.
    """
    return cm_qwk(confusion_matrix(y_true, y_pred, num_classes))


def majority_baseline(y_true: ArrayLike, num_classes: int = NUM_GRADES) -> tuple[int, float]:
    """Grade a constant classifier would answer, and the accuracy it would get.

    Ties go to the lowest grade.

    Raises:
        ValueError: if ``y_true`` is empty (there is no most frequent grade).
    """
    t = check_labels(y_true, num_classes, "y_true")
    if t.size == 0:
        raise ValueError("y_true is empty")
    counts = np.bincount(t, minlength=num_classes)
    grade = int(np.argmax(counts))
    return grade, float(counts[grade] / t.size)


# ------------------------------------------------------------------------- ranking scores


def _binary(y_binary: ArrayLike) -> np.ndarray:
    y = check_labels(y_binary, 2, "y_binary")
    return y.astype(bool)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def roc_auc(y_binary: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U), ties counting one half.

    AUC is the probability that a random positive scores above a random negative. Equals
    ``sklearn.metrics.roc_auc_score`` for binary labels.

    Args:
        y_binary: 0/1 (or bool) labels, 1 = positive.
        scores: higher means more likely positive.

    Returns:
        AUC in [0, 1], or ``nan`` when positives or negatives are absent.
    """
    y = _binary(y_binary)
    s = check_scores(scores, y.size)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = float(_average_ranks(s)[y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def roc_curve(
    y_binary: ArrayLike, scores: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve at every distinct score, as ``sklearn.metrics.roc_curve(...,
    drop_intermediate=False)``.

    Returns:
        ``(fpr, tpr, thresholds)``, thresholds decreasing; a sample is called positive
        when ``score >= threshold``. The first point is (0, 0) at threshold ``inf`` and
        the last is (1, 1). With no negatives ``fpr`` is all ``nan``, with no positives
        ``tpr`` is.
    """
    y = _binary(y_binary)
    s = check_scores(scores, y.size)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    # The last index of each run of equal scores: one point per distinct threshold.
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1] if y.size else np.zeros(0, int)
    tps = np.r_[0, np.cumsum(y)[last]]
    fps = np.r_[0, last + 1 - tps[1:]]
    thresholds = np.r_[np.inf, s[last]]
    fpr = safe_divide(fps, np.full(fps.shape, fps[-1]), float("nan"))
    tpr = safe_divide(tps, np.full(tps.shape, tps[-1]), float("nan"))
    return fpr, tpr, thresholds


def ovr_macro_auc(y_true: ArrayLike, probs: ArrayLike) -> float:
    """One-vs-rest AUC of each grade, averaged over the grades where it is defined.

    The number of grades is ``probs.shape[1]``. A grade's AUC is defined when the grade
    is present in ``y_true`` and not the only one present. When every grade is present
    this equals ``sklearn.metrics.roc_auc_score(y_true, probs, multi_class="ovr",
    average="macro")``; sklearn refuses the other cases. ``nan`` with fewer than two
    grades present.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D, got shape {p.shape}")
    t = check_labels(y_true, p.shape[1], "y_true")
    p = check_probs(p, t.size, p.shape[1])
    return _ovr_macro_auc(t, p)


def _ovr_macro_auc(t: np.ndarray, p: np.ndarray) -> float:
    aucs = [roc_auc(t == k, p[:, k]) for k in np.unique(t)]
    defined = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(defined)) if defined else float("nan")


# ---------------------------------------------------------------------------- referable DR


def _referable_counts(cm: np.ndarray) -> dict[str, int]:
    r = REFERABLE_GRADE
    return {
        "tp": int(cm[r:, r:].sum()),
        "fn": int(cm[r:, :r].sum()),
        "fp": int(cm[:r, r:].sum()),
        "tn": int(cm[:r, :r].sum()),
    }


def _referable(cm: np.ndarray, t: np.ndarray, p: np.ndarray | None) -> dict[str, Any]:
    c = _referable_counts(cm)
    out: dict[str, Any] = {
        "sensitivity": ratio(c["tp"], c["tp"] + c["fn"]),
        "specificity": ratio(c["tn"], c["tn"] + c["fp"]),
        "ppv": ratio(c["tp"], c["tp"] + c["fp"]),
        "npv": ratio(c["tn"], c["tn"] + c["fn"]),
        **c,
    }
    if p is not None:
        out["auc"] = roc_auc(t >= REFERABLE_GRADE, p[:, REFERABLE_GRADE:].sum(axis=1))
    return out


def referable_scores(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    probs: ArrayLike | None = None,
    num_classes: int = NUM_GRADES,
) -> dict[str, Any]:
    """Screening scores for referable DR: grade >= 2 (moderate or worse) vs below.

    Args:
        y_true: true grades.
        y_pred: predicted grades; referable when ``>= REFERABLE_GRADE``.
        probs: optional ``(n, num_classes)`` grade probabilities; the referable score is
            the summed probability of grades 2 and above.
        num_classes: number of grades.

    Returns:
        ``sensitivity``, ``specificity``, ``ppv``, ``npv`` (floats, ``nan`` when their
        denominator is zero, e.g. sensitivity with no referable eyes), the counts ``tp``,
        ``fn``, ``fp``, ``tn``, and ``auc`` only when ``probs`` is given.
    """
    t, p = check_pair(y_true, y_pred, num_classes)
    pr = None if probs is None else check_probs(probs, t.size, num_classes)
    return _referable(confusion_matrix(t, p, num_classes), t, pr)


# ------------------------------------------------------------------------------- summary


def summarize(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    probs: ArrayLike | None = None,
    num_classes: int = NUM_GRADES,
) -> dict[str, Any]:
    """Every metric of this module in one JSON-serialisable dict.

    Values are plain ``int``, ``float`` (``nan`` where undefined), ``list`` and ``dict``,
    so ``json.dumps(summary)`` works (it writes ``NaN`` for ``nan``).

    Returns:
        Dict with keys ``n``, ``accuracy``, ``majority_grade``, ``majority_accuracy``,
        ``accuracy_gap`` (accuracy minus majority accuracy), ``balanced_accuracy``,
        ``macro_f1``, ``qwk``, ``confusion_matrix`` (list of rows, row = true grade),
        ``confusion_normalized`` (each row divided by its total; all zeros for a grade
        with no samples), ``per_class`` (one dict per grade with ``grade``, ``name``,
        ``precision``, ``recall``, ``f1``, ``support``), ``referable`` (see
        :func:`referable_scores`) and, when ``probs`` is given, ``ovr_macro_auc``.

    Raises:
        ValueError: on empty input, mismatched lengths, labels out of range or a
            ``probs`` of the wrong shape.
    """
    t, p = check_pair(y_true, y_pred, num_classes)
    if t.size == 0:
        raise ValueError("cannot summarise zero predictions")
    pr = None if probs is None else check_probs(probs, t.size, num_classes)
    cm = confusion_matrix(t, p, num_classes)
    acc = cm_accuracy(cm)
    majority_grade, majority_acc = majority_baseline(t, num_classes)
    scores = per_class(cm)
    names = [*GRADE_NAMES, *(f"Grade {k}" for k in range(len(GRADE_NAMES), num_classes))]
    summary: dict[str, Any] = {
        "n": int(t.size),
        "accuracy": acc,
        "majority_grade": majority_grade,
        "majority_accuracy": majority_acc,
        "accuracy_gap": acc - majority_acc,
        "balanced_accuracy": cm_balanced_accuracy(cm),
        "macro_f1": cm_macro_f1(cm),
        "qwk": cm_qwk(cm),
        "confusion_matrix": cm.tolist(),
        "confusion_normalized": safe_divide(cm, cm.sum(axis=1, keepdims=True), 0.0).tolist(),
        "per_class": [
            {
                "grade": k,
                "name": names[k],
                "precision": float(scores["precision"][k]),
                "recall": float(scores["recall"][k]),
                "f1": float(scores["f1"][k]),
                "support": int(scores["support"][k]),
            }
            for k in range(num_classes)
        ],
        "referable": _referable(cm, t, pr),
    }
    if pr is not None:
        summary["ovr_macro_auc"] = _ovr_macro_auc(t, pr)
    return summary
