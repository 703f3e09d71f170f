"""Clinical honesty (#15): patients, a frozen referral threshold, both-eye fusion and seed
summaries; the confidence intervals are :mod:`retinocli.reporting.bootstrap`'s.

Screening programmes judge a grader on patients, with confidence intervals, at an operating
point fixed before the test set is seen (the IDx-DR pivotal trial: sensitivity 87.2 %,
specificity 90.7 % for referable DR). This module gives each of those from saved
predictions (the columns of :mod:`retinocli.deploy.schema`). Numpy and pandas only;
scikit-learn is imported by :func:`fit_fusion` alone, never at predict time. No torch.

Public API (one-line contracts; details in each docstring):

* :func:`patient_ids` / :func:`patient_table`: images -> patients, worse eye decides.
* :func:`prediction_arrays` / :func:`paired_arrays`: the arrays of one model's predictions, or
  of two models' on the same images, that the intervals of :mod:`retinocli.reporting.bootstrap`
  take (:func:`~retinocli.reporting.bootstrap.bootstrap_ci`, ``paired_bootstrap``).
* :func:`choose_threshold` / :func:`operating_point`: a referral threshold frozen on validation.
* :func:`fit_fusion` / :func:`apply_fusion` / :func:`fuse` / :func:`check_fusion`: fellow-eye fusion.
* :func:`summarise_seeds`: mean and sd of each metric over runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from retinocli import GRADE_NAMES, NUM_GRADES
from retinocli.reporting import metrics
from retinocli.errors import RetinoError
from retinocli.data.files import parse_patient_eye
from retinocli.reporting.metrics import REFERABLE_GRADE
from retinocli.deploy.schema import (CONFIDENCE, GRADE_NAME, IMAGE, PREDICTED_GRADE, REFERABLE_PROB,
                              STATUS, TRUE_GRADE, OK, prob_column)

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "apply_fusion", "check_fusion", "choose_threshold", "fellow_probs", "fit_fusion", "fuse", "ok_mask",
    "operating_point", "paired_arrays", "patient_ids", "patient_table", "prediction_arrays",
    "summarise_seeds",
]

PATIENT, EYE = "patient", "eye"


# ------------------------------------------------------------------------------ patients


def patient_ids(images: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Patient and eye of every image name (``10_left`` -> ``10``, ``left``).

    A frame's ``patient`` and ``eye`` columns, when present, take precedence over these
    everywhere in this module (datasets whose names carry no ids can supply them).

    An image whose name carries no patient id is its own patient (its name) with eye None,
    so clustering on these ids never merges unrelated images.
    """
    pe = [parse_patient_eye(str(name)) for name in images]
    patients = np.array([p if p is not None else str(name) for (p, _), name in zip(pe, images)],
                        dtype=object)
    return patients, np.array([e for _, e in pe], dtype=object)


