"""Tests for retinocli.reporting.clinical, .bootstrap and .calibration: each statistic against an
independent computation (scikit-learn, scipy, numpy on explicitly resampled data, or a
hand-worked example)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from retinocli import GRADE_NAMES, RetinoError
from retinocli.reporting import bootstrap as bs
from retinocli.reporting import calibration as cal
from retinocli.reporting import clinical as c
from retinocli.reporting import metrics as m
from retinocli.deploy.schema import make_row

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def frame(images, true, probs, *, failed=()):
    """A predictions frame written through the real schema (evaluate's rows)."""
    rows = [make_row(name, f"/x/{name}", None if name in failed else p, GRADE_NAMES,
                     labelled=True, true_grade=t) for name, t, p in zip(images, true, probs)]
    return pd.DataFrame(rows)


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def noisy_probs(rng, true, strength=1.5, k=5):
    z = rng.normal(size=(len(true), k))
    z[np.arange(len(true)), true] += strength
    return softmax(z)


# ------------------------------------------------------------------------------ patients


def onehot(g, hi=0.7):
    p = np.full(5, (1 - hi) / 4)
    p[g] = hi
    return p


def test_patient_table_worse_eye_decides_hand_worked(tmp_path):
    images = ["10_left.jpeg", "10_right.jpeg", "11_left", "img_a.jpg", "12_right", "12_left"]
    true = [1, 3, 0, 2, 0, 4]
    pred = [0, 2, 1, 2, 0, 0]
    probs = [onehot(g) for g in pred]
    probs[5] = np.array([0.5, 0.1, 0.3, 0.05, 0.05])  # referable 0.4, predicted 0
    df = frame(images, true, probs, failed={"12_left"})  # unreadable: not a prediction
    t = c.patient_table(df).set_index("patient")
    assert list(t.index) == ["10", "11", "12", "img_a.jpg"]
    assert t.loc["10", "eyes"] == "left,right" and t.loc["10", "images"] == 2
    assert t.loc["10", "true_grade_left"] == 1 and t.loc["10", "true_grade_right"] == 3
    assert t.loc["10", "true_grade"] == 3 and t.loc["10", "predicted_grade"] == 2
    assert bool(t.loc["10", "true_referable"]) and bool(t.loc["10", "predicted_referable"])
    # max over eyes: 10_right's, grades 2-4 of onehot(2) = 0.7 + 0.075 + 0.075
    assert t.loc["10", "referable_prob"] == pytest.approx(0.7 + 2 * 0.075, abs=1e-6)
    assert t.loc["11", "eyes"] == "left" and pd.isna(t.loc["11", "true_grade_right"])
    assert t.loc["11", "predicted_grade"] == 1 and not t.loc["11", "predicted_referable"]
    assert t.loc["12", "images"] == 1 and t.loc["12", "true_grade"] == 0  # 12_left failed
    assert t.loc["img_a.jpg", "eyes"] == "" and t.loc["img_a.jpg", "true_grade"] == 2
    # ids supplied as columns override the names: IDRiD-like names, one patient
    named = df.assign(image=[f"IDRiD_{i:03d}" for i in range(6)], patient="p1")
    assert c.patient_table(named)[["patient", "images", "true_grade"]].values.tolist() == [["p1", 5, 3]]
    assert set(c.prediction_arrays(named)["groups"]) == {"p1"}
    # the same from the CSV evaluate writes (empty cells for the unreadable image)
    df.to_csv(tmp_path / "predictions.csv", index=False)
    again = c.patient_table(pd.read_csv(tmp_path / "predictions.csv")).set_index("patient")
    pd.testing.assert_frame_equal(again, t, check_dtype=False, check_index_type=False)


def test_patient_ids_images_without_ids_are_their_own_patients():
    patients, eyes = c.patient_ids(["3_LEFT.png", "scan.png", "3_right", "scan2"])
    assert patients.tolist() == ["3", "scan.png", "3", "scan2"]
    assert eyes.tolist() == ["left", None, "right", None]


# ----------------------------------------------------------------------------- bootstrap


def data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 5, n)
    p = noisy_probs(rng, t)
    return t, p


