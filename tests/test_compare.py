from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from retinocli.cli import app
from retinocli.reporting.compare import compare, grid
from retinocli.config import TrainConfig
from retinocli.errors import RetinoError
from builders import put_imagenet_weights

runner = CliRunner()


def test_grid_order_and_validation():
    cells = grid(["resnet18", "resnet50"], "both")
    assert [c.name for c in cells] == ["resnet18-imagenet", "resnet18-scratch", "resnet50-imagenet", "resnet50-scratch"]
    assert [c.name for c in grid(["resnet18"], "no")] == ["resnet18-scratch"]
    with pytest.raises(RetinoError, match="--pretrained"):
        grid(["resnet18"], "maybe")
    with pytest.raises(RetinoError, match="unknown"):
        grid(["resnet19"], "both")
    with pytest.raises(RetinoError, match="repeated"):
        grid(["resnet18", "resnet18"], "both")
    seeded = grid(["resnet18"], "both", seeds=[0, 2])
    assert [(c.name, c.seed) for c in seeded] == [("resnet18-imagenet-s0", 0), ("resnet18-imagenet-s2", 2),
                                                  ("resnet18-scratch-s0", 0), ("resnet18-scratch-s2", 2)]


def test_interrupted_grid_resumes_and_reports(synth_data, tmp_path, torch_home):
    put_imagenet_weights("resnet18", "IMAGENET1K_V1")
    base = TrainConfig(data=str(synth_data), img_size=32, epochs=2, batch_size=32, workers=0, augment="none",
                       project=str(tmp_path / "runs"), name="study")

    def interrupt(cell, epoch, row):
        if cell == "resnet18-scratch" and epoch == 1:
            raise KeyboardInterrupt  # what Ctrl-C raises inside the loop

    with pytest.raises(KeyboardInterrupt):
        compare(base, ["resnet18"], pretrained="both", on_epoch_end=interrupt)
    parent = tmp_path / "runs" / "study"
    first = parent / "resnet18-imagenet"
    assert (first / "metrics.json").is_file()  # finished and evaluated before the interruption
    mtime = (first / "best.pt").stat().st_mtime

    epochs_seen = []
    result = compare(base, ["resnet18"], pretrained="both",
                     on_epoch_end=lambda cell, epoch, row: epochs_seen.append((cell, epoch)))
    assert epochs_seen == [("resnet18-scratch", 2)]  # only the missing epoch was trained
    assert (first / "best.pt").stat().st_mtime == mtime
    assert result.done[0].startswith("resnet18-imagenet: trained earlier")
    assert result.done[1].startswith("resnet18-scratch: resumed at epoch 1")
    for run in result.runs:
        m = json.loads((run / "metrics.json").read_text())
        assert m["split"] == "test" and m["metrics"]["n"] == 60
    text = result.markdown.read_text()
    assert "resnet18-imagenet" in text or "ImageNet" in text
    assert (result.report_dir / "accuracy-comparison.png").is_file()
    # what differs: the weights, and what follows from them (the default learning rate; the
    # small stem that auto picks for 32 px from scratch)
    want = {"resnet18-imagenet": {"weights": "ImageNet", "learning_rate": 3e-4, "small_stem": False},
            "resnet18-scratch": {"weights": "scratch", "learning_rate": 1e-3, "small_stem": True}}
    assert result.differences == result.to_dict()["differences"] == want
    assert "| weights ImageNet, learning_rate 0.0003, small_stem off |" in text

    # the CLI on the finished grid trains nothing and says the same
    args = ["compare", "--data", str(synth_data), "--arch", "resnet18", "--img-size", "32", "--epochs", "2",
            "--batch-size", "32", "--workers", "0", "--augment", "none", "--project", str(tmp_path / "runs"),
            "--name", "study"]
    cli = runner.invoke(app, [*args, "--json"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["differences"] == want
    cli = runner.invoke(app, args)
    assert cli.exit_code == 0, cli.output
    lines = [line.strip() for line in cli.output.splitlines()]
    start = lines.index("What differs between the runs:")
    assert lines[start + 1: start + 3] == [
        "resnet18-imagenet: weights ImageNet, learning_rate 0.0003, small_stem off",
        "resnet18-scratch: weights scratch, learning_rate 0.001, small_stem on"]

    other = TrainConfig(**{**base.to_dict(), "epochs": 3})
    with pytest.raises(RetinoError, match="different comparison"):
        compare(other, ["resnet18"], pretrained="both")


def test_pretrained_cells_need_their_weights_before_anything_trains(synth_data, tmp_path, torch_home):
    result = runner.invoke(app, ["compare", "--data", str(synth_data), "--arch", "resnet18", "--img-size", "32",
                                 "--epochs", "1", "--project", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "resnet18-f37072fd.pth" in result.output
    assert not (tmp_path / "runs" / "compare" / "resnet18-imagenet").exists()


def test_a_missing_test_split_is_refused_before_training(tmp_path):
    from builders import write_image

    for grade in range(5):
        for i in range(2):
            write_image(tmp_path / "data" / str(grade) / f"{grade}_{i}.png", seed=grade * 10 + i)
    result = runner.invoke(app, ["compare", "--data", str(tmp_path / "data"), "--arch", "resnet18",
                                 "--pretrained", "no", "--img-size", "32", "--epochs", "1",
                                 "--project", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "no labelled test split" in result.output and "--split val" in result.output
    assert not (tmp_path / "runs").exists()


def test_compare_seeds_trains_each_cell_per_seed_and_reports_their_mean_sd(tiny_data, tmp_path):
    args = ["compare", "--data", str(tiny_data), "--arch", "resnet18", "--pretrained", "no", "--img-size", "32",
            "--epochs", "1", "--batch-size", "16", "--workers", "0", "--augment", "none",
            "--project", str(tmp_path / "runs"), "--seeds", "0,1"]
    refused = runner.invoke(app, [*args, "--seed", "3"])
    assert refused.exit_code == 2 and "--seed and --seeds cannot be used together" in refused.output
    assert not (tmp_path / "runs").exists()
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    parent = tmp_path / "runs" / "compare"
    assert out["runs"] == [str(parent / "resnet18-scratch-s0"), str(parent / "resnet18-scratch-s1")]
    assert [json.loads((parent / n / "config.json").read_text())["seed"] for n in
            ("resnet18-scratch-s0", "resnet18-scratch-s1")] == [0, 1]
    [recipe] = out["study"]["recipes"]
    qwk = [json.loads((parent / n / "metrics.json").read_text())["metrics"]["qwk"]
           for n in ("resnet18-scratch-s0", "resnet18-scratch-s1")]
    assert recipe["recipe"] == "resnet18-scratch" and recipe["metrics"]["qwk"]["values"] == pytest.approx(qwk)
    assert "## Seeds and paired comparison" in (parent / "report" / "report.md").read_text()
    again = runner.invoke(app, [*args, "--json"])  # resumes: nothing left to train
    assert again.exit_code == 0, again.output
    assert [d.split(":")[1].strip() for d in json.loads(again.stdout)["done"]] == ["trained earlier (1 epochs)"] * 2


def test_compare_takes_a_train_recipe_every_cell_shares(tiny_data, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('head = "ordinal"\nema = 0.9\nepochs = 3\nimg-size = 32\nname = "the-recipes-own"\n')
    args = ["compare", "--data", str(tiny_data), "--arch", "resnet18", "--pretrained", "no", "--epochs", "1",
            "--batch-size", "16", "--workers", "0", "--augment", "none", "--split", "val",
            "--project", str(tmp_path / "runs"), "--config", str(recipe), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "runs" / "compare" / "resnet18-scratch" / "config.json").read_text())
    # the recipe's settings reach the cell; the command line wins where it names the option (--epochs)
    assert (cfg["head"], cfg["ema"], cfg["img_size"], cfg["epochs"]) == ("ordinal", 0.9, 32, 1)
    assert cfg["recipe"] == str(recipe) and not (tmp_path / "runs" / "the-recipes-own").exists()

    recipe.write_text('arch = "resnet50"\n')
    refused = runner.invoke(app, [*args[:-1], "--name", "other"])
    assert refused.exit_code == 2 and "error:" in refused.output and "'arch' is set by compare's grid" in refused.output
    assert not (tmp_path / "runs" / "other").exists()
