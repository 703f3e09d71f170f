from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from builders import history, make_run
from retinocli.errors import RetinoError
from retinocli.reporting.figures import (BASELINE_STYLE, DPI, FIGSIZE, PALETTE, balance_figure, comparison_figure,
                                         confusion_figure, roc_figure, split_counts)
from retinocli.reporting.numbers import num, params, pct
from retinocli.reporting.report import write_report
from retinocli.reporting.runs import load_run, load_runs, run_label


def table(md: str, heading: str) -> dict[str, dict[str, str]]:
    """The markdown table under ``heading``, as {first cell: {column: cell}}."""
    lines = md.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    header, body = rows[0], rows[2:]
    return {r[0].strip("`"): dict(zip(header, r)) for r in body}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=float)


def expected_size(kind: str) -> tuple[int, int]:
    w, h = FIGSIZE[kind]
    return round(w * DPI), round(h * DPI)


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    nan_row = history([0.70, float("nan"), 0.80, 0.79], [0.30, float("nan"), 0.62, 0.64])
    nan_row[1].update(train_loss=float("nan"), train_accuracy=float("nan"), val_loss=float("nan"))
    return [
        make_run(tmp_path, "pretrained", skill=3.0),
        make_run(tmp_path, "scratch", weights=None, skill=0.0, select_metric="accuracy",
                 hist=history([0.72, 0.74, 0.74], [0.10, 0.30, 0.25]), parameters=None),
        make_run(tmp_path, "linear", arch="resnet50", mode="linear", hist=nan_row, epochs=10),
        make_run(tmp_path, "one", arch="resnet50", weights=None, hist=history([0.74], [0.0])),
    ]


def test_report_figures_and_numbers(tmp_path, runs):
    result = write_report(runs, tmp_path / "reports" / "cmp", title="Pretrained vs scratch")
    out = tmp_path / "reports" / "cmp"
    names = {p.name for p in result.figures}
    assert names == {"pretrained-curves.png", "scratch-curves.png", "linear-curves.png", "one-curves.png",
                     "accuracy-comparison.png", "pretrained-confusion.png", "scratch-confusion.png",
                     "class-balance.png", "referable-roc.png"}
    sizes = {"accuracy-comparison.png": "comparison", "class-balance.png": "balance", "referable-roc.png": "roc",
             "pretrained-confusion.png": "confusion", "pretrained-curves.png": "curves",
             "linear-curves.png": "curves"}
    for name, kind in sizes.items():
        with Image.open(out / name) as img:
            assert img.size == expected_size(kind), name
    for path in result.figures:
        assert pixels(path).std() > 20, f"{path.name} looks blank"
    assert not list(out.glob("*.svg"))

    md = result.markdown.read_text()
    assert md.startswith("# Pretrained vs scratch\n")
    for name in names:
        assert f"]({name})" in md

    train = table(md, "## Training")
    # best epoch by val QWK (0.55 at epoch 2), its accuracy 76 % (not the last epoch's 78 %)
    assert train["pretrained"]["best epoch"] == "2"
    assert train["pretrained"]["val accuracy"] == "76.0 %" and train["pretrained"]["val QWK"] == "0.550"
    # select_metric accuracy: the first epoch reaching 74 %
    assert train["scratch"]["best epoch"] == "2" and train["scratch"]["val QWK"] == "0.300"
    assert train["pretrained"]["weights"] == "ImageNet" and train["scratch"]["weights"] == "scratch"
    assert train["pretrained"]["parameters"] == "11.7 M" and train["scratch"]["parameters"] == "–"
    assert train["pretrained"]["s / epoch"] == f"{(2 + 3 + 2) / 3:.1f}"
    # the NaN epoch is skipped, not chosen and not fatal
    assert train["linear"]["best epoch"] == "4" and train["linear"]["val accuracy"] == "79.0 %"
    assert train["linear"]["epochs"] == "4 of 10" and train["one"]["epochs"] == "1"

    test = table(md, "## Evaluation")
    assert set(test) == {"pretrained", "scratch"}
    for name in test:
        m = json.loads((tmp_path / name / "metrics.json").read_text())["metrics"]
        row = test[name]
        assert row["accuracy"] == f"{100 * m['accuracy']:.1f} %"
        assert row["majority baseline"] == f"{100 * m['majority_accuracy']:.1f} %" == "73.0 %"
        assert row["balanced accuracy"] == f"{100 * m['balanced_accuracy']:.1f} %"
        assert row["macro F1"] == f"{m['macro_f1']:.3f}"
        assert row["QWK"] == (f"{m['qwk']:.3f}" if math.isfinite(m["qwk"]) else "–")
        assert row["referable sensitivity"] == f"{100 * m['referable']['sensitivity']:.1f} %"
        assert row["referable specificity"] == f"{100 * m['referable']['specificity']:.1f} %"
        assert row["referable AUC"] == f"{m['referable']['auc']:.3f}"
        assert row["OvR macro AUC"] == f"{m['ovr_macro_auc']:.3f}"
        grades = table(md, f"### `{name}` per grade")
        for c in m["per_class"]:
            g = grades[f"{c['grade']} {c['name']}"]
            assert g["precision"] == f"{100 * c['precision']:.1f} %" and g["F1"] == f"{c['f1']:.3f}"
            assert g["support"] == str(c["support"])
    assert test["scratch"]["accuracy"] == "73.0 %" and test["scratch"]["QWK"] == "0.000"  # always No DR

    warnings = [line for line in md.splitlines() if "no better than answering No DR" in line]
    assert len(warnings) == 2  # scratch at the test baseline, one at the val baseline
    assert any("`scratch`" in w and "test split" in w for w in warnings)
    assert any("`one`" in w and "validation" in w for w in warnings)
    assert not any("`pretrained`" in w or "`linear`" in w for w in warnings)
    assert result.warnings and all("no better than" in w for w in result.warnings)
    assert result.to_dict()["markdown"] == str(out / "report.md")