def test_point_estimates_equal_metrics_and_sklearn():
    t, p = data()
    r = bs.bootstrap_ci(t, p.argmax(1), p, n_boot=20)["metrics"]
    s = m.summarize(t, p.argmax(1), p)
    for k in ("accuracy", "balanced_accuracy", "macro_f1", "qwk", "ovr_macro_auc"):
        assert r[k]["estimate"] == pytest.approx(s[k], abs=1e-12)
    assert r["referable_auc"]["estimate"] == pytest.approx(
        skm.roc_auc_score(t >= 2, p[:, 2:].sum(1)), abs=1e-12)
    assert r["referable_sensitivity"]["estimate"] == pytest.approx(s["referable"]["sensitivity"])
    assert r["referable_specificity"]["estimate"] == pytest.approx(s["referable"]["specificity"])
    for v in r.values():
        assert v["low"] <= v["estimate"] <= v["high"] and v["skipped"] == 0


def test_each_resample_equals_sklearn_on_the_resampled_data():
    t, p = data(120, seed=1)
    groups = np.arange(120) // 2
    w = next(bs.resample_weights(groups, 120, 5, seed=7))
    _, score = bs.metric_scorer(t, p.argmax(1), p, None, 0.4, 5)
    rows = score(w)
    for b in range(5):
        idx = np.repeat(np.arange(120), w[b].astype(int))  # the resample, made explicit
        tb, pb = t[idx], p[idx]
        assert rows["accuracy"][b] == pytest.approx(skm.accuracy_score(tb, pb.argmax(1)))
        assert rows["qwk"][b] == pytest.approx(
            skm.cohen_kappa_score(tb, pb.argmax(1), weights="quadratic", labels=range(5)))
        assert rows["macro_f1"][b] == pytest.approx(
            skm.f1_score(tb, pb.argmax(1), average="macro", zero_division=0))
        assert rows["ovr_macro_auc"][b] == pytest.approx(
            skm.roc_auc_score(tb, pb, multi_class="ovr", average="macro"))
        assert rows["referable_auc"][b] == pytest.approx(skm.roc_auc_score(tb >= 2, pb[:, 2:].sum(1)))
        refer = pb[:, 2:].sum(1) >= 0.4
        assert rows["referable_sensitivity"][b] == pytest.approx(skm.recall_score(tb >= 2, refer))
        assert rows["referable_specificity"][b] == pytest.approx(skm.recall_score(tb < 2, ~refer))


def test_weighted_auc_handles_ties_like_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80).astype(bool)
    s = rng.integers(0, 6, 80).astype(float)  # many ties
    w = rng.integers(0, 4, (3, 80)).astype(float)
    got = bs.weighted_auc(y, s, w)
    for b in range(3):
        assert got[b] == pytest.approx(skm.roc_auc_score(y, s, sample_weight=w[b]))
    assert bs.weighted_auc(y, s, np.ones((1, 80)))[0] == pytest.approx(m.roc_auc(y, s))


def test_bootstrap_is_reproducible_with_a_seed():
    t, p = data(100)
    a = bs.bootstrap_ci(t, p.argmax(1), p, n_boot=200, seed=5)
    assert a == bs.bootstrap_ci(t, p.argmax(1), p, n_boot=200, seed=5)
    assert a != bs.bootstrap_ci(t, p.argmax(1), p, n_boot=200, seed=6)
    json.dumps(a)  # plain types only


def test_cluster_resampling_draws_both_eyes_together():
    groups = np.repeat(np.arange(50), 2)  # images 2i and 2i+1: the two eyes of patient i
    w = np.vstack(list(bs.resample_weights(groups, 100, 300, seed=0)))
    assert w.shape == (300, 100)
    assert np.array_equal(w[:, 0::2], w[:, 1::2])
    assert np.all(w.sum(axis=1) == 100)  # 50 patients drawn, 2 images each
    # Eyes graded identically: image resampling pretends to twice the information, so the
    # patient interval is wider (by about sqrt 2).
    rng = np.random.default_rng(2)
    t = np.repeat(rng.integers(0, 5, 200), 2)
    pred = np.where(np.repeat(rng.random(200) < 0.7, 2), t, (t + 1) % 5)
    width = {}
    for unit, g in (("image", None), ("patient", np.repeat(np.arange(200), 2))):
        r = bs.bootstrap_ci(t, pred, groups=g, n_boot=500)
        assert r["unit"] == unit and r["n_units"] == (400 if g is None else 200)
        acc = r["metrics"]["accuracy"]
        width[unit] = acc["high"] - acc["low"]
    assert 1.2 < width["patient"] / width["image"] < 1.7