def _ids(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Patient and eye per row: the ``patient``/``eye`` columns when present, else parsed."""
    patients, eyes = patient_ids(df[IMAGE].astype(str).tolist())
    if PATIENT in df.columns:
        patients = df[PATIENT].astype(str).to_numpy(dtype=object)
    if EYE in df.columns:
        eyes = np.array([e if isinstance(e, str) else None for e in df[EYE]], dtype=object)
    return patients, eyes


def ok_mask(df: pd.DataFrame) -> np.ndarray:
    """Rows with a prediction: unreadable images (status error) carry none."""
    ok = df[PREDICTED_GRADE].notna().to_numpy()
    return ok & (df[STATUS].astype(str) == OK).to_numpy() if STATUS in df.columns else ok


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[ok_mask(df)]


def patient_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per patient from a predictions frame; the worse eye decides.

    Grading rule: a patient's grade is the worse (higher) grade of their eyes, true and
    predicted alike, and a patient is referable when that grade is >= 2. The patient's
    referable probability is the **maximum** over their eyes: thresholding it refers exactly
    the patients with at least one eye over the threshold, the same rule as for grades. (A
    product ``1 - prod(1 - p_eye)`` would assume the eyes independent, which fellow eyes are
    not, and would inflate the score of every two-eye patient.) Several images of one eye
    are combined by the same worst-case rule.

    Args:
        df: rows in the predictions schema (``image``, ``predicted_grade``,
            ``referable_prob``, ``true_grade`` when labelled); a ``patient`` (and ``eye``)
            column, if present, overrides the ids parsed from the image names.

    Returns:
        Columns ``patient``, ``images`` (count), ``eyes`` (e.g. ``left,right``; empty when
        unknown), ``predicted_grade_<eye>`` and ``true_grade_<eye>`` for each eye seen
        (nullable ints), ``predicted_grade``, ``referable_prob``, ``predicted_referable``
        and, when labelled, ``true_grade``, ``true_referable``. Sorted by patient.
    """
    import pandas as pd

    df = _ok(df).copy()
    df[PATIENT], df[EYE] = _ids(df)
    grades = [c for c in (TRUE_GRADE, PREDICTED_GRADE) if c in df.columns]
    for c in grades:
        df[c] = df[c].astype(np.int64)
    g = df.groupby(PATIENT, sort=True)
    out = pd.DataFrame({
        "images": g.size(),
        "eyes": g[EYE].agg(lambda e: ",".join(sorted({str(x) for x in e.dropna()}))),
    })
    for eye, sub in df[df[EYE].notna()].groupby(EYE, sort=True):
        for c in grades:
            out[f"{c}_{eye}"] = sub.groupby(PATIENT)[c].max().reindex(out.index).astype("Int64")
    for c in grades:
        out[c] = g[c].max()
    out[REFERABLE_PROB] = g[REFERABLE_PROB].max().astype(np.float64)
    out["predicted_referable"] = out[PREDICTED_GRADE] >= REFERABLE_GRADE
    if TRUE_GRADE in out:
        out["true_referable"] = out[TRUE_GRADE] >= REFERABLE_GRADE
    return out.reset_index()


def prediction_arrays(df: pd.DataFrame, *, by_patient: bool = True) -> dict[str, Any]:
    """``y_true``, ``y_pred``, ``probs``, ``referable_score`` and ``groups`` of a labelled
    predictions frame: the keyword arguments of :func:`retinocli.reporting.bootstrap.bootstrap_ci`.

    ``groups`` are the patient ids (:func:`patient_ids`) when ``by_patient``, else None.
    """
    if TRUE_GRADE not in df.columns:
        raise RetinoError("these predictions hold no true grades: use the predictions.csv "
                          "that `retino evaluate` wrote")
    df = _ok(df)
    k = sum(1 for c in df.columns if str(c).startswith("prob_"))
    return {
        "y_true": df[TRUE_GRADE].to_numpy(np.int64),
        "y_pred": df[PREDICTED_GRADE].to_numpy(np.int64),
        "probs": df[[prob_column(j) for j in range(k)]].to_numpy(np.float64),
        "referable_score": df[REFERABLE_PROB].to_numpy(np.float64),
        "groups": _ids(df)[0] if by_patient else None,
    }


def paired_arrays(a: pd.DataFrame, b: pd.DataFrame, *, by_patient: bool = True) -> dict[str, Any]:
    """``y_true``, ``probs_a``, ``probs_b`` and ``groups`` of two models' labelled predictions
    on the same images, aligned by image name: the arguments of
    :func:`retinocli.reporting.bootstrap.paired_bootstrap`.

    Raises:
        RetinoError: when the two frames do not hold the same images with the same grades.
    """
    x, y = (prediction_arrays(f, by_patient=by_patient) | {"image": _ok(f)[IMAGE].astype(str)}
            for f in (a, b))
    if sorted(x["image"]) != sorted(y["image"]) or x["image"].duplicated().any():
        raise RetinoError("the two predictions files do not hold the same images once each: a "
                          "paired comparison needs both models on the same test set")
    order = np.argsort(x["image"].to_numpy())
    other = np.argsort(y["image"].to_numpy())
    if not np.array_equal(x["y_true"][order], y["y_true"][other]):
        raise RetinoError("the two predictions files give some images different true grades")
    return {"y_true": x["y_true"][order], "probs_a": x["probs"][order],
            "probs_b": y["probs"][other],
            "groups": None if x["groups"] is None else x["groups"][order]}


# ---------------------------------------------------------------------- operating point


def operating_point(y_true: ArrayLike, referable_score: ArrayLike, threshold: float) -> dict[str, Any]:
    """Referable-DR sensitivity and specificity when ``score >= threshold`` refers.

    ``y_true`` are grades (referable when >= 2). Apply a threshold frozen on validation
    (:func:`choose_threshold`) to the test set; never re-choose it there.
    """
    t = metrics.check_labels(y_true, NUM_GRADES, "y_true") >= REFERABLE_GRADE
    refer = metrics.check_scores(referable_score, t.size, "referable_score") >= threshold
    c = {"tp": int(np.sum(t & refer)), "fn": int(np.sum(t & ~refer)),
         "fp": int(np.sum(~t & refer)), "tn": int(np.sum(~t & ~refer))}
    return {"threshold": float(threshold),
            "sensitivity": metrics.ratio(c["tp"], c["tp"] + c["fn"]),
            "specificity": metrics.ratio(c["tn"], c["tn"] + c["fp"]), **c}


def choose_threshold(y_true: ArrayLike, referable_score: ArrayLike,
                     target_sensitivity: float = 0.87) -> dict[str, Any]:
    """The highest referral threshold whose validation sensitivity is >= the target.

    Candidates are the distinct scores (a case is referred when ``score >= threshold``), so
    the highest one that reaches the target also has the best specificity among those that
    do. Ties: images with equal scores are referred together and never split, so the
    sensitivity reached can exceed the target by more than one case.

    Returns:
        :func:`operating_point` on the validation data, plus ``target_sensitivity``.

    Raises:
        RetinoError: a target outside (0, 1], or a validation set with no referable image.
    """
    if not 0 < target_sensitivity <= 1:
        raise RetinoError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    t = metrics.check_labels(y_true, NUM_GRADES, "y_true") >= REFERABLE_GRADE
    if not t.any():
        raise RetinoError("cannot choose a referral threshold: the validation set has no "
                          "referable (grade >= 2) image")
    _, tpr, thresholds = metrics.roc_curve(t, referable_score)
    # tpr rises as the threshold falls; the first point at the target is the highest threshold.
    best = float(thresholds[int(np.argmax(tpr >= target_sensitivity - 1e-12))])
    return {**operating_point(y_true, referable_score, best),
            "target_sensitivity": float(target_sensitivity)}


# -------------------------------------------------------------------------------- fusion

#: Probabilities are clipped here before ``log`` in the fusion features.
_FUSION_EPS = 1e-6
FUSION_KIND = "fellow-eye-logistic"


def fellow_probs(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The fellow eye's probabilities for every row of a predictions frame.

    The fellow of ``10_left`` is ``10_right`` (the mean if it has several images). Rows
    without a patient/eye id or whose fellow is absent get zeros and ``has_fellow = False``.
    """
    k = sum(1 for c in df.columns if str(c).startswith("prob_"))
    probs = df[[prob_column(j) for j in range(k)]].to_numpy(np.float64)
    patients, eyes = _ids(df)
    sums: dict[tuple[str, str], np.ndarray] = {}
    counts: dict[tuple[str, str], int] = {}
    for p, e, row in zip(patients, eyes, probs):
        if e is not None:
            sums[p, e] = sums.get((p, e), 0) + row
            counts[p, e] = counts.get((p, e), 0) + 1
    fellow, has = np.zeros_like(probs), np.zeros(len(probs), dtype=bool)
    other = {"left": "right", "right": "left"}
    for i, (p, e) in enumerate(zip(patients, eyes)):
        key = (p, other.get(e))
        if e is not None and key in sums:
            fellow[i], has[i] = sums[key] / counts[key], True
    return fellow, has


def _features(probs: np.ndarray, fellow: np.ndarray, has: np.ndarray) -> np.ndarray:
    """``[log own probs, log fellow probs (0 when absent), has_fellow]``.

    Log-probabilities make "ignore the fellow" exactly representable: with unit weights on
    the own logs and nothing else, the softmax gives back the eye's own probabilities.
    """
    has = np.asarray(has, dtype=bool)
    own = np.log(np.clip(probs, _FUSION_EPS, None))
    other = np.where(has[:, None], np.log(np.clip(fellow, _FUSION_EPS, None)), 0.0)
    return np.hstack([own, other, has[:, None].astype(np.float64)])


def fit_fusion(df: pd.DataFrame, *, c: float = 1.0) -> dict[str, Any]:
    """Fit the fellow-eye fusion on a labelled predictions frame (the validation split).

    A multinomial logistic regression (scikit-learn, L2 with inverse strength ``c``) of the
    true grade on :func:`_features`: the Kaggle 2015 winners' observation that a patient's
    two eyes are graded alike, learnt rather than hand-set.

    Returns:
        A plain JSON-serialisable dict (``kind``, ``num_grades``, ``coef``, ``intercept``,
        ``eps``) for a checkpoint or ONNX metadata; :func:`fuse` applies it with numpy.
    """
    from sklearn.linear_model import LogisticRegression

    df = _ok(df)
    arrays = prediction_arrays(df, by_patient=False)
    fellow, has = fellow_probs(df)
    k = arrays["probs"].shape[1]
    present = np.unique(arrays["y_true"])
    if present.size != k:
        raise RetinoError(f"cannot fit fusion: the validation set holds grades {present.tolist()}, "
                          f"not all {k}")
    lr = LogisticRegression(C=c, max_iter=2000)
    lr.fit(_features(arrays["probs"], fellow, has), arrays["y_true"])
    return {"kind": FUSION_KIND, "version": 1, "num_grades": int(k), "eps": _FUSION_EPS,
            "coef": lr.coef_.tolist(), "intercept": lr.intercept_.tolist()}


def check_fusion(model: Mapping[str, Any] | str) -> dict[str, Any]:
    """A fusion model from its dict or JSON text, checked; RetinoError when malformed."""
    import json

    try:
        m = json.loads(model) if isinstance(model, str) else dict(model)
        k = int(m["num_grades"])
        coef, intercept = np.asarray(m["coef"], float), np.asarray(m["intercept"], float)
        ok = m.get("kind") == FUSION_KIND and coef.shape == (k, 2 * k + 1) and intercept.shape == (k,)
    except (ValueError, TypeError, KeyError):
        ok = False
    if not ok:
        raise RetinoError("the stored fellow-eye fusion model is malformed")
    return m


def fuse(probs: ArrayLike, fellow: ArrayLike, has_fellow: ArrayLike,
         model: Mapping[str, Any]) -> np.ndarray:
    """Fused probabilities ``softmax(features @ coef.T + intercept)``; numpy only."""
    m = check_fusion(model)
    z = (_features(np.asarray(probs, float), np.asarray(fellow, float), np.asarray(has_fellow))
         @ np.asarray(m["coef"]).T + np.asarray(m["intercept"]))
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def apply_fusion(df: pd.DataFrame, model: Mapping[str, Any]) -> pd.DataFrame:
    """A copy of a predictions frame with fused probabilities and the columns derived
    from them (``predicted_grade``, ``grade_name``, ``confidence``, ``referable_prob``).

    Fellows are looked up among the rows of ``df`` itself, so pass both eyes together.
    """
    out = df.copy()
    ok = ok_mask(out)
    sub = out[ok]
    fellow, has = fellow_probs(sub)
    k = int(check_fusion(model)["num_grades"])
    cols = [prob_column(j) for j in range(k)]
    fused = fuse(sub[cols].to_numpy(float), fellow, has, model)
    grade = fused.argmax(axis=1)
    names = [*GRADE_NAMES, *(f"Grade {j}" for j in range(len(GRADE_NAMES), k))]
    out.loc[ok, cols] = fused
    out.loc[ok, PREDICTED_GRADE] = grade
    out.loc[ok, CONFIDENCE] = fused.max(axis=1)
    out.loc[ok, REFERABLE_PROB] = fused[:, REFERABLE_GRADE:].sum(axis=1)
    if GRADE_NAME in out:
        out.loc[ok, GRADE_NAME] = [names[g] for g in grade]
    return out


# --------------------------------------------------------------------------------- seeds


def summarise_seeds(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean ± sample sd (ddof 1; ``nan`` for one run) of each numeric metric over runs.

    Only keys that every run holds as a number are summarised; ``nan`` values are left out
    of that metric's mean and counted by ``n``.
    """
    if not runs:
        raise ValueError("no runs to summarise")
    keys = [k for k in runs[0] if all(isinstance(r.get(k), (int, float)) and not isinstance(
        r.get(k), bool) for r in runs)]
    out = {}
    for k in keys:
        v = np.array([float(r[k]) for r in runs])
        v = v[~np.isnan(v)]
        out[k] = {"mean": float(v.mean()) if v.size else float("nan"),
                  "sd": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
                  "n": int(v.size), "values": v.tolist()}
    return out
