"""The run folder: its names, its numbering, and its files read back as written."""

from __future__ import annotations

import csv

import pandas as pd
import pytest

from retinocli.errors import RetinoError
from retinocli.rundir import HISTORY_FIELDS, SPLIT_COLUMNS, RunDir, newest_model


def test_runs_auto_number(tmp_path):
    assert RunDir.create(tmp_path, "train").name == "train"
    assert RunDir.create(tmp_path, "train").name == "train2"
    assert RunDir.create(tmp_path, "train").name == "train3"
    assert RunDir.create(tmp_path, "train", force=True).name == "train"


def test_history_round_trip_and_older_columns(tmp_path):
    run = RunDir.create(tmp_path, "r")
    rows = [{"epoch": 1, "val_qwk": 0.5, "lr": 1e-3}, {"epoch": 2, "val_qwk": 0.25, "extra": "x"}]
    run.write_history(rows)
    with open(run.history, newline="") as fh:
        raw = list(csv.DictReader(fh))
    assert list(raw[0]) == list(HISTORY_FIELDS) and [r["val_qwk"] for r in raw] == ["0.5", "0.25"]
    history = run.read_history()
    assert history["epoch"].tolist() == [1, 2] and history["lr"].iloc[0] == pytest.approx(1e-3)
    assert history["seconds"].isna().all()  # written empty, read as NaN
    assert not [p for p in run.path.iterdir() if p.name.endswith(".tmp")]


def test_split_config_and_paths(tmp_path):
    run = RunDir.create(tmp_path, "r")
    records = pd.DataFrame({"image": ["007", "b"], "path": ["/x/007.png", "/x/b.png"], "grade": [0, 4],
                            "split": ["train", "val"], "patient": ["1", "2"], "eye": ["left", "right"],
                            "found": [True, True]})
    run.write_split(records)
    back = run.read_split()
    assert list(back.columns) == list(SPLIT_COLUMNS) and back["image"].tolist() == ["007", "b"]
    run.write_config({"arch": "resnet18", "epochs": 3})
    assert run.read_config() == {"arch": "resnet18", "epochs": 3}
    assert run.missing() == "history.csv"
    assert RunDir.of(run.config) == run
    assert run.model("fp16").name == "model-fp16.onnx" and run.model().name == "model.onnx"


def test_resolve_checkpoint(tmp_path):
    run = RunDir.create(tmp_path, "r")
    with pytest.raises(RetinoError, match="not a training run folder"):
        RunDir.resolve_checkpoint(run.path)
    run.last.write_bytes(b"x")
    assert RunDir.resolve_checkpoint(run.path) == run.last
    run.best.write_bytes(b"x")
    assert RunDir.resolve_checkpoint(run.path) == run.best
    assert RunDir.resolve_checkpoint(None, tmp_path) == run.best
    with pytest.raises(RetinoError, match="no exported model"):
        newest_model(tmp_path)