def test_interval_covers_a_known_accuracy():
    # A classifier right with probability 0.8: the 95 % interval should cover 0.8 in about
    # 95 % of datasets (percentile intervals run slightly narrow at n = 150).
    rng = np.random.default_rng(0)
    covered = 0
    for i in range(200):
        t = rng.integers(0, 5, 150)
        pred = np.where(rng.random(150) < 0.8, t, (t + rng.integers(1, 5, 150)) % 5)
        acc = bs.bootstrap_ci(t, pred, n_boot=200, seed=i)["metrics"]["accuracy"]
        covered += acc["low"] <= 0.8 <= acc["high"]
    assert 0.88 <= covered / 200 <= 0.99


def test_undefined_resamples_are_skipped_and_counted():
    t, pred = np.array([0, 0, 3]), np.array([0, 0, 3])
    r = bs.bootstrap_ci(t, pred, n_boot=1000, seed=0)
    w = np.vstack(list(bs.resample_weights(None, 3, 1000, seed=0)))
    no_referable = int(np.sum(w[:, 2] == 0))  # about (2/3)^3 of resamples
    assert 200 < no_referable < 400
    assert r["metrics"]["referable_sensitivity"]["skipped"] == no_referable
    assert r["metrics"]["accuracy"]["skipped"] == 0
    # QWK is 0/0 exactly when only one grade is drawn
    assert r["metrics"]["qwk"]["skipped"] == int(np.sum((w[:, 2] == 0) | (w[:, :2].sum(1) == 0)))


# ---------------------------------------------------------------------- operating point


def referable_data(n, seed):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 5, n)
    score = np.round(1 / (1 + np.exp(-(1.5 * (t >= 2) + rng.normal(size=n)))), 2)  # ties
    return t, score


def test_threshold_is_highest_reaching_target_against_sklearn():
    t, s = referable_data(400, 0)
    op = c.choose_threshold(t, s, 0.87)
    fpr, tpr, thr = skm.roc_curve(t >= 2, s, drop_intermediate=False)
    assert op["threshold"] == thr[np.argmax(tpr >= 0.87)]
    assert op["sensitivity"] >= 0.87
    assert op["sensitivity"] == pytest.approx(skm.recall_score(t >= 2, s >= op["threshold"]))
    assert op["specificity"] == pytest.approx(skm.recall_score(t < 2, s < op["threshold"]))
    higher = s[s > op["threshold"]].min()  # the next candidate up misses the target
    assert skm.recall_score(t >= 2, s >= higher) < 0.87


def test_frozen_threshold_does_not_move_with_the_test_set():
    tv, sv = referable_data(400, 0)
    frozen = c.choose_threshold(tv, sv)["threshold"]
    for seed in (1, 2, 3):
        tt, st = referable_data(200, seed)
        res = c.operating_point(tt, st, frozen)
        assert res["threshold"] == frozen
        assert res["sensitivity"] == pytest.approx(skm.recall_score(tt >= 2, st >= frozen))
        assert res["tp"] + res["fn"] == np.sum(tt >= 2)
    assert c.choose_threshold(tv, sv)["threshold"] == frozen


def test_threshold_refuses_a_validation_set_without_referable_cases():
    with pytest.raises(RetinoError, match="no referable"):
        c.choose_threshold([0, 1, 0], [0.1, 0.5, 0.2])
    with pytest.raises(RetinoError, match="target"):
        c.choose_threshold([0, 2], [0.1, 0.5], 1.5)


# --------------------------------------------------------------------------- calibration


def test_ece_and_reliability_hand_worked():
    probs = np.array([[0.85, 0.15], [0.82, 0.18], [0.45, 0.55], [0.75, 0.25]])
    y = np.array([0, 1, 1, 1])
    # bin (0.8, 0.9]: conf 0.835, acc 1/2; (0.5, 0.6]: 0.55, 1; (0.7, 0.8]: 0.75, 0
    expected = (abs(0.5 - 0.835) * 2 + abs(1 - 0.55) + abs(0 - 0.75)) / 4
    assert cal.ece(probs, y, n_bins=10) == pytest.approx(expected)
    r = cal.reliability(probs, y, n_bins=10)
    assert r["count"] == [0, 0, 0, 0, 0, 1, 0, 1, 2, 0]
    assert r["confidence"][8] == pytest.approx(0.835) and r["accuracy"][8] == 0.5
    assert np.isnan(r["accuracy"][0])


