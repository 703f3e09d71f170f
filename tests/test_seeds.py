"""``retino train --seeds`` (engine/seeds.py): one run per seed, resumable, refused over other
settings; then evaluate and report show the seeds' mean ± sd."""

from __future__ import annotations

import json
import statistics

import pytest
from typer.testing import CliRunner

from retinocli.cli import app
from retinocli.config import TrainConfig
from retinocli.engine import seeds as sd
from retinocli.errors import RetinoError
from retinocli.reporting.evaluate import evaluate
from retinocli.reporting.study import STUDY_JSON
from retinocli.rundir import RunDir

runner = CliRunner()
# 32 px with the ImageNet stem, one epoch: the cheapest training that still writes every file
TINY = dict(img_size=32, epochs=1, batch_size=16, workers=0, stem="imagenet", augment="none", val_fraction=0.25)


def cli_options(data, project) -> list[str]:
    return ["--data", str(data), "--img-size", "32", "--epochs", "1", "--batch-size", "16", "--workers", "0",
            "--stem", "imagenet", "--augment", "none", "--val-fraction", "0.25", "--project", str(project),
            "--name", "tiny"]


def test_parse_seeds():
    assert sd.parse_seeds("0,1,2") == [0, 1, 2]
    assert sd.parse_seeds(" 7 ") == [7]
    for bad, message in (("0,x", "integers >= 0"), ("-1", "integers >= 0"), ("", "integers >= 0"),
                         ("1,,2", "integers >= 0"), ("3,3", "repeats a seed")):
        with pytest.raises(RetinoError, match=message):
            sd.parse_seeds(bad)
    assert sd.seed_config(TrainConfig(name="study", seed=9), 2).name == "study-s2"


def test_seed_state_reads_what_each_folder_holds(tmp_path):
    cfg = sd.seed_config(TrainConfig(project=str(tmp_path), name="r", epochs=3, patience=2), 0)
    run = RunDir(tmp_path / "r-s0")
    assert sd.seed_state(cfg) == sd.NEW
    run.path.mkdir()
    assert sd.seed_state(cfg) == sd.NEW  # an empty folder
    (run.path / "notes.txt").write_text("mine")
    with pytest.raises(RetinoError, match="is not a training run"):
        sd.seed_state(cfg)
    (run.path / "notes.txt").unlink()
    # config.json as the trainer writes it: resolved amp/channels_last/workers, extra keys
    run.write_config({**cfg.to_dict(), "amp": False, "channels_last": False, "workers": 8, "learning_rate": 1e-3})
    assert sd.seed_state(cfg) == sd.EMPTY  # killed before its first epoch
    row = {"epoch": 1, "val_qwk": 0.5, "val_accuracy": 0.5, "val_loss": 1.0}
    run.write_history([row])
    run.last.write_bytes(b"")
    assert sd.seed_state(cfg) == sd.PARTIAL
    run.write_history([row, {**row, "epoch": 2, "val_qwk": 0.4}, {**row, "epoch": 3, "val_qwk": 0.3}])
    assert sd.seed_state(cfg) == sd.FINISHED
    run.write_history([row, {**row, "epoch": 2, "val_qwk": 0.4}])
    assert sd.seed_state(cfg) == sd.PARTIAL  # one epoch without progress: patience 2 not reached
    run.write_history([row, {**row, "epoch": 2, "val_qwk": 0.4}, {**row, "epoch": 3, "val_qwk": 0.45}])
    cfg5 = sd.seed_config(TrainConfig(project=str(tmp_path), name="r", epochs=5, patience=2), 0)
    run.write_config(cfg5.to_dict())
    assert sd.seed_state(cfg5) == sd.FINISHED  # stopped early by --patience 2 after epoch 3 of 5
    with pytest.raises(RetinoError, match=r"other settings \(epochs 5 there, 3 here\); .*--force"):
        sd.seed_state(cfg)


def test_train_seeds_skips_finished_seeds_and_reports(tiny_data, tmp_path):
    project = tmp_path / "runs"
    cfg = TrainConfig(data=str(tiny_data), project=str(project), name="tiny", **TINY)
    seen = []
    first = sd.train_seeds(cfg, [0], on_epoch_end=lambda seed, epoch, row: seen.append((seed, epoch)))
    assert seen == [(0, 1)] and [r.done for r in first.runs] == ["trained"]
    s0, s1 = project / "tiny-s0", project / "tiny-s1"
    stamp = (s0 / "best.pt").stat().st_mtime_ns

    result = runner.invoke(app, ["train", *cli_options(tiny_data, project), "--seeds", "0,1", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [(r["seed"], r["done"], r["run_dir"]) for r in out["runs"]] == [
        (0, "trained earlier", str(s0)), (1, "trained", str(s1))]
    assert (s0 / "best.pt").stat().st_mtime_ns == stamp  # not trained again
    assert [RunDir(s).read_config()["seed"] for s in (s0, s1)] == [0, 1]
    qwk = [float(RunDir(s).read_history()["val_qwk"].max()) for s in (s0, s1)]
    assert out["summary"]["val_qwk"]["mean"] == pytest.approx(statistics.mean(qwk))
    assert out["summary"]["val_qwk"]["sd"] == pytest.approx(statistics.stdev(qwk))

    again = runner.invoke(app, ["train", *cli_options(tiny_data, project), "--seeds", "0,1,2", "--epochs", "2"])
    assert again.exit_code == 2
    assert "epochs 1 there, 2 here" in again.output and "--force" in again.output
    assert not (project / "tiny-s2").exists()  # refused before any seed trained

    for run in (s0, s1):
        evaluate(run, split="test", bootstrap=0)
    report = runner.invoke(app, ["report", str(s0), str(s1), "--out", str(tmp_path / "report"), "--no-gallery",
                                 "--json"])
    assert report.exit_code == 0, report.output
    study = json.loads((tmp_path / "report" / STUDY_JSON).read_text())
    [recipe] = study["recipes"]
    assert (recipe["recipe"], recipe["seeds"], recipe["runs"]) == ("tiny", [0, 1], ["tiny-s0", "tiny-s1"])
    test_qwk = [RunDir(s).read_metrics()["metrics"]["qwk"] for s in (s0, s1)]
    assert recipe["metrics"]["qwk"]["mean"] == pytest.approx(statistics.mean(test_qwk))
    assert recipe["metrics"]["qwk"]["sd"] == pytest.approx(statistics.stdev(test_qwk))
    assert study["comparisons"] == []  # one recipe: nothing to pair
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| `tiny` | 0, 1 | test (" in text and "±" in text
