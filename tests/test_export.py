from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from retinocli import GRADE_NAMES
from retinocli.engine.checkpoints import load_checkpoint, save_checkpoint
from retinocli.cli import app
from retinocli.errors import RetinoError
from retinocli.reporting.evaluate import evaluate
from retinocli.deploy.export import export
from retinocli.deploy.metadata import parse_metadata
from retinocli.deploy.onnx_model import OnnxGrader

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    """The trained run copied once per module and exported to fp32 ONNX."""
    run = Path(shutil.copytree(trained_run, tmp_path_factory.mktemp("exp") / "train"))
    export(run)
    return run


def test_export_writes_checked_self_describing_model(exported):
    path = exported / "model.onnx"
    proto = onnx.load(path)
    onnx.checker.check_model(str(path), full_check=True)
    assert proto.opset_import[0].version >= 17
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["logits", "probs"]
    info = parse_metadata({p.key: p.value for p in proto.metadata_props}, path)
    state = load_checkpoint(exported / "best.pt")
    assert list(info.grade_names) == list(GRADE_NAMES)
    assert info.preprocess.to_dict() == state["preprocess"]
    assert info.arch == "resnet18" and info.precision == "fp32" and info.epoch == state["epoch"]
    # names and a hash, no path of this machine: a shared model does not leak its author's folders
    assert (info.run, info.checkpoint) == ("train", "best.pt")
    assert info.checkpoint_sha256 == hashlib.sha256((exported / "best.pt").read_bytes()).hexdigest()
    assert str(exported.parent) not in " ".join(p.value for p in proto.metadata_props)
    assert info.metrics["val"]["accuracy"] == pytest.approx(state["metrics"]["accuracy"])


def test_dynamic_batch_and_parity(exported):
    from retinocli.engine.checkpoints import load_trained

    model, state = load_trained(exported / "best.pt")
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    size = state["preprocess"]["size"]
    rng = np.random.default_rng(0)
    for batch in (1, 7):
        x = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
        logits, probs = session.run(None, {"images": x})
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        assert logits.shape == (batch, 5)
        assert np.abs(logits - ref).max() < 1e-3
        assert np.abs(probs - torch.softmax(torch.from_numpy(ref), 1).numpy()).max() < 1e-4


def test_onnx_and_checkpoint_evaluations_agree(exported, tmp_path):
    a = evaluate(exported, split="test", out=tmp_path / "ckpt")
    b = evaluate(exported / "model.onnx", split="test", out=tmp_path / "onnx")
    assert b.report["kind"] == "onnx" and b.report["runtime"] == "CPUExecutionProvider"
    ma, mb = a.report["metrics"], b.report["metrics"]
    assert ma["confusion_matrix"] == mb["confusion_matrix"]
    for key in ("accuracy", "qwk", "balanced_accuracy", "macro_f1", "ovr_macro_auc"):
        assert ma[key] == pytest.approx(mb[key], abs=1e-6), key
    assert ma["referable"]["auc"] == pytest.approx(mb["referable"]["auc"], abs=1e-3)
    pa = np.array([[float(r[f"prob_{g}"]) for g in range(5)] for r in csv.DictReader(open(a.predictions_path))])
    pb = np.array([[float(r[f"prob_{g}"]) for g in range(5)] for r in csv.DictReader(open(b.predictions_path))])
    assert np.abs(pa - pb).max() < 1e-4


def test_a_model_finds_its_run_by_the_checkpoints_hash(exported, tmp_path):
    """evaluate without --data needs the run's split.csv: model.onnx beside the very best.pt
    it came from finds it; a copy elsewhere, or beside another best.pt, does not."""
    from retinocli.reporting.evaluate import open_model

    assert open_model(exported / "model.onnx", provider="cpu").run_dir == exported
    alone = tmp_path / "shared" / "model.onnx"
    alone.parent.mkdir()
    shutil.copy(exported / "model.onnx", alone)
    assert open_model(alone, provider="cpu").run_dir is None
    with pytest.raises(RetinoError, match="its training run is not here .* pass --data"):
        evaluate(alone, split="test", out=tmp_path / "eval")
    retrained = Path(shutil.copytree(exported, tmp_path / "retrained"))
    state = load_checkpoint(retrained / "best.pt")
    state["epoch"] += 1
    save_checkpoint(state, retrained / "best.pt")
    assert open_model(retrained / "model.onnx", provider="cpu").run_dir is None


