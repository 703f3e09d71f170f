"""Seeds and paired comparison (reporting/study.py): recipes from configs, mean ± sd against the
statistics module, the seeds' paired bootstrap against scikit-learn and bootstrap.paired_bootstrap.

The run folders here are written by hand (config.json, history.csv, metrics.json from the real
metrics module, predictions.csv through the real schema): no training, no torch.
"""

from __future__ import annotations

import csv
import json
import statistics

import numpy as np
import pytest
from sklearn import metrics as skm

from retinocli.reporting import bootstrap, metrics
from retinocli.reporting import study as st
from retinocli.reporting.report import write_report
from retinocli.reporting.runs import load_runs
from retinocli.rundir import RunDir
from test_clinical import frame, noisy_probs

REFERABLE = 2


def mean_auc(t, probs):
    """The seeds' mean referable AUC: what a recipe's estimate should be."""
    return np.mean([skm.roc_auc_score(t >= REFERABLE, p[:, REFERABLE:].sum(1)) for p in probs])


def mean_qwk(t, probs):
    return np.mean([skm.cohen_kappa_score(t, p.argmax(1), weights="quadratic") for p in probs])


# ------------------------------------------------------------------ the bootstrap itself


def test_one_run_per_recipe_is_the_paired_bootstrap():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 5, 200)
    a, b = noisy_probs(rng, t, 1.5), noisy_probs(rng, t, 1.0)
    groups = np.arange(200) // 2
    ours = st.seed_paired_bootstrap(t, a.argmax(1), a, b.argmax(1), b, groups=groups, n_boot=200, seed=4)
    theirs = bootstrap.paired_bootstrap(t, a, b, groups=groups, n_boot=200, seed=4)
    assert ours["metrics"] == theirs["metrics"]
    assert (ours["unit"], ours["n_units"], ours["seeds_a"], ours["seeds_b"]) == ("patient", 100, 1, 1)


def test_seed_mean_difference_matches_sklearn_and_the_verdicts():
    rng = np.random.default_rng(1)
    t = rng.integers(0, 5, 300)
    groups = np.arange(300) // 2
    strong = np.stack([noisy_probs(rng, t, 3.0) for _ in range(3)])
    weak = np.stack([noisy_probs(rng, t, 0.8) for _ in range(3)])
    also_weak = np.stack([noisy_probs(rng, t, 0.8) for _ in range(2)])  # another recipe, as good: 2 seeds
    big = st.seed_paired_bootstrap(t, strong.argmax(2), strong, weak.argmax(2), weak, groups=groups, n_boot=300)
    assert big["metrics"]["qwk"]["estimate"] == pytest.approx(mean_qwk(t, strong) - mean_qwk(t, weak))
    assert big["metrics"]["referable_auc"]["estimate"] == pytest.approx(mean_auc(t, strong) - mean_auc(t, weak))
    for r in big["metrics"].values():
        assert r["low"] > 0 and r["verdict"] == "distinguishable from zero"
    none = st.seed_paired_bootstrap(t, weak.argmax(2), weak, also_weak.argmax(2), also_weak, groups=groups,
                                    n_boot=300)
    assert none["metrics"]["qwk"]["estimate"] == pytest.approx(mean_qwk(t, weak) - mean_qwk(t, also_weak))
    for r in none["metrics"].values():
        assert r["low"] < 0 < r["high"] and r["verdict"] == "not distinguishable from zero"
    again = st.seed_paired_bootstrap(t, weak.argmax(2), weak, also_weak.argmax(2), also_weak, groups=groups,
                                     n_boot=300)
    assert again["metrics"] == none["metrics"]  # seeded: the same input, the same interval


def test_seeds_that_rank_alike_on_other_scales_are_not_told_apart():
    """A recipe whose third seed scores the same ranking on a squeezed scale (mixed 9:1 with a
    uniform distribution: same grades, same AUC) is the same recipe. Stacking the seeds' rows
    into one pool, as this comparison first did, ranks one seed's scores against another's and
    found a referable AUC difference (RetinaMNIST gave -0.111 so, RESULTS.md)."""
    rng = np.random.default_rng(3)
    t = rng.integers(0, 5, 300)
    b = np.stack([noisy_probs(rng, t, 1.0) for _ in range(3)])
    a = b.copy()
    a[2] = 0.1 * b[2] + 0.9 / 5
    out = st.seed_paired_bootstrap(t, a.argmax(2), a, b.argmax(2), b, n_boot=200)["metrics"]
    assert out["referable_auc"]["estimate"] == pytest.approx(0.0, abs=1e-12)
    assert out["qwk"]["estimate"] == pytest.approx(0.0, abs=1e-12)
    stacked = [skm.roc_auc_score(np.tile(t >= REFERABLE, 3), p[:, :, REFERABLE:].sum(2).ravel()) for p in (a, b)]
    assert stacked[0] - stacked[1] < -0.02  # what pooling would have said