def test_svg_force_and_no_evaluated_run(tmp_path):
    run = make_run(tmp_path, "train")
    out = tmp_path / "rep"
    result = write_report([run], out, svg=True)
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == {"train-curves.png", "accuracy-comparison.png", "class-balance.png"}
    for png in pngs:
        assert png.with_suffix(".svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert len(result.figures) == 6
    md = result.markdown.read_text()
    assert "No run has been evaluated" in md and "referable-roc" not in md
    with pytest.raises(RetinoError, match="exists; pass --force to overwrite"):
        write_report([run], out)
    write_report([run], out, force=True)


def test_number_formats():
    assert (pct(0.735), pct(1.0), pct(float("nan")), pct(None)) == ("73.5 %", "100.0 %", "–", "–")
    assert (num(0.61234), num(float("nan"))) == ("0.612", "–")
    assert (params(11_689_512), params(23_500), params(None)) == ("11.7 M", "23.5 k", "–")


def test_labels_and_bad_runs(tmp_path):
    assert run_label({"arch": "resnet18", "weights": "DEFAULT", "mode": "finetune"}) == "resnet18 · ImageNet · finetune"
    assert run_label({"arch": "resnet50", "weights": None, "mode": "linear"}) == "resnet50 · scratch · linear"
    assert run_label({"arch": "resnet50", "weights": "IMAGENET1K_V2", "mode": "two-stage"}).endswith("ImageNet · two-stage")
    assert run_label({"arch": "r", "weights": "/w/ssl-fundus.pth", "mode": "finetune"}) == "r · ssl-fundus.pth · finetune"

    a, b = make_run(tmp_path / "x", "train"), make_run(tmp_path / "y", "train")
    (a / "best.pt").write_bytes(b"")
    first, second = load_runs([a, b, a / "best.pt"])  # a given twice (once as a file in it) counts once
    assert (first.name, second.name) == ("train", "train-2")
    assert first.label == "resnet18 · ImageNet · finetune (train)"
    assert second.label == "resnet18 · ImageNet · finetune (train-2)"

    with pytest.raises(RetinoError, match="no such run folder"):
        load_run(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(RetinoError, match="no history.csv"):
        write_report([a, tmp_path / "half"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written for a bad run list


GRADE_LABELS = ["0 No DR", "1 Mild", "2 Moderate", "3 Severe", "4 Proliferative"]
OTHER_VAL = [0] * 20 + [1] * 10 + [2] * 10 + [3] * 5 + [4] * 5  # always No DR: 40 %


def texts(items) -> list[str]:
    return [t.get_text() for t in items]


def test_class_balance_chart_names_grades_as_the_confusion_matrix(tmp_path):
    run = load_run(make_run(tmp_path, "a", skill=3.0))
    counts = split_counts(run.split)
    assert counts == {"train": [148, 16, 24, 8, 4], "val": [37, 4, 6, 2, 1], "test": [73, 7, 12, 5, 3]}
    fig = balance_figure(counts, "data, the split of a")
    (ax,) = fig.axes
    assert ax.get_title() == "Images per DR grade, by split\ndata, the split of a"
    confusion = confusion_figure(run).axes[0]
    assert texts(ax.get_xticklabels()) == texts(confusion.get_xticklabels()) == GRADE_LABELS
    assert texts(confusion.get_yticklabels())[0] == "0 No DR (n=73)"
    assert [[bar.get_height() for bar in bars] for bars in ax.containers] == list(counts.values())
    # the legend sits inside the axes and says what always answering the commonest grade scores
    assert not fig.legends
    assert texts(ax.get_legend().get_texts()) == ["train: 200 images; always No DR scores 74.0%",
                                                  "val: 50 images; always No DR scores 74.0%",
                                                  "test: 100 images; always No DR scores 73.0%"]
    fig.canvas.draw()
    box, inner = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert inner.x0 <= box.x0 and box.x1 <= inner.x1 and inner.y0 <= box.y0 and box.y1 <= inner.y1
    # no bar reaches the legend's height
    top = ax.transData.inverted().transform((0, box.y0))[1]
    assert max(max(c) for c in counts.values()) < top


def test_runs_on_different_splits_get_their_own_majority_bar_and_an_honest_roc_title(tmp_path):
    a = make_run(tmp_path, "a", skill=3.0)
    b = make_run(tmp_path, "b", weights=None, skill=1.0, val_grades=OTHER_VAL, eval_split="val")
    c = make_run(tmp_path, "c", mode="linear", skill=1.0)
    runs = load_runs([a, b, c])

    ax = comparison_figure(runs).axes[0]
    val_color = {line.get_label(): line.get_color() for line in ax.get_lines()}
    bars = {line.get_label(): line for line in ax.get_lines() if line.get_label().startswith("majority")}
    assert set(bars) == {"majority grade (always No DR), val split of a, c: 74.0%",
                         "majority grade (always No DR), val split of b: 40.0%"}
    ab, bb = bars["majority grade (always No DR), val split of a, c: 74.0%"], \
        bars["majority grade (always No DR), val split of b: 40.0%"]
    assert ab.get_color() == val_color[runs[0].label] == PALETTE[0]
    assert bb.get_color() == val_color[runs[1].label] == PALETTE[1]
    assert ab.get_ydata()[0] == pytest.approx(0.74) and bb.get_ydata()[0] == pytest.approx(0.40)
    train_dashes = next(line for line in ax.get_lines() if line.get_linestyle() == "--")
    assert ab.get_linestyle() == bb.get_linestyle() == BASELINE_STYLE == "-." != train_dashes.get_linestyle()

    ax = roc_figure(runs).axes[0]
    assert ax.get_title() == "Referable DR (grade ≥ 2 vs < 2), runs evaluated on different splits (legend)"
    legend = texts(ax.get_legend().get_texts())
    assert legend[1].startswith(f"{runs[0].label}, test split, 100 images (AUC ")
    assert legend[2].startswith(f"{runs[1].label}, val split, 100 images (AUC ")
    assert legend[3].startswith(f"{runs[2].label}, test split, 100 images (AUC ")


def test_runs_on_one_split_share_one_grey_majority_bar_and_the_roc_title(tmp_path):
    runs = load_runs([make_run(tmp_path, "a", skill=3.0), make_run(tmp_path, "b", weights=None, skill=1.0)])
    ax = comparison_figure(runs).axes[0]
    bars = [line for line in ax.get_lines() if line.get_label().startswith("majority")]
    assert [(b.get_label(), b.get_color()) for b in bars] == [
        ("majority grade (always No DR), val split: 74.0%", "#555555")]
    ax = roc_figure(runs).axes[0]
    assert ax.get_title() == "Referable DR (grade ≥ 2 vs < 2), test split, 100 images"
    assert texts(ax.get_legend().get_texts())[1].startswith(f"{runs[0].label} (AUC ")


def test_what_differs_between_runs_in_the_table_the_json_and_the_cli(tmp_path):
    from typer.testing import CliRunner

    from retinocli.cli import app
    from retinocli.reporting.runs import settings_that_differ

    a = make_run(tmp_path, "a")
    b = make_run(tmp_path, "b", arch="resnet50", weights=None)
    config = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps({**config, "learning_rate": 1e-3, "versions": {"device": "cuda"}}))
    want = {"a": {"arch": "resnet18", "weights": "ImageNet", "learning_rate": 3e-4},
            "b": {"arch": "resnet50", "weights": "scratch", "learning_rate": 1e-3}}

    result = write_report([a, b], tmp_path / "rep")
    assert result.differences == result.to_dict()["differences"] == want
    md = result.markdown.read_text()
    train = table(md, "## Training")
    assert train["a"]["differs from the others"] == "arch resnet18, weights ImageNet, learning_rate 0.0003"
    assert train["b"]["differs from the others"] == "arch resnet50, weights scratch, learning_rate 0.001"
    assert "(arch, weights, learning_rate); all other settings are shared" in md

    cli = CliRunner().invoke(app, ["report", str(a), str(b), "--out", str(tmp_path / "rep"), "--force", "--json"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["differences"] == want
    cli = CliRunner().invoke(app, ["report", str(a), str(b), "--out", str(tmp_path / "rep"), "--force"])
    lines = [line.strip() for line in cli.output.splitlines()]
    start = lines.index("What differs between the runs:")
    assert lines[start + 1: start + 3] == ["a: arch resnet18, weights ImageNet, learning_rate 0.0003",
                                           "b: arch resnet50, weights scratch, learning_rate 0.001"]

    # two ImageNet tags are two weights; runs trained alike differ in nothing
    tags = settings_that_differ({"x": {"arch": "r", "weights": "IMAGENET1K_V1", "pretrained": True},
                                 "y": {"arch": "r", "weights": "DEFAULT", "pretrained": True}})
    assert tags == {"x": {"weights": "ImageNet (IMAGENET1K_V1)"}, "y": {"weights": "ImageNet"}}
    assert settings_that_differ({"x": {"arch": "r", "name": "x"}, "y": {"arch": "r", "name": "y"}}) == {}
    alone = write_report([a], tmp_path / "alone")
    assert alone.differences == {} and "differs from the others" not in alone.markdown.read_text()


def test_evaluation_table_carries_evaluates_bootstrap_intervals(tmp_path):
    run = make_run(tmp_path / "runs", "a", skill=3.0)
    metrics_file = run / "metrics.json"
    report = json.loads(metrics_file.read_text())
    m = report["metrics"]
    report["intervals"] = {"unit": "patient", "n_boot": 200, "seed": 7, "level": 0.95, "metrics": {
        "accuracy": {"estimate": m["accuracy"], "low": 0.61234, "high": 0.78901},
        "qwk": {"estimate": m["qwk"], "low": 0.40049, "high": 0.5}}}
    metrics_file.write_text(json.dumps(report))
    md = (write_report([run], tmp_path / "rep").markdown).read_text()
    row = table(md, "## Evaluation")["a"]
    assert row["accuracy"] == f"{100 * m['accuracy']:.1f} % [61.2 %–78.9 %]"
    assert row["QWK"] == f"{m['qwk']:.3f} [0.400–0.500]"
    assert row["macro F1"] == f"{m['macro_f1']:.3f}"  # not bootstrapped: no brackets
    assert "the 95 % interval from 200 bootstrap resamples of patients (seed 7)" in md