def test_temperature_recovers_the_true_temperature_and_lowers_nll():
    rng = np.random.default_rng(0)
    z = rng.normal(scale=1.5, size=(4000, 5))
    y = np.array([rng.choice(5, p=q) for q in softmax(z)])
    over = softmax(2.5 * z)  # the model's logits are 2.5 times too large
    temp = cal.fit_temperature(over, y)
    assert temp == pytest.approx(2.5, rel=0.08)
    fixed = cal.apply_temperature(over, temp)
    assert cal.nll(fixed, y) < cal.nll(over, y)
    for nearby in (temp * 0.95, temp * 1.05):  # a minimum, not just an improvement
        assert cal.nll(fixed, y) <= cal.nll(cal.apply_temperature(over, nearby), y)
    assert cal.ece(fixed, y) < cal.ece(over, y)
    assert np.array_equal(fixed.argmax(1), over.argmax(1))
    assert cal.fit_temperature(2.5 * z, y, logits=True) == pytest.approx(temp, rel=1e-4)
    assert cal.nll(over, y) == pytest.approx(skm.log_loss(y, over, labels=range(5)))


# -------------------------------------------------------------------------------- fusion


def both_eye_frame(n_patients, seed):
    """Fellow eyes share the patient's grade; each eye's model sees it through heavy noise."""
    rng = np.random.default_rng(seed)
    grade = rng.integers(0, 5, n_patients)
    images, true, probs = [], [], []
    for i, g in enumerate(grade):
        for eye in ("left", "right"):
            tg = g if rng.random() < 0.85 else int(np.clip(g + rng.choice([-1, 1]), 0, 4))
            images.append(f"{i}_{eye}")
            true.append(tg)
            probs.append(noisy_probs(rng, np.array([tg]), strength=1.2)[0])
    return frame(images, true, probs)


def test_fusion_improves_accuracy_when_the_fellow_eye_is_informative():
    val, test = both_eye_frame(600, 0), both_eye_frame(600, 1)
    test.loc[0, ["predicted_grade", "prob_0", "status"]] = [None, None, "error"]  # unreadable
    model = c.fit_fusion(val)
    model = json.loads(json.dumps(model))  # what a checkpoint or ONNX metadata holds
    fused = c.apply_fusion(test, model)
    assert fused.loc[0, "status"] == "error" and pd.isna(fused.loc[0, "predicted_grade"])
    fused, test = fused.iloc[1:], test.iloc[1:]
    before = m.accuracy(test["true_grade"], test["predicted_grade"].astype(int))
    after = m.accuracy(fused["true_grade"], fused["predicted_grade"].astype(int))
    assert after > before + 0.05
    probs = fused[[f"prob_{k}" for k in range(5)]].to_numpy(float)
    assert np.allclose(probs.sum(1), 1)
    assert np.allclose(fused["referable_prob"], probs[:, 2:].sum(1))
    assert (fused["grade_name"] == [GRADE_NAMES[int(g)] for g in fused["predicted_grade"]]).all()


def test_fellow_probs_pairs_left_with_right():
    df = frame(["7_left", "7_right", "8_left", "x.png"], [0, 1, 2, 3],
               [onehot(0), onehot(1), onehot(2), onehot(3)])
    fellow, has = c.fellow_probs(df)
    assert has.tolist() == [True, True, False, False]
    assert np.allclose(fellow[0], df.loc[1, [f"prob_{k}" for k in range(5)]].to_numpy(float))
    assert np.allclose(fellow[2:], 0)


def test_fuse_runs_on_numpy_alone_and_checks_its_model():
    code = ("import json, sys, numpy as np; from retinocli.reporting import clinical as c\n"
            "k = 5; model = {'kind': c.FUSION_KIND, 'version': 1, 'num_grades': k, 'eps': 1e-6,"
            " 'coef': np.hstack([np.eye(k), np.zeros((k, k + 1))]).tolist(), 'intercept': [0.0] * k}\n"
            "p = np.full((2, k), 0.1); p[:, 0] = 0.6\n"
            "out = c.fuse(p, np.zeros_like(p), [False, False], json.dumps(model))\n"
            "assert np.allclose(out, p), out\n"
            "print(sorted(m for m in ('sklearn', 'scipy', 'torch') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    with pytest.raises(RetinoError, match="malformed"):
        c.check_fusion({"kind": c.FUSION_KIND, "num_grades": 5, "coef": [[0.0]], "intercept": []})


# ----------------------------------------------------------------- paired and seeds


def test_paired_bootstrap_verdicts():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 5, 400)
    weak, strong = noisy_probs(rng, t, 0.8), noisy_probs(rng, t, 3.0)
    groups = np.arange(400) // 2
    same = bs.paired_bootstrap(t, weak, weak, groups=groups, n_boot=300)["metrics"]
    for r in same.values():
        assert (r["estimate"], r["low"], r["high"]) == (0, 0, 0)
        assert r["verdict"] == "not distinguishable from zero"
    better = bs.paired_bootstrap(t, strong, weak, groups=groups, n_boot=300)["metrics"]
    assert better["qwk"]["estimate"] == pytest.approx(
        skm.cohen_kappa_score(t, strong.argmax(1), weights="quadratic")
        - skm.cohen_kappa_score(t, weak.argmax(1), weights="quadratic"))
    for r in better.values():
        assert r["low"] > 0 and r["verdict"] == "distinguishable from zero"


