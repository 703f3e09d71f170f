"""Output that scripts and logs can trust: pipes, widths, usage errors, hints, warnings.

Each test runs ``retino`` as a child process with stdout a pipe, as under ``| tee``, SLURM
or CI, unless it needs the in-process runner.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retinocli import __version__
from retinocli.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def retino(*args, env: dict | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "retinocli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=timeout)


TRAIN = ["--img-size", "32", "--batch-size", "16", "--workers", "0", "--augment", "none"]
PROGRESS_LINE = re.compile(r"^epoch (\d)/(\d): ([\d,]+)/([\d,]+) img in [\d.]+ s, [\d,.]+ img/s \| loss [\d.]+ acc [\d.]+%$")
EPOCH_LINE = re.compile(r"^epoch (\d)/(\d): ([\d,]+)/([\d,]+) img in [\d.]+ s, [\d,.]+ img/s \| loss [\d.]+ acc "
                        r"[\d.]+% \| lr [\d.e+-]+ \| val loss [\d.]+ acc [\d.]+% qwk -?[\d.]+ bal acc [\d.]+%")


@pytest.mark.parametrize("columns", [None, "60"])
def test_train_in_a_pipe_prints_one_complete_line_per_epoch(tiny_data, tmp_path, columns):
    env = {"COLUMNS": columns} if columns else {"COLUMNS": ""}
    done = retino("train", "--data", tiny_data, *TRAIN, "--epochs", "2", "--project", tmp_path / "runs", env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # a slow epoch (a loaded machine) also prints a complete progress line every 30 s: not counted
    assert all(PROGRESS_LINE.match(ln) or EPOCH_LINE.match(ln) for ln in lines if ln.startswith("epoch "))
    epochs = [ln for ln in lines if EPOCH_LINE.match(ln)]
    assert len(epochs) == 2, epochs
    assert [EPOCH_LINE.match(ln).group(1) for ln in epochs] == ["1", "2"]
    n_train = int(EPOCH_LINE.match(epochs[0]).group(4).replace(",", ""))
    assert n_train % 16 == 0  # full batches only, and the start line says how many are left over
    assert not any("━" in ln for ln in epochs) and "\r" not in done.stdout  # no live bars in a log
    assert not any(ln.startswith("epoch") and "━" in ln for ln in lines)
    run = tmp_path / "runs" / "train"
    assert f"Run folder: {run}" in lines  # a path on a line of its own, never folded
    assert f"Next: retino evaluate {run}" in lines
    # the line's rate is history.csv's images_per_second, not an estimate from the bar's last updates
    import csv

    history = list(csv.DictReader(open(run / "history.csv")))
    rates = [re.search(r"img in [\d.]+ s, ([\d,.]+) img/s", ln).group(1).replace(",", "") for ln in epochs]
    assert [float(r) for r in rates] == [float(h["images_per_second"]) for h in history]


def test_train_summary_keeps_every_column_in_a_pipe(tiny_data, tmp_path):
    done = retino("train", "--data", tiny_data, *TRAIN, "--epochs", "1", "--project", tmp_path / "runs",
                  env={"COLUMNS": ""})
    assert done.returncode == 0, done.stderr
    header = next(ln for ln in done.stdout.splitlines() if ln.startswith("┃") and "epoch" in ln)
    for column in ("epoch", "img/s", "lr", "train loss", "val loss", "val acc", "val QWK", "val bal acc"):
        assert column in header, header


def test_next_hint_names_the_split_that_exists(tiny_data, tmp_path):
    """synth data has a test split; a dataset with only train gets `--split val`."""
    import shutil

    only_train = tmp_path / "data"
    shutil.copytree(tiny_data, only_train)
    shutil.rmtree(only_train / "test", ignore_errors=True)
    (only_train / "testLabels.csv").unlink(missing_ok=True)
    done = retino("train", "--data", only_train, *TRAIN, "--epochs", "1", "--project", tmp_path / "runs")
    assert done.returncode == 0, done.stderr
    run = tmp_path / "runs" / "train"
    assert f"Next: retino evaluate {run} --split val" in done.stdout
    assert retino("evaluate", run, "--split", "val", "--json").returncode == 0

    done = retino("train", "--data", tiny_data, *TRAIN, "--epochs", "1", "--project", tmp_path / "runs2")
    assert f"Next: retino evaluate {tmp_path / 'runs2' / 'train'}\n" in done.stdout


def test_no_validation_images_is_refused_with_the_counts(tmp_path):
    from retinocli.data.synth import generate

    generate(tmp_path / "tiny", n=10, size=32, seed=0)  # 5 patients: 1 % of them is nobody
    done = retino("train", "--data", tmp_path / "tiny", *TRAIN, "--batch-size", "2", "--epochs", "1",
                  "--val-fraction", "0.01", "--project", tmp_path / "runs")
    assert done.returncode == 2, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no validation images: the split gave ") and "--val-fraction" in last
    assert "Traceback" not in done.stderr


def test_a_model_no_better_than_the_majority_bar_is_called_out(tiny_data, tmp_path):
    """One epoch at a learning rate too small to move: it answers one grade, and train says so."""
    done = retino("train", "--data", tiny_data, *TRAIN, "--epochs", "1", "--lr", "1e-9", "--project",
                  tmp_path / "runs", "--json")
    assert done.returncode == 0, done.stderr
    import json

    result = json.loads(done.stdout)
    best = result["best"]["accuracy"]
    from retinocli.reporting.metrics import majority_baseline
    import pandas as pd

    split = pd.read_csv(tmp_path / "runs" / "train" / "split.csv")
    _, bar = majority_baseline(split.loc[split["split"] == "val", "grade"].to_numpy())
    if best <= bar + 0.01:
        assert result["warnings"] and "no better than always answering" in result["warnings"][0]
    else:
        assert result["warnings"] == []


def test_squashed_photos_get_a_note_and_idrid_counts_images(tmp_path):
    from PIL import Image

    from retinocli.config import TrainConfig
    from retinocli.engine.parts import squashed_note

    wide = tmp_path / "wide.jpg"
    Image.new("RGB", (60, 40)).save(wide)
    square = tmp_path / "square.jpg"
    Image.new("RGB", (40, 40)).save(square)
    note = squashed_note([str(wide), str(square)], TrainConfig(img_size=32))
    assert note == ["1 of the first 2 training images are not square (e.g. 60x40): --preprocess none squashes "
                    "them to 32x32; --preprocess crop crops to the fundus and pads it square"]
    assert squashed_note([str(wide)], TrainConfig(img_size=32, preprocess="crop")) == []
    assert squashed_note([str(square)], TrainConfig(img_size=32)) == []

    import pandas as pd

    from retinocli.engine.dataset import training_split

    records = pd.DataFrame({"path": [f"{i}.jpg" for i in range(40)], "grade": [i % 5 for i in range(40)],
                            "split": "train", "found": True, "patient": None})
    _, notes = training_split(records, 0.1, 0)
    assert notes[-1].endswith("(10% of training images, stratified by grade)")
    records["patient"] = [str(i // 2) for i in range(40)]
    _, notes = training_split(records, 0.1, 0)
    assert notes[-1].endswith("(10% of training patients, stratified by grade)")


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"retino {__version__}\n"


@pytest.mark.parametrize("args, message, usage", [
    (["train", "--no-such-option"], "error: No such option: --no-such-option", "usage: retino train --help"),
    (["train", "--epochs", "many"], "error: Invalid value for '--epochs'", "usage: retino train --help"),
    (["evaluate", "a", "b"], "error: Got unexpected extra argument", "usage: retino evaluate --help"),
    (["no-such-command"], "error: No such command 'no-such-command'", "usage: retino --help"),
    (["predict"], "error: Missing argument 'folder'", "usage: retino predict --help"),
])
def test_usage_errors_are_one_line_and_a_hint(args, message, usage):
    done = retino(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(message) and lines[1] == usage, done.stderr
    assert "╭" not in done.stderr and "Traceback" not in done.stderr


def test_offline_weights_error_has_no_stray_download_line(tiny_data, tmp_path):
    done = retino("train", "--data", tiny_data, *TRAIN, "--pretrained", "--project", tmp_path / "runs",
                  env={"TORCH_HOME": str(tmp_path / "empty-torch-home")})
    assert done.returncode == 2
    assert "Downloading" not in done.stderr + done.stdout
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