def test_export_refuses_to_overwrite(exported):
    with pytest.raises(RetinoError, match="already exists"):
        export(exported)


def test_export_without_argument_takes_the_newest_run(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    older = Path(shutil.copytree(trained_run, tmp_path / "runs" / "train"))
    newer = Path(shutil.copytree(trained_run, tmp_path / "runs" / "train2"))
    os.utime(older / "best.pt", (1, 1))
    result = runner.invoke(app, ["export"])
    assert result.exit_code == 0, result.output
    assert (newer / "model.onnx").is_file() and not (older / "model.onnx").exists()
    assert "runs/train2/best.pt" in result.output and "Next: retino predict" in result.output


def test_int8_quantisation_reports_accuracy(exported, tmp_path):
    result = export(exported, int8=True, calibration_images=32)
    assert result.path == exported / "model-int8.onnx"
    proto = onnx.load(result.path)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    q = result.quantization
    assert q["calibration_images"] == 32 and q["images"] > 0
    assert 0 <= q["accuracy_int8"] <= 1 and 0 <= q["accuracy_fp32"] <= 1
    grader = OnnxGrader(result.path, provider="cpu")
    assert grader.info.precision == "int8"


def test_fp16_export_halves_the_weights(exported):
    result = export(exported, fp16=True)
    proto = onnx.load(result.path)
    types = {init.data_type for init in proto.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 in and out
    assert result.size_bytes < 0.6 * (exported / "model.onnx").stat().st_size


def test_checkpoint_of_another_architecture_is_refused(exported, tmp_path):
    state = load_checkpoint(exported / "best.pt")
    state["config"] = {**state["config"], "arch": "resnet34"}
    save_checkpoint(state, tmp_path / "odd.pt")
    with pytest.raises(RetinoError, match="do not fit resnet34"):
        export(tmp_path / "odd.pt", out=tmp_path / "odd.onnx")
    assert not (tmp_path / "odd.onnx").exists()


def test_cli_export_json_and_bad_options(exported, tmp_path):
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", str(exported), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["path"] == str(out) and d["parity"]["max_abs_diff_probs"] < 1e-4 and d["parity"]["batches"] == [1, 7]
    old = runner.invoke(app, ["export", str(exported), "--out", str(tmp_path / "o17.onnx"), "--opset", "17"])
    assert old.exit_code == 0, old.output
    assert onnx.load(tmp_path / "o17.onnx").opset_import[0].version == 17  # exactly what was asked
    for args, text in ((["--opset", "12"], "opset"), (["--opset", "99"], "newer than onnx"),
                       (["--fp16", "--int8"], "exclude"),
                       (["--out", str(tmp_path / "m.txt")], ".onnx")):
        bad = runner.invoke(app, ["export", str(exported), *args])
        assert bad.exit_code == 2 and text in bad.output, (args, bad.output)


def test_cli_export_then_predict_as_the_usage_line_types_it(trained_run, synth_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained_run, tmp_path / "runs" / "train")
    folder = tmp_path / "folder"
    shutil.copytree(synth_data / "test", folder)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    images = sorted(p for p in folder.iterdir() if p.suffix == ".jpeg")

    assert runner.invoke(app, ["export"]).exit_code == 0
    result = runner.invoke(app, ["predict", "folder/"])
    assert result.exit_code == 0, result.output
    assert "Using the newest exported model: runs/train/model.onnx" in result.output
    assert "CPUExecutionProvider" in result.output
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert len(rows) == len(images)  # notes.txt ignored
    by_path = {Path(r["path"]).name: r for r in rows}
    assert by_path["broken.jpeg"]["status"] == "error" and by_path["broken.jpeg"]["error"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(images) - 1
    assert all(r["grade_name"] == GRADE_NAMES[int(r["predicted_grade"])] for r in ok)
    assert {r["image"] for r in rows} == {p.name for p in images}

    again = runner.invoke(app, ["predict", "folder/"])
    assert again.exit_code == 2 and "--resume" in again.output
    strict = runner.invoke(app, ["predict", "folder/", "--resume", "--strict"])
    assert strict.exit_code == 1  # one broken file
    assert len(list(csv.DictReader(open(tmp_path / "predictions.csv")))) == len(images)  # nothing twice
    bad = runner.invoke(app, ["predict", "folder/", "--model", "nothing.onnx", "--out", "x.csv"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
