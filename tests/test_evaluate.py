from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, confusion_matrix, roc_auc_score
from typer.testing import CliRunner

from retinocli import GRADE_NAMES
from retinocli.deploy import schema
from retinocli.cli import app
from retinocli.errors import RetinoError
from retinocli.reporting.evaluate import evaluate, tta_views

runner = CliRunner()


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the trained run, so each test writes its own metrics.json."""
    return Path(shutil.copytree(trained_run, tmp_path / "train"))


def _predictions(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path)))


def test_evaluate_checkpoint_on_test_split(run_copy):
    result = evaluate(run_copy, split="test")
    report = json.loads((run_copy / "metrics.json").read_text())
    assert report == json.loads(json.dumps(result.report))
    m = report["metrics"]
    split = [r for r in csv.DictReader(open(run_copy / "split.csv")) if r["split"] == "test"]
    assert report["n_images"] == m["n"] == len(split) and report["n_unreadable"] == 0
    assert report["kind"] == "checkpoint" and report["split"] == "test" and report["arch"] == "resnet18"
    # the trained grader beats answering the commonest grade for every image
    assert m["accuracy"] > m["majority_accuracy"] + 0.05, m
    assert m["qwk"] > 0.5

    rows = _predictions(run_copy / "predictions.csv")
    assert tuple(rows[0]) == schema.EVALUATE_COLUMNS
    assert [r["image"] for r in rows] == [r["image"] for r in split]
    assert [r["true_grade"] for r in rows] == [r["grade"] for r in split]
    y = np.array([int(r["true_grade"]) for r in rows])
    pred = np.array([int(r["predicted_grade"]) for r in rows])
    assert [r["grade_name"] for r in rows] == [GRADE_NAMES[g] for g in pred]
    probs = np.array([[float(r[f"prob_{g}"]) for g in range(5)] for r in rows])
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == pred).all()
    assert np.allclose([float(r["referable_prob"]) for r in rows], probs[:, 2:].sum(1), atol=1e-5)
    # metrics.json agrees with an independent computation from predictions.csv
    assert m["accuracy"] == pytest.approx((y == pred).mean())
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=range(5)).tolist()
    assert m["qwk"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"), abs=1e-9)
    assert m["referable"]["auc"] == pytest.approx(roc_auc_score(y >= 2, probs[:, 2:].sum(1)), abs=1e-4)
    roc = report["referable_roc"]
    assert roc["fpr"][0] == 0 and roc["tpr"][-1] == 1 and len(roc["fpr"]) == len(roc["tpr"])


def test_evaluate_refuses_to_overwrite_and_validates_split(run_copy):
    evaluate(run_copy, split="val")
    with pytest.raises(RetinoError, match="already exists"):
        evaluate(run_copy, split="val")
    evaluate(run_copy, split="val", force=True)
    with pytest.raises(RetinoError, match="--split"):
        evaluate(run_copy, split="holdout", force=True)


def test_tta_views_are_the_eight_symmetries():
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    views = list(tta_views(x))
    assert len(views) == 8
    assert len({v.tobytes() for v in views}) == 8  # all distinct
    assert np.array_equal(views[0], x)
    assert np.array_equal(views[1], x[..., ::-1])  # horizontal flip
    assert np.array_equal(views[2], np.rot90(x, 1, axes=(2, 3)))
    # the dihedral group is closed: flipping every view gives the same set back
    assert {v[..., ::-1].tobytes() for v in views} == {v.tobytes() for v in views}


def test_tta_changes_probabilities_but_not_their_sum(run_copy, tmp_path):
    plain = evaluate(run_copy, split="test", out=tmp_path / "plain")
    tta = evaluate(run_copy, split="test", tta=True, out=tmp_path / "tta")
    a = np.array([[float(r[f"prob_{g}"]) for g in range(5)] for r in _predictions(plain.predictions_path)])
    b = np.array([[float(r[f"prob_{g}"]) for g in range(5)] for r in _predictions(tta.predictions_path)])
    assert np.allclose(b.sum(1), 1, atol=1e-5)
    assert np.abs(a - b).max() > 1e-3
    assert tta.report["tta"] is True and plain.report["tta"] is False


def test_broken_image_is_reported_and_left_out(run_copy, tmp_path):
    rows = [r for r in csv.DictReader(open(run_copy / "split.csv")) if r["split"] == "test"]
    victim = Path(tmp_path / "broken.jpeg")
    victim.write_bytes(Path(rows[0]["path"]).read_bytes()[:200])  # truncated JPEG
    text = (run_copy / "split.csv").read_text().replace(rows[0]["path"], str(victim))
    (run_copy / "split.csv").write_text(text)
    result = evaluate(run_copy, split="test")
    assert result.report["n_unreadable"] == 1 and result.report["metrics"]["n"] == len(rows) - 1
    broken = [r for r in _predictions(result.predictions_path) if r["status"] == "error"]
    assert len(broken) == 1 and broken[0]["path"] == str(victim) and broken[0]["error"]


def test_cli_evaluate_json_and_table(run_copy):
    result = runner.invoke(app, ["evaluate", str(run_copy), "--split", "test", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["metrics"]["n"] > 0 and Path(out["metrics_path"]).is_file()
    table = runner.invoke(app, ["evaluate", str(run_copy), "--force"], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    for text in ("No DR", "Proliferative", "majority baseline", "quadratic weighted kappa",
                 "referable DR ROC AUC", "one-vs-rest macro AUC", "Next: retino report"):
        assert text in table.stdout, text
    again = runner.invoke(app, ["evaluate", str(run_copy)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_cli_evaluate_bad_input(tmp_path):
    missing = runner.invoke(app, ["evaluate", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no such run or checkpoint" in missing.output
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    junk = runner.invoke(app, ["evaluate", str(tmp_path / "junk.pt")])
    assert junk.exit_code == 2 and "Traceback" not in junk.output


def test_intervals_and_patients(run_copy, tmp_path):
    """Every headline metric has a seeded bootstrap interval around its point estimate; names
    like 10_left give patients.csv (the worse eye decides) scored on its own."""
    import pandas as pd

    result = evaluate(run_copy, split="test", bootstrap=200, seed=3)
    report, m = result.report, result.report["metrics"]
    ci = report["intervals"]
    assert ci["unit"] == "patient" and ci["n_boot"] == 200 and ci["seed"] == 3
    for key, value in (("accuracy", m["accuracy"]), ("qwk", m["qwk"]), ("macro_f1", m["macro_f1"]),
                       ("balanced_accuracy", m["balanced_accuracy"]),
                       ("referable_sensitivity", m["referable"]["sensitivity"]),
                       ("referable_auc", m["referable"]["auc"]), ("ovr_macro_auc", m["ovr_macro_auc"])):
        entry = ci["metrics"][key]
        assert entry["estimate"] == pytest.approx(value, abs=1e-9), key
        assert entry["low"] <= entry["estimate"] <= entry["high"], key
        assert entry["low"] < entry["high"] or entry["estimate"] in (0.0, 1.0), key  # only a perfect score is exact
    # the same seed gives the same intervals; another seed other ones
    same = evaluate(run_copy, split="test", bootstrap=200, seed=3, out=tmp_path / "same").report["intervals"]
    other = evaluate(run_copy, split="test", bootstrap=200, seed=4, out=tmp_path / "other").report["intervals"]
    assert same == ci and other["metrics"]["accuracy"] != ci["metrics"]["accuracy"]

    # patients.csv, checked against pandas on predictions.csv
    preds = pd.read_csv(result.predictions_path)
    preds["patient"] = preds["image"].str.split("_").str[0]
    expected = preds.groupby("patient")[["true_grade", "predicted_grade"]].max()
    patients = pd.read_csv(run_copy / "patients.csv", dtype={"patient": str}).set_index("patient")
    assert len(patients) == len(expected) == report["patients"]["n"]
    assert (patients.loc[expected.index, ["true_grade", "predicted_grade"]] == expected).all().all()
    assert (patients["true_referable"] == (patients["true_grade"] >= 2)).all()
    pm = report["patients"]["metrics"]
    assert pm["qwk"] == pytest.approx(cohen_kappa_score(expected["true_grade"], expected["predicted_grade"],
                                                        weights="quadratic"), abs=1e-9)
    auc = roc_auc_score(patients["true_grade"] >= 2, patients["referable_prob"])
    assert report["patients"]["intervals"]["metrics"]["referable_auc"]["estimate"] == pytest.approx(auc, abs=1e-9)


def test_cli_evaluate_shows_intervals_and_patients(run_copy):
    result = runner.invoke(app, ["evaluate", str(run_copy), "--bootstrap", "100"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("95% interval", "100 bootstrap resamples of patients", "patients:", "worse eye",
                 "patients.csv"):
        assert text in result.stdout, text
    bad = runner.invoke(app, ["evaluate", str(run_copy), "--force", "--bootstrap", "2"])
    assert bad.exit_code == 2 and "--bootstrap" in bad.output