def test_resampling_seeds_widens_the_interval_when_seeds_disagree():
    rng = np.random.default_rng(2)
    t = rng.integers(0, 5, 300)
    erratic = np.stack([noisy_probs(rng, t, s) for s in (4.0, 0.3, 2.0)])  # one seed learnt, one did not
    steady = np.stack([noisy_probs(rng, t, 1.5) for _ in range(3)])
    args = (t, erratic.argmax(2), erratic, steady.argmax(2), steady)
    fixed = st.seed_paired_bootstrap(*args, n_boot=300, resample_seeds=False)["metrics"]["qwk"]
    drawn = st.seed_paired_bootstrap(*args, n_boot=300)["metrics"]["qwk"]
    assert drawn["estimate"] == fixed["estimate"]
    assert drawn["high"] - drawn["low"] > 2 * (fixed["high"] - fixed["low"])


def test_mean_sd_text():
    assert st.mean_sd("qwk", {"mean": 0.41234, "sd": 0.0211}) == "0.412 ± 0.021"
    assert st.mean_sd("accuracy", {"mean": 0.5234, "sd": 0.021}) == "52.3 % ± 2.1 %"
    assert st.mean_sd("qwk", {"mean": 0.4, "sd": float("nan")}) == "0.400"  # one seed: no sd


# --------------------------------------------------------------------------- run folders


def fake_run(root, name, *, seed, lr, t, probs, images, val_qwk, evaluated=True):
    """A run folder as train and evaluate leave it, with these predictions on these images."""
    run = RunDir(root / name)
    run.path.mkdir(parents=True)
    run.write_config({"arch": "resnet18", "mode": "finetune", "img_size": 32, "epochs": 2, "lr": lr, "seed": seed,
                      "name": name, "project": str(root), "workers": seed, "select_metric": "qwk",
                      "versions": {"device": f"cpu{seed}"}})
    run.write_history([{"epoch": 1, "seconds": 1.0, "val_accuracy": 0.3, "val_qwk": val_qwk - 0.1},
                       {"epoch": 2, "seconds": 1.0, "val_accuracy": 0.4 + seed / 100, "val_qwk": val_qwk}])
    if evaluated:
        pred = probs.argmax(1)
        summary = metrics.summarize(t, pred, probs)
        run.metrics().write_text(json.dumps({"split": "test", "n_images": len(t), "tta": False,
                                             "metrics": summary, "referable_roc": {"fpr": [0, 1], "tpr": [0, 1]}}))
        frame(images, t, probs).to_csv(run.predictions(), index=False)
    return run.path


@pytest.fixture
def study_runs(tmp_path):
    """Recipe `good` (3 seeds, near-perfect), recipe `poor` (2 seeds, noise), both on the same
    40 images of 20 patients, and `other-images`, evaluated elsewhere."""
    rng = np.random.default_rng(3)
    images = [f"{i // 2}_{('left', 'right')[i % 2]}" for i in range(40)]
    t = rng.integers(0, 5, 40)
    t[:10] = np.arange(10) % 5  # every grade present
    runs, values = [], {}
    for seed in (0, 1, 2):
        p = noisy_probs(rng, t, 5.0)
        runs.append(fake_run(tmp_path, f"good-s{seed}", seed=seed, lr=0.001, t=t, probs=p, images=images,
                             val_qwk=0.6 + seed / 20))
        values[f"good-s{seed}"] = (t, p)
    for seed in (0, 1):
        p = noisy_probs(rng, t, 0.0)
        runs.append(fake_run(tmp_path, f"poor-s{seed}", seed=seed, lr=0.1, t=t, probs=p, images=images,
                             val_qwk=0.1 + seed / 10))
        values[f"poor-s{seed}"] = (t, p)
    runs.append(fake_run(tmp_path, "other-images", seed=0, lr=0.5, t=t, probs=noisy_probs(rng, t, 1.0),
                         images=[f"x{i}" for i in range(40)], val_qwk=0.3))
    return runs, values