def test_paired_arrays_align_two_files_by_image():
    rng = np.random.default_rng(1)
    names = [f"{i // 2}_{('left', 'right')[i % 2]}" for i in range(40)]
    t = rng.integers(0, 5, 40)
    pa, pb = noisy_probs(rng, t), noisy_probs(rng, t)
    a, b = frame(names, t, pa), frame(names, t, pb).iloc[::-1]  # b in another order
    x = c.paired_arrays(a, b)
    order = np.argsort(names)
    assert np.array_equal(x["y_true"], t[order])
    assert np.allclose(x["probs_a"], pa[order], atol=1e-6) and np.allclose(x["probs_b"], pb[order], atol=1e-6)
    assert x["groups"].tolist() == [n.split("_")[0] for n in np.array(names)[order]]
    r = bs.paired_bootstrap(**x, n_boot=50)
    assert r["unit"] == "patient" and r["n_units"] == 20
    with pytest.raises(RetinoError, match="same images"):
        c.paired_arrays(a, b.iloc[1:])
    with pytest.raises(RetinoError, match="different true grades"):
        c.paired_arrays(a, b.assign(true_grade=(b["true_grade"] + 1) % 5))
    with pytest.raises(RetinoError, match="no true grades"):
        c.prediction_arrays(a.drop(columns="true_grade"))


def test_summarise_seeds_matches_statistics():
    runs = [{"qwk": 0.7, "accuracy": 0.8, "name": "a"}, {"qwk": 0.75, "accuracy": 0.82, "name": "b"},
            {"qwk": 0.72, "accuracy": float("nan"), "name": "c"}]
    s = c.summarise_seeds(runs)
    assert set(s) == {"qwk", "accuracy"}
    assert s["qwk"]["mean"] == pytest.approx(statistics.mean([0.7, 0.75, 0.72]))
    assert s["qwk"]["sd"] == pytest.approx(statistics.stdev([0.7, 0.75, 0.72]))
    assert s["accuracy"]["n"] == 2 and s["accuracy"]["mean"] == pytest.approx(0.81)


def test_modules_import_without_torch_sklearn_or_scipy():
    code = ("import sys; import retinocli.reporting.clinical, retinocli.reporting.calibration\n"
            "print(sorted(m for m in ('sklearn', 'scipy', 'torch') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ real data


@pytest.mark.skipif(not (DATA / "eyepacs-256" / "trainLabels.csv").exists(),
                    reason="shared data absent")
def test_real_eyepacs_patients_and_patient_bootstrap():
    labels = pd.read_csv(DATA / "eyepacs-256" / "trainLabels.csv")
    rng = np.random.default_rng(0)
    df = frame(labels["image"], labels["level"], noisy_probs(rng, labels["level"].to_numpy(), 2.0))
    table = c.patient_table(df)
    assert len(table) == labels["image"].str.split("_").str[0].nunique()
    assert (table["eyes"] == "left,right").all()
    worse = labels.assign(p=labels["image"].str.split("_").str[0]).groupby("p")["level"].max()
    assert (table.set_index("patient")["true_grade"] == worse).all()
    r = bs.bootstrap_ci(**c.prediction_arrays(df), n_boot=100)
    assert r["unit"] == "patient" and r["n_units"] == len(table) and r["n_images"] == len(df)
    # patient-level screening scores: one row per patient, the worse eye's grade
    pr = bs.bootstrap_ci(table["true_grade"], table["predicted_grade"],
                         referable_score=table["referable_prob"], n_boot=100)["metrics"]
    assert pr["referable_auc"]["estimate"] == pytest.approx(
        skm.roc_auc_score(table["true_referable"], table["referable_prob"]))
    assert pr["qwk"]["estimate"] == pytest.approx(skm.cohen_kappa_score(
        table["true_grade"], table["predicted_grade"], weights="quadratic"))
