"""The one predictions schema: every writer writes it, every reader checks it (issue #12).

evaluate and predict run here on a tiny ONNX model (builders.build_tiny_onnx) and a small
synth dataset, so nothing trains and torch is not needed.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from retinocli import GRADE_NAMES
from retinocli.deploy import schema
from retinocli.reporting import metrics
from retinocli.cli import app
from retinocli.errors import RetinoError
from retinocli.reporting.evaluate import evaluate
from retinocli.deploy.predict import predict_folder
from retinocli.reporting.report import write_report
from retinocli.reporting.runs import load_run
from retinocli.deploy.onnx_model import OnnxGrader

from builders import build_tiny_onnx, make_run, predictions

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """One tiny model's predictions of one synth test split, through evaluate and through predict."""
    from retinocli.data.synth import generate

    root = tmp_path_factory.mktemp("schema")
    data = root / "data"
    generate(data, n=40, size=32, seed=3)
    (data / "test" / sorted((data / "test").iterdir())[0].name).write_bytes(b"")  # one unreadable image
    model = build_tiny_onnx(root / "model.onnx")
    result = evaluate(model, data=data, split="test", out=root / "eval", provider="cpu")
    grader = OnnxGrader(model, "cpu")
    predict_folder(data / "test", grader, out=root / "predict.csv")
    predict_folder(data / "test", grader, out=root / "predict.jsonl", json_lines=True)
    return {"evaluate": result.predictions_path, "predict": root / "predict.csv",
            "jsonl": root / "predict.jsonl", "data": data, "model": model, "root": root}


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_the_columns_are_the_documented_schema():
    probs = tuple(f"prob_{g}" for g in range(5))
    assert schema.EVALUATE_COLUMNS == ("image", "path", "true_grade", "predicted_grade", "grade_name",
                                       "confidence", *probs, "referable_prob", "referable", "status", "error")
    assert schema.PREDICT_COLUMNS == tuple(c for c in schema.EVALUATE_COLUMNS if c != "true_grade")
    assert schema.columns(3, labelled=False)[5:9] == ("prob_0", "prob_1", "prob_2", "referable_prob")
    readme = (ROOT / "README.md").read_text()
    for column in schema.EVALUATE_COLUMNS:
        if not column.startswith("prob_"):
            assert f"`{column}`" in readme, column


def test_evaluate_and_predict_write_the_one_schema(written):
    evaluated, predicted = rows_of(written["evaluate"]), rows_of(written["predict"])
    assert tuple(evaluated[0]) == schema.EVALUATE_COLUMNS
    assert tuple(predicted[0]) == schema.PREDICT_COLUMNS
    jsonl = [json.loads(line) for line in written["jsonl"].read_text().splitlines()]
    assert all(tuple(r) == schema.PREDICT_COLUMNS for r in jsonl) and len(jsonl) == len(predicted)

    # The same image through both commands: the same cells, but for true_grade and image.
    by_path = {r["path"]: r for r in predicted}
    labels = {r["image"]: r["level"] for r in csv.DictReader(open(written["data"] / "testLabels.csv"))}
    assert len(evaluated) == len(predicted) == len(labels) >= 6
    for row in evaluated:
        other = by_path[row["path"]]
        assert {k: v for k, v in row.items() if k not in ("true_grade", "image")} == \
               {k: v for k, v in other.items() if k != "image"}
        assert row["image"] == Path(row["path"]).stem  # the dataset's name for it
        assert other["image"] == Path(row["path"]).name  # its path under the folder predicted
    broken = [r for r in evaluated if r["status"] == "error"]
    assert len(broken) == 1 and broken[0]["true_grade"] != "" and broken[0]["predicted_grade"] == ""
    assert {r["image"]: r["true_grade"] for r in evaluated} == labels


def test_no_other_module_spells_a_column():
    """A column name written in two modules is a drift waiting to happen: only schema.py has them."""
    spelled = re.compile(r"""["'](true_grade|predicted_grade|grade_name|confidence|referable_prob)["']|["']prob_""")
    for path in sorted((ROOT / "retinocli").glob("*.py")):
        if path.name == "schema.py":
            continue
        hits = [line for line in path.read_text().splitlines() if spelled.search(line)]
        assert not hits, f"{path.name} spells a predictions column: {hits}"


