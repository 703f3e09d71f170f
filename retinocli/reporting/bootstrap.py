"""Percentile bootstrap intervals of the headline metrics, resampling patients when known
(issue #15). Numpy only; no torch.

A resample is a row of weights (how often each image is drawn), so the metrics of a whole
chunk of resamples come from weighted confusion matrices without copying the data.

Public API:

* :func:`bootstrap_ci`: seeded percentile intervals of :data:`METRICS`.
* :func:`paired_bootstrap`: the difference of two models on the same images, with a verdict.
* The parts both are built of, for other resampling schemes (:mod:`retinocli.reporting.study`):
  :func:`resample_weights` (patients drawn as clusters), :func:`metric_scorer` (the metrics of
  weighted resamples, with :func:`weighted_auc`), :func:`bootstrap_samples`,
  :func:`bootstrap_meta`, :func:`percentile_interval` and :func:`paired_interval`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from retinocli import NUM_GRADES
from retinocli.reporting import metrics
from retinocli.reporting.metrics import REFERABLE_GRADE

__all__ = [
    "DISTINGUISHABLE", "METRICS", "NOT_DISTINGUISHABLE", "Scorer", "bootstrap_ci", "bootstrap_meta",
    "bootstrap_samples", "check_metric_names", "metric_scorer", "paired_bootstrap", "paired_interval",
    "percentile_interval", "resample_weights", "weighted_auc",
]

#: The headline metrics :func:`bootstrap_ci` reports, in order.
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "qwk", "ovr_macro_auc",
           "referable_auc", "referable_sensitivity", "referable_specificity")
#: Resamples are computed in chunks of at most this many (resample, image) weights.
_CHUNK_CELLS = 4_000_000
#: A paired difference's verdicts: whether its interval excludes 0.
DISTINGUISHABLE, NOT_DISTINGUISHABLE = "distinguishable from zero", "not distinguishable from zero"

#: A function from weights ``(B, n)`` to one array of ``B`` values per metric.
Scorer = Callable[[np.ndarray], dict[str, np.ndarray]]


def resample_weights(groups: ArrayLike | None, n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield ``(chunk, n)`` resampling weights: how often each image is drawn.

    Clusters (patients) are drawn with replacement and carry all their images along, so
    the two eyes of a patient always enter a resample together. Chunks keep memory flat.
    """
    if groups is None:
        gidx, n_groups = np.arange(n), n
    else:
        labels = np.asarray(groups).astype(str)
        if labels.shape != (n,):
            raise ValueError(f"groups must hold {n} ids, got shape {labels.shape}")
        _, gidx = np.unique(labels, return_inverse=True)
        n_groups = int(gidx.max()) + 1 if n else 0
    rng = np.random.default_rng(seed)
    step = max(1, _CHUNK_CELLS // max(n, n_groups, 1))
    for start in range(0, n_boot, step):
        b = min(step, n_boot - start)
        draws = rng.integers(0, n_groups, size=(b, n_groups))
        counts = np.bincount((draws + n_groups * np.arange(b)[:, None]).ravel(),
                             minlength=b * n_groups).reshape(b, n_groups)
        yield counts[:, gidx].astype(np.float64)


def weighted_auc(positive: np.ndarray, scores: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUC for each row of weights ``w`` (Mann-Whitney, ties count one half).

    With integer weights this is :func:`metrics.roc_auc` on the resampled data; ``nan``
    where a row has no positive or no negative weight.
    """
    order = np.argsort(scores, kind="stable")
    s, pos, w = scores[order], positive[order], w[:, order]
    wp, wn = w * pos, w * ~pos
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    if starts.size < s.size:  # tied scores: one block per distinct score (skipped when none)
        wp, wn = np.add.reduceat(wp, starts, axis=1), np.add.reduceat(wn, starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    num = (wp * (below + 0.5 * wn)).sum(axis=1)
    den = wp.sum(axis=1) * wn.sum(axis=1)
    return metrics.safe_divide(num, den, float("nan"))


def metric_scorer(y_true: ArrayLike, y_pred: ArrayLike, probs: ArrayLike | None,
                  referable_score: ArrayLike | None, threshold: float | None,
                  num_classes: int) -> tuple[int, Scorer]:
    """Validate once; return ``n`` and a function from weights ``(B, n)`` to metric rows."""
    t, p = metrics.check_pair(y_true, y_pred, num_classes)
    n = t.size
    if n == 0:
        raise ValueError("cannot bootstrap zero predictions")
    pr = None if probs is None else metrics.check_probs(probs, n, num_classes)
    if referable_score is None and pr is not None:
        referable_score = pr[:, REFERABLE_GRADE:].sum(axis=1)
    rs = None if referable_score is None else metrics.check_scores(referable_score, n, "referable_score")
    if threshold is not None and rs is None:
        raise ValueError("a threshold needs a referable score (or probs)")
    cells = np.eye(num_classes * num_classes)[t * num_classes + p]  # (n, K*K) one-hot
    ref_true = t >= REFERABLE_GRADE
    ref_pred = p >= REFERABLE_GRADE if threshold is None else rs >= threshold

    def score(w: np.ndarray) -> dict[str, np.ndarray]:
        cms = (w @ cells).reshape(-1, num_classes, num_classes)
        rows = {name: np.array([f(cm) for cm in cms]) for name, f in (
            ("accuracy", metrics.cm_accuracy), ("balanced_accuracy", metrics.cm_balanced_accuracy),
            ("macro_f1", metrics.cm_macro_f1), ("qwk", metrics.cm_qwk))}
        if pr is not None:
            per_grade = np.stack([weighted_auc(t == k, pr[:, k], w) for k in range(num_classes)])
            with np.errstate(all="ignore"), warnings.catch_warnings():  # all-nan: a skipped resample
                warnings.simplefilter("ignore", RuntimeWarning)
                present = (w @ (t[:, None] == np.arange(num_classes))).T > 0
                macro = np.nanmean(np.where(present, per_grade, np.nan), axis=0)
            rows["ovr_macro_auc"] = macro
        if rs is not None:
            rows["referable_auc"] = weighted_auc(ref_true, rs, w)
        pos, neg = w @ ref_true, w @ ~ref_true
        rows["referable_sensitivity"] = metrics.safe_divide(w @ (ref_true & ref_pred), pos, np.nan)
        rows["referable_specificity"] = metrics.safe_divide(w @ (~ref_true & ~ref_pred), neg, np.nan)
        return rows

    return n, score


def percentile_interval(estimate: float, samples: np.ndarray, level: float) -> dict[str, Any]:
    """``estimate`` with the percentile interval of ``samples``; ``nan`` samples (a metric
    undefined in that resample) are left out and counted in ``skipped``."""
    ok = samples[~np.isnan(samples)]
    lo, hi = (np.percentile(ok, [50 * (1 - level), 50 * (1 + level)]) if ok.size
              else (np.nan, np.nan))
    return {"estimate": float(estimate), "low": float(lo), "high": float(hi),
            "skipped": int(samples.size - ok.size)}


def paired_interval(estimate: float, samples: np.ndarray, level: float) -> dict[str, Any]:
    """:func:`percentile_interval` of a difference, with its ``verdict``: whether it excludes 0."""
    r = percentile_interval(estimate, samples, level)
    r["verdict"] = DISTINGUISHABLE if r["low"] > 0 or r["high"] < 0 else NOT_DISTINGUISHABLE
    return r


def bootstrap_samples(score: Scorer, n: int, groups: ArrayLike | None, n_boot: int,
                      seed: int) -> dict[str, np.ndarray]:
    """``score`` of each of ``n_boot`` resamples (:func:`resample_weights`), per metric."""
    chunks = [score(w) for w in resample_weights(groups, n, n_boot, seed)]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def bootstrap_meta(groups: ArrayLike | None, n: int, n_boot: int, seed: int, level: float) -> dict[str, Any]:
    """Check ``n_boot`` and ``level``; the ``unit``, counts and settings a result reports."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    units = n if groups is None else len(set(np.asarray(groups).astype(str).tolist()))
    return {"unit": "image" if groups is None else "patient", "n_units": units, "n_images": n,
            "n_boot": n_boot, "seed": seed, "level": level}


def check_metric_names(metric_names: Sequence[str]) -> None:
    """Raise ValueError unless every name is one of :data:`METRICS`."""
    unknown = set(metric_names) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")


def bootstrap_ci(y_true: ArrayLike, y_pred: ArrayLike, probs: ArrayLike | None = None, *,
                 referable_score: ArrayLike | None = None, groups: ArrayLike | None = None,
                 threshold: float | None = None, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95, num_classes: int = NUM_GRADES) -> dict[str, Any]:
    """Percentile bootstrap intervals for the headline metrics of :data:`METRICS`.

    Each resample draws units with replacement: patients when ``groups`` (one id per
    image) is given, images otherwise. Every metric is the one of :mod:`retinocli.reporting.metrics`
    on the resampled data (computed from bincount-style weighted confusion matrices, so a
    resample costs no copy). A metric undefined in a resample (one class only) is left out
    of that metric's interval and counted in ``skipped``. Same input and seed, same interval.

    Args:
        y_true, y_pred: grades per image (or per patient, from
            :func:`retinocli.reporting.clinical.patient_table`).
        probs: ``(n, num_classes)`` probabilities; adds ``ovr_macro_auc`` and, without
            ``referable_score``, a referable score = the summed probability of grades >= 2.
        referable_score: the referable-DR score; adds ``referable_auc``.
        groups: cluster id per row (patient ids); None resamples rows.
        threshold: referable when ``referable_score >= threshold`` (a frozen operating point,
            :func:`retinocli.reporting.clinical.choose_threshold`); None uses ``y_pred >= 2``.
        n_boot: resamples. seed: the generator's seed. level: interval coverage.

    Returns:
        ``{"unit", "n_units", "n_images", "n_boot", "seed", "level", "threshold",
        "metrics": {name: {"estimate", "low", "high", "skipped"}}}``, JSON-serialisable.
    """
    n, score = metric_scorer(y_true, y_pred, probs, referable_score, threshold, num_classes)
    meta = bootstrap_meta(groups, n, n_boot, seed, level)
    point = score(np.ones((1, n)))
    samples = bootstrap_samples(score, n, groups, n_boot, seed)
    return {**meta, "threshold": threshold,
            "metrics": {k: percentile_interval(point[k][0], samples[k], level) for k in point}}


def paired_bootstrap(y_true: ArrayLike, probs_a: ArrayLike, probs_b: ArrayLike, *,
                     groups: ArrayLike | None = None,
                     metric_names: Sequence[str] = ("qwk", "referable_auc"),
                     n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Bootstrap the difference A - B of two models' metrics on the same images.

    Both models are scored on the same resample (patients drawn jointly when ``groups``),
    so what they share cancels and the interval is that of the difference. Predictions are
    the argmax of the probabilities, the referable score their sum over grades >= 2.

    Returns:
        Meta as :func:`bootstrap_ci`, and ``metrics: {name: {"estimate", "low", "high",
        "skipped", "verdict"}}``; the verdict is ``"distinguishable from zero"`` when the
        interval excludes 0, else ``"not distinguishable from zero"``.
    """
    pa, pb = np.asarray(probs_a, dtype=np.float64), np.asarray(probs_b, dtype=np.float64)
    if pa.shape != pb.shape or pa.ndim != 2:
        raise ValueError(f"probs_a {pa.shape} and probs_b {pb.shape} must be the same (n, K)")
    scorers = [metric_scorer(y_true, p.argmax(axis=1), p, None, None, p.shape[1]) for p in (pa, pb)]
    n = scorers[0][0]
    meta = bootstrap_meta(groups, n, n_boot, seed, level)
    check_metric_names(metric_names)

    def diff(w: np.ndarray) -> dict[str, np.ndarray]:
        a, b = (s(w) for _, s in scorers)
        return {k: a[k] - b[k] for k in metric_names}

    point = diff(np.ones((1, n)))
    samples = bootstrap_samples(diff, n, groups, n_boot, seed)
    return {**meta, "metrics": {k: paired_interval(point[k][0], samples[k], level) for k in metric_names}}
