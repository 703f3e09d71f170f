"""`retino report`'s error gallery (#18): the right images, drawn, listed in report.md; a note when not possible."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from retinocli.cli import app


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def evaluated_run(trained_run, tmp_path_factory) -> Path:
    """A copy of the session's trained run, evaluated on its test split (predictions.csv in the run)."""
    run = Path(shutil.copytree(trained_run, tmp_path_factory.mktemp("gallery") / "train"))
    result = invoke("evaluate", run, "--split", "test", "--device", "cpu", "--batch-size", "32", "--json")
    assert result.exit_code == 0, result.output
    return run


def table_under(md: str, heading: str) -> pd.DataFrame:
    """The markdown table after the first line starting with ``heading`` (before the next heading)."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("| ") and not line.startswith("| image"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return pd.DataFrame(rows, columns=["image", "true", "predicted", "confidence"])


def test_gallery_shows_the_most_confident_wrong_and_the_missed_referable(evaluated_run, tmp_path):
    result = invoke("report", evaluated_run, "--out", tmp_path / "rep", "--json")
    assert result.exit_code == 0, result.output
    figures = {Path(p).name for p in json.loads(result.stdout)["figures"]}

    # The selection, computed here from predictions.csv with pandas alone.
    pred = pd.read_csv(evaluated_run / "predictions.csv", dtype={"image": str})
    pred = pred[pred["status"] == "ok"]
    wrong = pred[pred["true_grade"] != pred["predicted_grade"]]
    wrong = wrong.sort_values(["confidence", "image"], ascending=[False, True]).head(8)
    missed = pred[(pred["true_grade"] >= 2) & (pred["predicted_grade"] < 2)]
    missed = missed.sort_values(["referable_prob", "image"]).head(8)
    assert len(wrong) == 8, "the demo model should get at least 8 test images wrong"
    # The most confident wrong ones are at least as confident as any wrong one left out.
    left_out = pred[(pred["true_grade"] != pred["predicted_grade"]) & ~pred["image"].isin(wrong["image"])]
    assert left_out.empty or wrong["confidence"].min() >= left_out["confidence"].max()

    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Error gallery" in md
    shown = table_under(md, "### `train`: most confident wrong predictions")
    assert shown["image"].tolist() == wrong["image"].tolist()
    assert shown["true"].astype(int).tolist() == wrong["true_grade"].tolist()
    assert shown["predicted"].astype(int).tolist() == wrong["predicted_grade"].tolist()
    assert shown["confidence"].tolist() == [f"{c:.1%}" for c in wrong["confidence"]]
    assert "](train-wrong.png)" in md and "train-wrong.png" in figures

    if missed.empty:
        assert "train-missed-referable.png" not in figures
    else:
        listed = table_under(md, "### `train`: missed referable DR")
        assert listed["image"].tolist() == missed["image"].tolist()
        assert "](train-missed-referable.png)" in md and "train-missed-referable.png" in figures

    with Image.open(tmp_path / "rep" / "train-wrong.png") as im:
        pixels = np.asarray(im.convert("RGB"), np.float32)
    assert pixels.std() > 20  # eight captioned overlays, not a blank page
    # Jet's heat colours are there: some pixels far more red than blue (the fundus alone is not).
    assert ((pixels[..., 0] - pixels[..., 2]) > 120).mean() > 0.001


def test_no_gallery_without_checkpoint_or_images_and_the_options(evaluated_run, tmp_path):
    bare = Path(shutil.copytree(evaluated_run, tmp_path / "bare"))
    (bare / "best.pt").unlink()
    (bare / "last.pt").unlink(missing_ok=True)
    assert invoke("report", bare, "--out", tmp_path / "r1").exit_code == 0
    md = (tmp_path / "r1" / "report.md").read_text()
    assert "No error gallery for `bare`: it has no torch checkpoint (best.pt), which heatmaps need." in md
    assert not list((tmp_path / "r1").glob("*-wrong.png"))

    moved = Path(shutil.copytree(evaluated_run, tmp_path / "moved"))
    pred = pd.read_csv(moved / "predictions.csv", dtype=str, keep_default_na=False)
    pred["path"] = [str(tmp_path / "gone" / Path(p).name) for p in pred["path"]]
    pred.to_csv(moved / "predictions.csv", index=False)
    assert invoke("report", moved, "--out", tmp_path / "r2").exit_code == 0
    md = (tmp_path / "r2" / "report.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("No error gallery for `moved`"))
    assert "images can be read" in line and not list((tmp_path / "r2").glob("*-wrong.png"))

    result = invoke("report", evaluated_run, "--out", tmp_path / "r3", "--no-gallery")
    assert result.exit_code == 0, result.output
    assert "Error gallery" not in (tmp_path / "r3" / "report.md").read_text()

    result = invoke("report", evaluated_run, "--out", tmp_path / "r4", "--gallery-size", "0")
    assert result.exit_code == 2 and "error: --gallery-size must be at least 1, got 0" in result.output


def test_select_cases_by_hand():
    """Six rows worked by hand: wrong = b (0.9), d (0.8), e (0.8, after d by name), f (0.4);
    missed referable (true >= 2, predicted < 2) = b (referable 0.05), f (0.10), d (0.30)."""
    from retinocli.reporting.gallery import MISSED, WRONG, select_cases

    frame = pd.DataFrame({"image": list("abcdef"), "path": list("abcdef"),
                          "true_grade": [0, 3, 2, 2, 1, 4], "predicted_grade": [0, 1, 2, 0, 2, 1],
                          "confidence": [0.95, 0.9, 0.7, 0.8, 0.8, 0.4],
                          "referable_prob": [0.01, 0.05, 0.9, 0.30, 0.6, 0.10]})
    cases = select_cases(frame, size=3)
    assert cases[WRONG]["image"].tolist() == ["b", "d", "e"]
    assert cases[MISSED]["image"].tolist() == ["b", "f", "d"]
    assert select_cases(frame, size=2)[MISSED]["image"].tolist() == ["b", "f"]
    assert select_cases(frame, size=8)[WRONG]["image"].tolist() == ["b", "d", "e", "f"]