def test_report_refuses_predict_output(written, tmp_path):
    """report reads evaluate's predictions.csv when metrics.json has no ROC; predict's is refused."""
    run = make_run(tmp_path, "run", skill=2.0)
    report = json.loads((run / "metrics.json").read_text())
    del report["referable_roc"]
    (run / "metrics.json").write_text(json.dumps(report))

    # evaluate's file: read, and the curve is the one of its rows
    y, _, probs = predictions(2.0, seed=len("run"))
    with open(run / "predictions.csv", "w", newline="") as fh:
        writer = schema.RowWriter(fh, schema.EVALUATE_COLUMNS)
        writer.header()
        writer.write([schema.make_row(f"te{i}", f"/data/te{i}.jpeg", p, GRADE_NAMES, labelled=True, true_grade=g)
                      for i, (g, p) in enumerate(zip(y, probs))])
    fpr, tpr = load_run(run).referable_roc()
    auc = float(np.trapezoid(tpr, fpr))
    assert auc == pytest.approx(report["metrics"]["referable"]["auc"], abs=1e-3) and auc > 0.8

    # predict's file where evaluate's belongs: one line, before any figure is written
    (run / "predictions.csv").write_bytes(written["predict"].read_bytes())
    with pytest.raises(RetinoError) as err:
        write_report([run], tmp_path / "report")
    text = str(err.value)
    assert text == (f"{run / 'predictions.csv'} is not `retino evaluate`'s predictions (missing true_grade): "
                    "`retino predict` wrote it (it has no true_grade); run retino evaluate again with --force")
    assert not (tmp_path / "report").exists()
    result = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "report")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in result.output and not (tmp_path / "report").exists()

    # an older retino's evaluate file (grade was the true grade, predicted the prediction)
    old = ["image", "path", "grade", "predicted", "confidence", *(f"prob_{g}" for g in range(5)),
           "referable_prob", "status", "error"]
    (run / "predictions.csv").write_text(",".join(old) + "\nte0,/data/te0.jpeg,0,0,0.9,0.9,0.1,0,0,0,0,ok,\n")
    with pytest.raises(RetinoError, match=r"\(missing true_grade, predicted_grade, grade_name, referable; "
                                          r"unexpected grade, predicted\): an older retino wrote it"):
        load_run(run)


def test_predict_resume_refuses_evaluate_output(written, tmp_path):
    out = tmp_path / "predictions.csv"
    out.write_bytes(written["evaluate"].read_bytes())
    before = out.read_bytes()
    with pytest.raises(RetinoError) as err:
        predict_folder(written["data"] / "test", OnnxGrader(written["model"], "cpu"), out=out, resume=True)
    assert str(err.value) == (f"{out} is not this model's predictions (unexpected true_grade): `retino evaluate` "
                              "wrote it (it has true_grade); cannot resume it (pass --force to start over)")
    assert out.read_bytes() == before
    result = runner.invoke(app, ["predict", str(written["data"] / "test"), "--model", str(written["model"]),
                                 "--out", str(out), "--resume"])
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [f"error: {err.value}"]


def test_check_header_names_what_differs(written, tmp_path):
    schema.check_header(written["evaluate"], schema.EVALUATE_COLUMNS)
    schema.check_header(written["jsonl"], schema.PREDICT_COLUMNS)  # JSON lines: the first row's keys
    with pytest.raises(RetinoError, match="missing true_grade\\): `retino predict` wrote it"):
        schema.check_header(written["jsonl"], schema.EVALUATE_COLUMNS)
    shuffled = tmp_path / "shuffled.csv"
    shuffled.write_text(",".join(reversed(schema.PREDICT_COLUMNS)) + "\n")
    with pytest.raises(RetinoError, match="its columns are in another order"):
        schema.check_header(shuffled, schema.PREDICT_COLUMNS)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(RetinoError, match="empty.csv is not a retino predictions file: it has no header line"):
        schema.check_header(tmp_path / "empty.csv", schema.PREDICT_COLUMNS)
    # a model with other grades: the probabilities would not line up
    with pytest.raises(RetinoError, match="unexpected prob_3, prob_4\\): it holds 5 grades, this model 3$"):
        schema.check_header(written["predict"], schema.columns(3, labelled=False))
    labels = written["data"] / "testLabels.csv"
    with pytest.raises(RetinoError, match="unexpected level\\): retino did not write it"):
        schema.check_header(labels, schema.PREDICT_COLUMNS)


def test_rows_are_typed_and_the_number_text_is_shared():
    ok = schema.make_row("a", "/a.png", np.array([0.1, 0.2, 0.3, 0.25, 0.15], np.float32), GRADE_NAMES,
                         labelled=True, true_grade=np.int64(3))
    assert tuple(ok) == schema.EVALUATE_COLUMNS
    assert (ok["true_grade"], ok["predicted_grade"], ok["grade_name"], ok["confidence"]) == (3, 2, "Moderate", 0.3)
    assert ok["prob_0"] == 0.1 and ok["referable_prob"] == pytest.approx(0.7, abs=1e-7)
    assert (ok["status"], ok["error"]) == ("ok", "")
    assert type(ok["true_grade"]) is int and type(ok["predicted_grade"]) is int
    bad = schema.make_row("b", "/b.png", None, GRADE_NAMES, labelled=False, error="truncated image")
    assert tuple(bad) == schema.PREDICT_COLUMNS
    assert bad["predicted_grade"] is None and bad["prob_4"] is None and bad["status"] == "error"
    assert metrics.REFERABLE_GRADE == 2