def test_recipes_mean_sd_and_paired_comparison_in_the_report(study_runs, tmp_path):
    runs, values = study_runs
    result = write_report(runs, tmp_path / "report", gallery=False)
    assert result.study is not None
    out = json.loads((tmp_path / "report" / st.STUDY_JSON).read_text())
    by = {r["recipe"]: r for r in out["recipes"]}
    assert list(by) == ["good", "poor", "other-images"]  # seed, name, workers and machine do not split a recipe
    assert by["good"]["seeds"] == [0, 1, 2] and by["poor"]["runs"] == ["poor-s0", "poor-s1"]
    for recipe, names in (("good", ["good-s0", "good-s1", "good-s2"]), ("poor", ["poor-s0", "poor-s1"])):
        qwk = [skm.cohen_kappa_score(values[n][0], values[n][1].argmax(1), weights="quadratic") for n in names]
        got = by[recipe]["metrics"]["qwk"]
        assert got["mean"] == pytest.approx(statistics.mean(qwk)) and got["sd"] == pytest.approx(statistics.stdev(qwk))
        assert got["values"] == pytest.approx(qwk) and got["n"] == len(names)
    good_val = [0.6, 0.65, 0.7]  # the best epoch's (the last here)
    assert by["good"]["metrics"]["val_qwk"]["mean"] == pytest.approx(statistics.mean(good_val))
    assert by["good"]["metrics"]["val_qwk"]["sd"] == pytest.approx(statistics.stdev(good_val))
    assert by["other-images"]["metrics"]["qwk"]["sd"] is None  # one run: no sd (strict JSON: null)

    [cmp] = out["comparisons"]  # other-images shares no images with them
    assert (cmp["a"], cmp["b"], cmp["unit"], cmp["n_units"], cmp["seeds_a"], cmp["seeds_b"]) == (
        "good", "poor", "patient", 20, 3, 2)
    t = values["good-s0"][0]
    good = np.stack([values[f"good-s{s}"][1] for s in range(3)])
    poor = np.stack([values[f"poor-s{s}"][1] for s in range(2)])
    assert cmp["metrics"]["qwk"]["estimate"] == pytest.approx(mean_qwk(t, good) - mean_qwk(t, poor), abs=1e-9)
    assert cmp["metrics"]["referable_auc"]["estimate"] == pytest.approx(
        mean_auc(t, good) - mean_auc(t, poor), abs=1e-5)  # predictions.csv keeps 6 decimals
    assert cmp["metrics"]["qwk"]["verdict"] == "distinguishable from zero"
    assert any("other-images" in n and "same images" in n for n in out["notes"])

    with open(tmp_path / "report" / st.SEEDS_CSV) as fh:
        rows = {(r["recipe"], r["metric"]): r for r in csv.DictReader(fh)}
    assert float(rows["good", "qwk"]["mean"]) == pytest.approx(by["good"]["metrics"]["qwk"]["mean"])
    assert rows["good", "qwk"]["seeds"] == "0;1;2" and rows["poor", "qwk"]["n"] == "2"
    with open(tmp_path / "report" / st.PAIRED_CSV) as fh:
        paired = list(csv.DictReader(fh))
    assert [(r["a"], r["b"], r["metric"]) for r in paired] == [("good", "poor", "qwk"), ("good", "poor", "referable_auc")]
    text = result.markdown.read_text()
    assert "## Seeds and paired comparison" in text
    assert "| `good` | 0, 1, 2 | test (40) |" in text and "±" in text
    assert "`good` − `poor` (3 vs 2 seed(s), 20 patients): QWK +" in text


def test_seeds_evaluated_on_other_images_are_noted_not_paired(study_runs, tmp_path):
    runs, _ = study_runs
    # a third `poor` seed evaluated on other images: the recipe cannot be paired any more
    RunDir(runs[3]).metrics().write_text(RunDir(runs[5]).metrics().read_text())
    frame_other = RunDir(runs[5]).predictions().read_text()
    RunDir(runs[3]).predictions().write_text(frame_other)
    result = st.study(load_runs(runs[:5]), n_boot=50)
    assert result.comparisons == []
    assert any("`poor` is left out" in n and "different images (`poor-s1`)" in n for n in result.notes)


def test_one_run_or_unrelated_unevaluated_runs_add_no_section(study_runs, tmp_path):
    runs, _ = study_runs
    result = write_report(runs[:1], tmp_path / "one", gallery=False)
    assert result.study is None and not (tmp_path / "one" / st.STUDY_JSON).exists()
    assert "Seeds and paired comparison" not in result.markdown.read_text()
    assert not st.study(load_runs([runs[0], runs[5]]), n_boot=50).worth_showing  # no shared images, no seeds


def test_recipes_keep_apart_what_differs_and_name_each_once():
    from types import SimpleNamespace as Run

    runs = [Run(name=f"train-s{s}", config={"lr": lr, "seed": s, "workers": s, "name": f"train-s{s}"})
            for lr in (0.1, 0.2) for s in (0, 1)] + [Run(name="solo", config={"lr": 0.3, "seed": 0})]
    got = [(r.name, [x.config["lr"] for x in r.runs], r.seeds) for r in st.recipes(runs)]
    assert got == [("train", [0.1, 0.1], [0, 1]), ("train (2)", [0.2, 0.2], [0, 1]), ("solo", [0.3], [0])]
