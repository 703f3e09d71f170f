"""Tests for retinocli.reporting.metrics: hand-worked cases, scikit-learn as an oracle, edge cases."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from retinocli.reporting import metrics as m

REPO = Path(__file__).resolve().parents[1]

# Hand-worked 5-grade case, used by several tests.
#   y_true  0 1 2 3 4 0 1 2
#   y_pred  0 2 2 1 4 0 2 3
Y_TRUE_5 = [0, 1, 2, 3, 4, 0, 1, 2]
Y_PRED_5 = [0, 2, 2, 1, 4, 0, 2, 3]
CM_5 = [
    [2, 0, 0, 0, 0],  # true 0 -> predicted 0, 0
    [0, 0, 2, 0, 0],  # true 1 -> predicted 2, 2
    [0, 0, 1, 1, 0],  # true 2 -> predicted 2, 3
    [0, 1, 0, 0, 0],  # true 3 -> predicted 1
    [0, 0, 0, 0, 1],  # true 4 -> predicted 4
]

# Hand-worked 3-grade case.
#   y_true  0 0 1 1 2 2
#   y_pred  0 1 1 1 2 0
Y_TRUE_3 = [0, 0, 1, 1, 2, 2]
Y_PRED_3 = [0, 1, 1, 1, 2, 0]
CM_3 = [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


# ----------------------------------------------------------------------- hand-worked cases


def test_confusion_matrix_by_hand() -> None:
    cm = m.confusion_matrix(Y_TRUE_5, Y_PRED_5)
    assert cm.dtype == np.int64
    assert cm.tolist() == CM_5
    assert m.confusion_matrix(np.array(Y_TRUE_3), np.array(Y_PRED_3), 3).tolist() == CM_3


def test_per_class_by_hand() -> None:
    # Columns sums (predicted) 2, 3, 1; row sums (support) 2, 2, 2; diagonal 1, 2, 1.
    # precision 1/2, 2/3, 1/1; recall 1/2, 2/2, 1/2
    # f1 = 2tp / (2tp + fp + fn): 2/(2+1+1) = 1/2, 4/(4+1+0) = 4/5, 2/(2+0+1) = 2/3
    s = m.per_class(CM_3)
    np.testing.assert_allclose(s["precision"], [1 / 2, 2 / 3, 1.0])
    np.testing.assert_allclose(s["recall"], [1 / 2, 1.0, 1 / 2])
    np.testing.assert_allclose(s["f1"], [1 / 2, 4 / 5, 2 / 3])
    assert s["support"].tolist() == [2, 2, 2]


def test_scalar_scores_by_hand() -> None:
    # accuracy = trace / n = 4/6; balanced = mean recall = (1/2 + 1 + 1/2)/3 = 2/3
    # macro F1 = (1/2 + 4/5 + 2/3)/3 = (15 + 24 + 20)/30/3 = 59/90
    assert m.accuracy(Y_TRUE_3, Y_PRED_3, 3) == pytest.approx(4 / 6)
    assert m.balanced_accuracy(Y_TRUE_3, Y_PRED_3, 3) == pytest.approx(2 / 3)
    assert m.macro_f1(Y_TRUE_3, Y_PRED_3, 3) == pytest.approx(59 / 90)


def test_qwk_by_hand() -> None:
    # Weights (i-j)^2 = [[0,1,4],[1,0,1],[4,1,0]].
    # Observed disagreement: cm[0,1]*1 + cm[2,0]*4 = 1 + 4 = 5.
    # Expected counts E = outer(rows, cols)/n, rows = (2,2,2), cols = (2,3,1), n = 6:
    #   each row of E = (4, 6, 2)/6; weighted: row0 (0*4 + 1*6 + 4*2)/6 = 14/6,
    #   row1 (1*4 + 0 + 1*2)/6 = 6/6, row2 (4*4 + 1*6 + 0)/6 = 22/6; total 42/6 = 7.
    # kappa = 1 - 5/7 = 2/7.
    assert m.quadratic_weighted_kappa(Y_TRUE_3, Y_PRED_3, 3) == pytest.approx(2 / 7)


def test_qwk_weights_use_grade_values() -> None:
    # Only grades 0 and 4 present, always confused: observed = 2 * 16 = 32 disagreement,
    # rows = cols = (1, 1) at grades 0 and 4, E = 1/2 each cell, weighted 2 * 16 / 2 = 16.
    # kappa = 1 - 32/16 = -1, whatever the spacing between the two grades.
    assert m.quadratic_weighted_kappa([0, 4], [4, 0]) == pytest.approx(-1.0)
    # 0/1 confused with 4 present and correct: distance 0<->1 weighs 1, 4 is far away.
    # cm has (0,1), (1,0), (4,4); observed = 1 + 1 = 2; rows = cols = 1 at 0, 1, 4; n = 3;
    # sum w * outer = 2*(1 + 16 + 9) = 52, expected = 52/3; kappa = 1 - 2*3/52 = 23/26.
    assert m.quadratic_weighted_kappa([0, 1, 4], [1, 0, 4]) == pytest.approx(23 / 26)


def test_referable_by_hand() -> None:
    # Referable = grade >= 2. true: F F T T T F F T, pred: F T T F T F T T
    # tp = 3 (idx 2, 4, 7), fn = 1 (idx 3), fp = 2 (idx 1, 6), tn = 2 (idx 0, 5)
    # sensitivity 3/4, specificity 2/4, ppv 3/5, npv 2/3
    r = m.referable_scores(Y_TRUE_5, Y_PRED_5)
    assert (r["tp"], r["fn"], r["fp"], r["tn"]) == (3, 1, 2, 2)
    assert r["sensitivity"] == pytest.approx(3 / 4)
    assert r["specificity"] == pytest.approx(1 / 2)
    assert r["ppv"] == pytest.approx(3 / 5)
    assert r["npv"] == pytest.approx(2 / 3)
    assert "auc" not in r


def test_referable_auc_sums_grades_two_and_up() -> None:
    # Referable score s goes to grade 2 (0.6 s) and grade 4 (0.4 s): their sum is s.
    # true grades 0 1 2 3 -> referable 0 0 1 1 with s = 0.1 0.4 0.35 0.8 -> AUC 3/4
    # (see test_roc_auc_by_hand).
    s = np.array([0.1, 0.4, 0.35, 0.8])
    probs = np.zeros((4, 5))
    probs[:, 0] = 1 - s
    probs[:, 2] = 0.6 * s
    probs[:, 4] = 0.4 * s
    r = m.referable_scores([0, 1, 2, 3], [0, 0, 2, 2], probs)
    assert r["auc"] == pytest.approx(0.75)


def test_roc_auc_by_hand() -> None:
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4:
    # 0.35 > 0.1, 0.35 < 0.4, 0.8 > both -> 3 of 4 pairs -> 0.75.
    assert m.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # With a tie: positives 0.5, 0.9 vs negatives 0.2, 0.5:
    # 0.5 > 0.2 (1), 0.5 = 0.5 (1/2), 0.9 > both (2) -> 3.5 / 4 = 0.875.
    # Average ranks: 0.2 -> 1, 0.5 -> 2.5 (twice), 0.9 -> 4; positives 2.5 + 4 = 6.5;
    # U = 6.5 - 2*3/2 = 3.5.
    assert m.roc_auc([0, 1, 0, 1], [0.2, 0.5, 0.5, 0.9]) == pytest.approx(0.875)
    assert m.roc_auc([True, False], [0.3, 0.7]) == 0.0


def test_roc_curve_by_hand() -> None:
    # Scores sorted down: 0.8 (pos), 0.4 (neg), 0.35 (pos), 0.1 (neg); 2 pos, 2 neg.
    fpr, tpr, thr = m.roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])
    # Tied scores give one point: 0.5 takes one positive and one negative at once.
    fpr, tpr, thr = m.roc_curve([0, 1, 0, 1], [0.2, 0.5, 0.5, 0.9])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.5, 0.2])


def test_majority_baseline_by_hand() -> None:
    # Counts 2, 2, 2, 1, 1: a three-way tie goes to the lowest grade; 2/8 correct.
    assert m.majority_baseline(Y_TRUE_5) == (0, 0.25)
    assert m.majority_baseline([3, 3, 1]) == (3, pytest.approx(2 / 3))


def test_summarize_by_hand() -> None:
    s = m.summarize(Y_TRUE_5, Y_PRED_5)
    # accuracy: idx 0, 2, 4, 5 correct -> 4/8; majority 2/8; gap 1/4
    assert s["n"] == 8
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["majority_grade"] == 0
    assert s["majority_accuracy"] == pytest.approx(0.25)
    assert s["accuracy_gap"] == pytest.approx(0.25)
    # recalls 2/2, 0/2, 1/2, 0/1, 1/1 -> 2.5/5
    assert s["balanced_accuracy"] == pytest.approx(0.5)
    assert s["confusion_matrix"] == CM_5
    assert s["confusion_normalized"][2] == [0, 0, 0.5, 0.5, 0]
    assert s["per_class"][1] == {
        "grade": 1, "name": "Mild", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2
    }
    assert s["referable"]["sensitivity"] == pytest.approx(0.75)


# ---------------------------------------------------------------------- sklearn as oracle


def _case(seed: int, prior: list[float], n: int = 200) -> tuple[np.ndarray, ...]:
    """Imbalanced grades, predictions off by one grade 40% of the time, tied probs."""
    rng = np.random.default_rng(seed)
    y_true = rng.choice(5, size=n, p=prior)
    off = rng.random(n) < 0.4
    y_pred = np.clip(y_true + off * rng.choice([-1, 1], size=n), 0, 4)
    # Small integer weights make many tied probabilities; rows sum to one for sklearn.
    weights = rng.integers(1, 5, size=(n, 5)).astype(float)
    weights[np.arange(n), y_true] += rng.integers(0, 4, size=n)
    probs = weights / weights.sum(axis=1, keepdims=True)
    return y_true, y_pred, probs


ALL_PRESENT = [0.55, 0.1, 0.2, 0.05, 0.1]
SOME_ABSENT = [0.7, 0.0, 0.2, 0.0, 0.1]  # y_pred still reaches grades 1 and 3
CASES = [(seed, ALL_PRESENT) for seed in range(4)] + [(seed, SOME_ABSENT) for seed in (4, 5)]


@pytest.mark.parametrize(("seed", "prior"), CASES)
def test_label_metrics_match_sklearn(seed: int, prior: list[float]) -> None:
    skm = pytest.importorskip("sklearn.metrics")
    y_true, y_pred, _ = _case(seed, prior)
    labels = list(range(5))

    np.testing.assert_array_equal(
        m.confusion_matrix(y_true, y_pred), skm.confusion_matrix(y_true, y_pred, labels=labels)
    )
    assert m.quadratic_weighted_kappa(y_true, y_pred) == pytest.approx(
        skm.cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic")
    )
    with warnings.catch_warnings():  # sklearn warns when y_pred has grades y_true lacks
        warnings.simplefilter("ignore")
        expected_balanced = skm.balanced_accuracy_score(y_true, y_pred)
    assert m.balanced_accuracy(y_true, y_pred) == pytest.approx(expected_balanced)
    assert m.macro_f1(y_true, y_pred) == pytest.approx(
        skm.f1_score(y_true, y_pred, average="macro", zero_division=0)
    )
    assert m.accuracy(y_true, y_pred) == pytest.approx(skm.accuracy_score(y_true, y_pred))

    scores = m.per_class(m.confusion_matrix(y_true, y_pred))
    for key, fn in [
        ("precision", skm.precision_score),
        ("recall", skm.recall_score),
        ("f1", skm.f1_score),
    ]:
        expected = fn(y_true, y_pred, labels=labels, average=None, zero_division=0)
        np.testing.assert_allclose(scores[key], expected, err_msg=key)


@pytest.mark.parametrize(("seed", "prior"), CASES)
def test_ranking_metrics_match_sklearn(seed: int, prior: list[float]) -> None:
    skm = pytest.importorskip("sklearn.metrics")
    y_true, _, probs = _case(seed, prior)

    referable = y_true >= 2
    score = probs[:, 2:].sum(axis=1)
    assert m.roc_auc(referable, score) == pytest.approx(skm.roc_auc_score(referable, score))

    fpr, tpr, thr = m.roc_curve(referable, score)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(referable, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    trapezoid = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert trapezoid == pytest.approx(m.roc_auc(referable, score))

    present = np.unique(y_true)
    if len(present) == 5:
        expected = skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro")
    else:  # sklearn refuses absent classes; average its binary AUCs over those present
        expected = np.mean([skm.roc_auc_score(y_true == k, probs[:, k]) for k in present])
    assert m.ovr_macro_auc(y_true, probs) == pytest.approx(expected)


# ------------------------------------------------------------------------------ edge cases


@pytest.mark.filterwarnings("error")
def test_single_class_is_nan_without_warnings() -> None:
    y = [0, 0, 0, 0]
    probs = np.full((4, 5), 0.2)
    assert math.isnan(m.roc_auc(y, [0.1, 0.2, 0.3, 0.4]))
    assert math.isnan(m.roc_auc([1, 1], [0.1, 0.2]))
    assert math.isnan(m.ovr_macro_auc(y, probs))
    fpr, tpr, _ = m.roc_curve(y, [0.1, 0.2, 0.3, 0.4])
    assert np.isnan(tpr).all() and fpr[0] == 0 and fpr[-1] == 1

    # Degenerate QWK: every label is the same grade -> 0/0 -> nan (as sklearn).
    assert math.isnan(m.quadratic_weighted_kappa(y, y))
    # One class in y_true but not in y_pred is defined: observed = expected -> 0.
    assert m.quadratic_weighted_kappa([0, 0, 0], [0, 1, 0]) == pytest.approx(0.0)

    s = m.summarize(y, y, probs)
    assert s["accuracy"] == 1.0 and s["balanced_accuracy"] == 1.0 and s["macro_f1"] == 1.0
    assert math.isnan(s["qwk"]) and math.isnan(s["ovr_macro_auc"])
    r = s["referable"]
    assert math.isnan(r["sensitivity"]) and math.isnan(r["ppv"]) and math.isnan(r["auc"])
    assert r["specificity"] == 1.0 and r["npv"] == 1.0
    assert s["confusion_normalized"][1:] == [[0.0] * 5] * 4


@pytest.mark.filterwarnings("error")
def test_never_predicted_and_absent_classes() -> None:
    # Grade 2 is never predicted, grade 3 never occurs: zero division -> 0.0.
    y_true, y_pred = [0, 1, 2, 4], [0, 1, 1, 3]
    s = m.per_class(m.confusion_matrix(y_true, y_pred))
    assert s["precision"][2] == 0.0 and s["recall"][3] == 0.0 and s["f1"][2] == 0.0
    # Macro F1 over grades seen in either array: 0, 1, 2, 3, 4 -> (1 + 2/3 + 0 + 0 + 0)/5.
    assert m.macro_f1(y_true, y_pred) == pytest.approx((1 + 2 / 3) / 5)
    # Balanced accuracy over grades in y_true: 0, 1, 2, 4 -> (1 + 1 + 0 + 0)/4.
    assert m.balanced_accuracy(y_true, y_pred) == pytest.approx(0.5)


def test_perfect_prediction() -> None:
    y = [0, 1, 2, 3, 4, 2, 0]
    assert m.quadratic_weighted_kappa(y, y) == 1.0
    s = m.summarize(y, y, np.eye(5)[y])
    assert s["accuracy"] == s["macro_f1"] == s["balanced_accuracy"] == 1.0
    assert s["ovr_macro_auc"] == 1.0 and s["referable"]["auc"] == 1.0


def test_summarize_is_json_and_complete() -> None:
    y_true, y_pred, probs = _case(0, ALL_PRESENT, n=50)
    s = m.summarize(list(y_true), list(y_pred), probs.tolist())
    assert set(s) == {
        "n", "accuracy", "majority_grade", "majority_accuracy", "accuracy_gap",
        "balanced_accuracy", "macro_f1", "qwk", "confusion_matrix", "confusion_normalized",
        "per_class", "referable", "ovr_macro_auc",
    }
    assert set(s["referable"]) == {
        "sensitivity", "specificity", "ppv", "npv", "tp", "fn", "fp", "tn", "auc"
    }
    assert [c["name"] for c in s["per_class"]][0] == "No DR"
    assert s == json.loads(json.dumps(s, allow_nan=True))
    assert "ovr_macro_auc" not in m.summarize(y_true, y_pred)
    # nan survives the round trip as NaN
    single = m.summarize([0, 0], [0, 0])
    assert math.isnan(json.loads(json.dumps(single))["qwk"])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: m.confusion_matrix([0, 1], [0]), "2 labels"),
        (lambda: m.confusion_matrix([0, 5], [0, 1]), "outside"),
        (lambda: m.confusion_matrix([0, -1], [0, 1]), "outside"),
        (lambda: m.confusion_matrix([0, 1], [0.0, 1.5]), "integer"),
        (lambda: m.confusion_matrix([[0, 1]], [[0, 1]]), "1-D"),
        (lambda: m.quadratic_weighted_kappa([0, 2], [0, 2], num_classes=2), "outside"),
        (lambda: m.roc_auc([0, 2], [0.1, 0.2]), "outside"),
        (lambda: m.roc_auc([0, 1], [0.1]), "scores"),
        (lambda: m.roc_auc([0, 1], [0.1, float("nan")]), "finite"),
        (lambda: m.ovr_macro_auc([0, 1], np.full((2, 2), 0.5)[:, :1]), "outside"),
        (lambda: m.summarize([0, 1], [0, 1], np.zeros((2, 4))), "shape"),
        (lambda: m.summarize([], []), "zero"),
        (lambda: m.majority_baseline([]), "empty"),
        (lambda: m.per_class(np.zeros((2, 3))), "square"),
    ],
)
def test_programmer_errors_raise_value_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_import_does_not_pull_torch_or_sklearn() -> None:
    code = (
        "import sys, retinocli.reporting.metrics; "
        "assert 'torch' not in sys.modules, 'torch'; "
        "assert 'sklearn' not in sys.modules, 'sklearn'"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
