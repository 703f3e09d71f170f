"""Issue #15 on the predict side: the frozen referral threshold and temperature, evaluate's
operating point and ECE, predict's referable column and per-patient file, --fuse-eyes."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import softmax
from sklearn.metrics import confusion_matrix, log_loss
from typer.testing import CliRunner

from retinocli.cli import app
from retinocli.deploy import schema
from retinocli.errors import RetinoError
from retinocli.models.freeze import fit_referral, freeze_grader
from retinocli.models.grading import DEFAULT_THRESHOLD, Grader, fit_grader, referable_score
from retinocli.reporting import calibration, clinical
from retinocli.reporting.evaluate import evaluate
from retinocli.reporting.referral import calibration_section, fuse_probs, operating_section

runner = CliRunner()


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "train"))


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    """The shared trained run exported to ONNX in a copy of its folder."""
    from retinocli.deploy.export import export

    run = Path(shutil.copytree(trained_run, tmp_path_factory.mktemp("referral") / "train"))
    return export(run).path


def overconfident(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits three times too sharp for their accuracy: temperature scaling must soften them."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    logits = 3.0 * (1.5 * np.eye(5)[y] + rng.normal(0, 1, (n, 5)))
    return logits, y


# ------------------------------------------------------------------------- numpy units


def test_temperature_lowers_validation_nll_as_sklearn_computes_it():
    logits, y = overconfident()
    g = fit_grader("classification", logits, y, temperature=True)
    before = log_loss(y, softmax(logits, axis=1), labels=range(5))
    after = log_loss(y, softmax(logits / g.temperature, axis=1), labels=range(5))
    assert g.temperature > 1.5 and after < before - 0.1
    # the grader's probabilities are exactly softmax(logits / T), and T is sklearn's NLL minimum
    np.testing.assert_allclose(g.probabilities(logits), softmax(logits / g.temperature, axis=1), atol=1e-6)
    for t in (0.9 * g.temperature, 1.1 * g.temperature):
        assert log_loss(y, softmax(logits / t, axis=1), labels=range(5)) > after
    # the argmax never moves; uncalibrate undoes calibrate
    np.testing.assert_array_equal(g.grades(g.probabilities(logits)), logits.argmax(1))
    np.testing.assert_allclose(g.uncalibrate(g.probabilities(logits)), softmax(logits, axis=1), atol=1e-5)


def test_regression_keeps_temperature_one_and_ordinal_refits_its_cuts():
    logits, y = overconfident()
    assert fit_grader("regression", logits[:, :1], y, temperature=True).temperature == 1.0
    g = fit_grader("ordinal", logits[:, :4], y, temperature=True)
    assert g.temperature != 1.0 and len(g.cutpoints) == 4


def test_ece_of_evaluate_on_a_hand_worked_example():
    # top-1 confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.3 (wrong); 15 equal bins:
    # ECE = 2/4 |0.5 - 0.9| + 1/4 |1 - 0.6| + 1/4 |0 - 0.3| = 0.2 + 0.1 + 0.075
    probs = np.array([[0.9, 0.025, 0.025, 0.025, 0.025], [0.9, 0.025, 0.025, 0.025, 0.025],
                      [0.1, 0.6, 0.1, 0.1, 0.1], [0.3, 0.2, 0.2, 0.15, 0.15]])
    y = np.array([0, 1, 1, 1])
    section = calibration_section(y, probs, Grader())
    assert section["ece_after"] == pytest.approx(0.375, abs=1e-12) == section["ece_before"]
    tempered = calibration_section(y, Grader(temperature=2.0).calibrate(probs), Grader(temperature=2.0))
    assert tempered["ece_before"] == pytest.approx(0.375, abs=1e-6)  # the temperature undone


def test_frozen_threshold_does_not_move_when_the_test_set_changes():
    logits, y = overconfident(400, seed=1)
    g, notes = freeze_grader("classification", logits, y, target_sensitivity=0.9)
    assert notes == [] and g.frozen and g.referral["sensitivity"] >= 0.9
    threshold = g.threshold()
    # between two validation scores: the same cases referred as choose_threshold's own threshold
    score = referable_score(g.probabilities(logits))
    chosen = clinical.choose_threshold(y, score, 0.9)["threshold"]
    np.testing.assert_array_equal(score >= threshold, score >= chosen)
    for seed in (2, 3):  # two different test sets: applied, never re-chosen
        t_logits, t_y = overconfident(300, seed=seed)
        p = g.probabilities(t_logits)
        op = operating_section(t_y, g.grades(p), referable_score(p), g, n_boot=0)
        assert op["threshold"] == threshold and op["frozen"]
        tn, fp, fn, tp = confusion_matrix(t_y >= 2, referable_score(p) >= threshold, labels=[False, True]).ravel()
        assert (op["tp"], op["fn"], op["fp"], op["tn"]) == (tp, fn, fp, tn)
        assert op["sensitivity"]["estimate"] == pytest.approx(tp / (tp + fn))
        assert clinical.choose_threshold(t_y, referable_score(p), 0.9)["threshold"] != threshold


def test_older_models_are_not_frozen_and_round_trip():
    old = Grader.from_dict({"head": "classification", "num_grades": 5, "cutpoints": None, "scale": 0.5})
    assert old.is_default and not old.frozen and old.threshold() == DEFAULT_THRESHOLD == 0.5
    assert old.temperature == 1.0 and old.fusion is None
    logits, y = overconfident(200)
    names = [f"{i // 2}_{'left' if i % 2 else 'right'}" for i in range(200)]
    g, _ = freeze_grader("classification", logits, y, names=names)
    assert Grader.from_dict(g.to_dict()) == g and not g.is_default
    op = operating_section(y, y, referable_score(softmax(logits, 1)), old, n_boot=0)
    assert op["frozen"] is False and op["threshold"] == 0.5 and op["validation"] is None
    with pytest.raises(RetinoError, match="no referable"):
        fit_referral(softmax(logits, 1), np.zeros(200, int), 0.87)
    with pytest.raises(ValueError, match="temperature"):
        Grader(temperature=0.0)


def test_fusion_applies_the_stored_model_to_fellow_eyes():
    logits, y = overconfident(200, seed=4)
    names = [f"{i // 2}_{'left' if i % 2 else 'right'}" for i in range(200)]
    g, _ = freeze_grader("classification", logits, y, names=names)
    assert g.fusion["with_fellow"] == 200 and g.fusion["fitted_on"] == "val"
    probs = g.probabilities(logits)
    fused = fuse_probs(names, probs, g)
    # by hand, on the probabilities before the temperature: the fellow of i is i ^ 1 (0_right <-> 0_left)
    probs = softmax(logits, axis=1)
    fellow = probs[np.arange(200) ^ 1]
    feats = np.hstack([np.log(np.clip(probs, 1e-6, None)), np.log(np.clip(fellow, 1e-6, None)), np.ones((200, 1))])
    want = softmax(feats @ np.asarray(g.fusion["coef"]).T + g.fusion["intercept"], axis=1)
    np.testing.assert_allclose(fused, want, atol=1e-5)
    assert g.threshold(fused=True) == g.fusion["referral"]["threshold"] != g.threshold()


# ------------------------------------------------------------------------- the trained run


def test_the_checkpoint_freezes_temperature_and_threshold(trained_run):
    state = torch.load(trained_run / "best.pt", weights_only=True)
    assert state["schema"] == 4
    g = Grader.from_dict(state["grader"])
    assert g.frozen and g.referral["target_sensitivity"] == 0.87 and g.referral["split"] == "val"
    assert g.temperature > 0 and g.fusion is not None  # synth names are 10_left: both eyes in val


def test_evaluate_reports_the_frozen_point_and_ece(run_copy, tmp_path):
    g = Grader.from_dict(torch.load(run_copy / "best.pt", weights_only=True)["grader"])
    reports = {split: evaluate(run_copy, split=split, bootstrap=100, out=tmp_path / split).report
               for split in ("test", "val")}
    for split, report in reports.items():
        op = report["operating_point"]
        assert op["threshold"] == g.threshold() and op["frozen"], split  # the same on every split
        rows = pd.read_csv(tmp_path / split / "predictions.csv")
        probs = rows[[f"prob_{k}" for k in range(5)]].to_numpy()
        refer = rows["referable"] == "yes"
        assert (refer == (rows["referable_prob"] >= op["threshold"] - 1e-6)).all()
        tn, fp, fn, tp = confusion_matrix(rows["true_grade"] >= 2, refer, labels=[False, True]).ravel()
        assert (op["tp"], op["fn"], op["fp"], op["tn"]) == (tp, fn, fp, tn)
        assert op["sensitivity"]["low"] <= op["sensitivity"]["estimate"] <= op["sensitivity"]["high"]
        cal = report["calibration"]
        assert cal["temperature"] == g.temperature
        assert cal["ece_after"] == pytest.approx(calibration.ece(probs, rows["true_grade"]), abs=1e-5)
        if split == "val":  # the split it was frozen on: training's numbers come back, NLL went down
            assert op["sensitivity"]["estimate"] == pytest.approx(g.referral["sensitivity"])
            assert op["specificity"]["estimate"] == pytest.approx(g.referral["specificity"])
            assert cal["nll_after"] <= cal["nll_before"]
            sk = log_loss(rows["true_grade"], probs / probs.sum(1, keepdims=True), labels=range(5))
            assert cal["nll_after"] == pytest.approx(sk, abs=1e-4)
        patients = pd.read_csv(tmp_path / split / "patients.csv", dtype={"patient": str})
        by_patient = rows.assign(patient=rows["image"].str.split("_").str[0]).groupby("patient")["referable"]
        assert (patients.set_index("patient")["referable"] == by_patient.agg(
            lambda r: "yes" if (r == "yes").any() else "no")).all()


def test_cli_evaluate_shows_operating_point_and_calibration(run_copy):
    result = runner.invoke(app, ["evaluate", str(run_copy), "--bootstrap", "50"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("frozen referral: P(grade >= 2) >=", "frozen on validation for sensitivity >= 0.87",
                 "before temperature", "after temperature",
                 "never re-tuned",
                 "expected calibration error", "patients: referable sensitivity"):
        assert text in result.stdout, text
    refused = runner.invoke(app, ["evaluate", str(run_copy), "--split", "val", "--fuse-eyes", "--force"])
    assert refused.exit_code == 2 and "in-sample" in refused.output


def test_evaluate_fuse_eyes_uses_the_stored_fusion(run_copy, tmp_path):
    single = evaluate(run_copy, split="test", bootstrap=0, out=tmp_path / "single")
    fused = evaluate(run_copy, split="test", bootstrap=0, out=tmp_path / "fused", fuse_eyes=True)
    f = fused.report["fusion"]
    assert f["source"] == "stored with the model"
    assert f["single"]["qwk"] == pytest.approx(single.report["metrics"]["qwk"], abs=1e-9)
    assert f["fused"]["qwk"] == pytest.approx(fused.report["metrics"]["qwk"], abs=1e-9)
    g = Grader.from_dict(torch.load(run_copy / "best.pt", weights_only=True)["grader"])
    a, b = pd.read_csv(single.predictions_path), pd.read_csv(fused.predictions_path)
    cols = [f"prob_{k}" for k in range(5)]
    want = fuse_probs(a["image"].tolist(), a[cols].to_numpy(), g)
    np.testing.assert_allclose(b[cols].to_numpy(), want, atol=2e-6)
    assert fused.report["operating_point"]["threshold"] == g.threshold(fused=True)

    # an older checkpoint without a stored fusion: fitted now on the run's val split, and said so
    state = torch.load(run_copy / "best.pt", weights_only=True)
    state["grader"]["fusion"] = None
    torch.save(state, run_copy / "best.pt")
    now = evaluate(run_copy, split="test", bootstrap=0, out=tmp_path / "now", fuse_eyes=True).report["fusion"]
    assert now["source"] == "fitted now (not stored)" and "val split" in now["fitted_on"]
    assert now["n"] == g.fusion["n"] and now["with_fellow"] == g.fusion["with_fellow"]  # the same images


def test_predict_and_evaluate_refer_the_same_images(exported, tmp_path):
    data = Path(exported).parent  # the run folder; its split.csv names the test images
    split = pd.read_csv(data / "split.csv")
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in split.loc[split["split"] == "test", "path"]:
        shutil.copy(path, folder / Path(path).name)
    ev = evaluate(exported, split="test", bootstrap=0, out=tmp_path / "eval", provider="cpu")
    from retinocli.deploy.onnx_model import OnnxGrader
    from retinocli.deploy.predict import predict_folder

    out = tmp_path / "pred" / "predictions.csv"
    summary = predict_folder(folder, OnnxGrader(exported, "cpu"), out=out, batch_size=64)
    e, p = pd.read_csv(ev.predictions_path), pd.read_csv(out)
    p["image"] = p["image"].str.rsplit(".", n=1).str[0]
    both = e.merge(p, on="image", suffixes=("_e", "_p"))
    assert len(both) == len(e) == len(p) > 0
    assert (both["referable_e"] == both["referable_p"]).all()
    assert summary.referred == int((p["referable"] == "yes").sum()) and summary.frozen
    # the per-patient file: the worse eye's grade, referable when any eye is
    patients = pd.read_csv(out.parent / "patients.csv", dtype={"patient": str}).set_index("patient")
    p["patient"] = p["image"].str.split("_").str[0]
    g = p.groupby("patient")
    assert (patients["predicted_grade"] == g["predicted_grade"].max()).all()
    assert (patients["referable"] == g["referable"].agg(lambda r: "yes" if (r == "yes").any() else "no")).all()
    assert summary.patients["patients"] == len(patients) and summary.patients["path"] == str(out.parent / "patients.csv")
    # the evaluated patients.csv refers the same patients
    ep = pd.read_csv(tmp_path / "eval" / "patients.csv", dtype={"patient": str}).set_index("patient")
    assert (ep.loc[patients.index, "referable"] == patients["referable"]).all()

    # resume: cut the output after a few rows, resume, the same per-patient file
    first = (out.parent / "patients.csv").read_bytes()
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:5]))
    again = predict_folder(folder, OnnxGrader(exported, "cpu"), out=out, resume=True)
    assert again.kept == 4 and (out.parent / "patients.csv").read_bytes() == first

    # --fuse-eyes: the stored fusion on the per-patient file; the per-image output unchanged
    fused = predict_folder(folder, OnnxGrader(exported, "cpu"), out=tmp_path / "f" / "p.csv",
                           patients=tmp_path / "f" / "fused.csv", fuse_eyes=True)
    table = pd.read_csv(tmp_path / "f" / "fused.csv", dtype={"patient": str}).set_index("patient")
    evaluate(exported, split="test", bootstrap=0, out=tmp_path / "evf", provider="cpu", fuse_eyes=True)
    efp = pd.read_csv(tmp_path / "evf" / "patients.csv", dtype={"patient": str}).set_index("patient")
    assert fused.patients["fused"] and (table["referable"] == efp.loc[table.index, "referable"]).all()
    assert (table["predicted_grade"] == efp.loc[table.index, "predicted_grade"]).all()


def test_predict_patients_file_is_not_overwritten(exported, tmp_path):
    from retinocli.deploy.onnx_model import OnnxGrader
    from retinocli.deploy.predict import predict_folder

    folder = tmp_path / "photos"
    folder.mkdir()
    split = pd.read_csv(Path(exported).parent / "split.csv")
    for path in split.loc[split["split"] == "test", "path"][:4]:
        shutil.copy(path, folder / Path(path).name)
    mine = tmp_path / "patients.csv"
    mine.write_text("mine\n")
    summary = predict_folder(folder, OnnxGrader(exported, "cpu"), out=tmp_path / "a.csv")
    assert summary.patients is None and mine.read_text() == "mine\n" and "left as it is" in summary.notes[0]
    with pytest.raises(RetinoError, match="exists; pass --force"):
        predict_folder(folder, OnnxGrader(exported, "cpu"), out=tmp_path / "b.csv", patients=mine)
    with open(tmp_path / "a.csv", newline="") as fh:
        assert next(csv.reader(fh)) == list(schema.PREDICT_COLUMNS)


def test_report_draws_the_reliability_diagram(run_copy, tmp_path):
    from retinocli.reporting.report import write_report

    evaluate(run_copy, split="test", bootstrap=0)
    result = write_report([run_copy], tmp_path / "report")
    png = tmp_path / "report" / f"{run_copy.name}-reliability.png"
    assert png in result.figures and png.stat().st_size > 10_000
    assert f"]({png.name})" in result.markdown.read_text()


def test_onnx_metadata_carries_the_frozen_grader():
    from retinocli.deploy.metadata import metadata_props, parse_metadata
    from retinocli.imaging.preprocess import Preprocess

    logits, y = overconfident(200)
    names = [f"{i // 2}_{'left' if i % 2 else 'right'}" for i in range(200)]
    g, _ = freeze_grader("classification", logits, y, names=names)
    info = {"grade_names": ["a", "b", "c", "d", "e"], "preprocess": Preprocess(size=32).to_dict()}
    back = parse_metadata(metadata_props({**info, "grader": g.to_dict()}), "m.onnx").grading
    assert back == g and back.threshold(fused=True) == g.threshold(fused=True)
    assert parse_metadata(metadata_props(info), "old.onnx").grading.is_default  # before #15: T 1, 0.5
    bad = metadata_props({**info, "grader": {**g.to_dict(), "temperature": -1.0}})
    with pytest.raises(RetinoError, match="retino.grader is not what export writes"):
        parse_metadata(bad, "bad.onnx")
