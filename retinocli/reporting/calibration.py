"""Calibration of grade probabilities: temperature scaling, ECE, reliability-diagram data.

Numpy only, scipy imported by :func:`fit_temperature`. No torch: a temperature fitted at
training time is one float, stored with the model and applied to saved probabilities.

Temperature scaling (Guo et al., 2017) divides the logits by one ``T > 0`` fitted on the
validation split by minimising the negative log-likelihood; it changes confidence, never
the predicted grade (argmax). Probabilities are turned back into logits with ``log``
(softmax is invariant to the constant that loses), so either can be passed.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["apply_temperature", "ece", "fit_temperature", "nll", "reliability"]

#: Probabilities are clipped here before ``log``: a saved 0.0 must not give ``-inf``.
EPS = 1e-12
#: The search range of the temperature (a wider one only finds degenerate optima).
T_RANGE = (0.05, 20.0)


def _logits(scores: ArrayLike, logits: bool) -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected an (n, classes) array, got shape {x.shape}")
    return x if logits else np.log(np.clip(x, EPS, None))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _labels(y: ArrayLike, n: int) -> np.ndarray:
    t = np.asarray(y, dtype=np.int64)
    if t.shape != (n,):
        raise ValueError(f"y_true must hold {n} labels, got shape {t.shape}")
    return t


def apply_temperature(scores: ArrayLike, temperature: float, *, logits: bool = False) -> np.ndarray:
    """Probabilities ``softmax(logits / T)``; ``scores`` are probabilities unless ``logits``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return np.exp(_log_softmax(_logits(scores, logits) / temperature))


def nll(probs: ArrayLike, y_true: ArrayLike) -> float:
    """Mean negative log-likelihood of the true labels (natural log; probabilities clipped at EPS)."""
    p = np.asarray(probs, dtype=np.float64)
    t = _labels(y_true, len(p))
    return float(-np.log(np.clip(p[np.arange(len(t)), t], EPS, None)).mean())


def fit_temperature(scores: ArrayLike, y_true: ArrayLike, *, logits: bool = False) -> float:
    """The temperature minimising the validation NLL (bounded search on ``log T``).

    NLL is convex in ``1/T``, hence unimodal in ``log T``, so a bounded scalar search finds
    the optimum within :data:`T_RANGE`. ``T > 1`` softens an over-confident model.
    """
    from scipy.optimize import minimize_scalar

    z = _logits(scores, logits)
    t = _labels(y_true, len(z))
    if len(t) == 0:
        raise ValueError("cannot fit a temperature on zero samples")
    rows = np.arange(len(t))

    def loss(log_t: float) -> float:
        return float(-_log_softmax(z / np.exp(log_t))[rows, t].mean())

    res = minimize_scalar(loss, bounds=tuple(np.log(T_RANGE)), method="bounded",
                          options={"xatol": 1e-6})
    return float(np.exp(res.x))


def reliability(probs: ArrayLike, y_true: ArrayLike, n_bins: int = 15) -> dict[str, list]:
    """Reliability-diagram data on top-1 confidence, equal-width bins ``((m-1)/M, m/M]``.

    Returns:
        Lists of length ``n_bins``: ``low``, ``high`` (bin edges), ``count``, ``confidence``
        (mean top-1 probability) and ``accuracy`` (fraction whose argmax is right); the
        last two are ``nan`` for an empty bin. JSON-serialisable.
    """
    p = np.asarray(probs, dtype=np.float64)
    t = _labels(y_true, len(p))
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == t).astype(np.float64)
    # ceil(conf * M) - 1 puts a confidence on an edge m/M in the bin it closes, as Guo et al.
    b = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, conf, minlength=n_bins) / count
        acc = np.bincount(b, correct, minlength=n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {"low": edges[:-1].tolist(), "high": edges[1:].tolist(), "count": count.tolist(),
            "confidence": mean_conf.tolist(), "accuracy": acc.tolist()}


def ece(probs: ArrayLike, y_true: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error: ``sum_bins |accuracy - confidence| * n_bin / N``.

    The standard top-1 definition (Guo et al., 2017; Naeini et al., 2015) on the bins of
    :func:`reliability`. ``nan`` for empty input.
    """
    r = reliability(probs, y_true, n_bins)
    count = np.asarray(r["count"], dtype=np.float64)
    if count.sum() == 0:
        return float("nan")
    gap = np.abs(np.asarray(r["accuracy"]) - np.asarray(r["confidence"]))
    return float(np.sum(np.where(count > 0, gap, 0.0) * count) / count.sum())
