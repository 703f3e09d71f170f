"""Issue #14: the shipped recipes train through the real --config path, and `retino results`
writes RESULTS.md whose numbers are the runs' own metrics.json and history.csv."""

from __future__ import annotations

import json
import re
import shlex
import statistics
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retinocli.cli import app
from retinocli.config import TrainConfig
from retinocli.reporting.results import IMAGE_METRICS, PATIENT_METRICS

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "examples" / "recipes").glob("*.toml"))
# what a test may change in a recipe: the data and how long and how large it trains
OVERRIDES = {"img_size": 16, "epochs": 1, "batch_size": 8, "workers": 0}
runner = CliRunner()


def _flags(overrides: dict) -> list[str]:
    return [w for k, v in overrides.items() for w in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory) -> dict[str, Path]:
    """Every shipped recipe trained 1 epoch at 16 px on 60 synthetic images (the retinamnist one
    for seeds 0 and 1), each evaluated on its validation split."""
    from retinocli.data.synth import generate

    root = tmp_path_factory.mktemp("recipes")
    data = root / "data"
    generate(data, n=60, size=32, seed=3)
    runs = {}
    for recipe in RECIPES:
        for seed in ((0, 1) if recipe.stem == "retinamnist" else (0,)):
            name = f"{recipe.stem}-s{seed}"
            args = ["train", "--config", str(recipe), "--data", str(data), *_flags(OVERRIDES), "--seed", str(seed),
                    "--val-fraction", "0.3", "--project", str(root / "runs"), "--name", name, "--json"]
            result = runner.invoke(app, args)
            assert result.exit_code == 0, result.output
            run = Path(json.loads(result.stdout)["run_dir"])
            evaluated = runner.invoke(app, ["evaluate", str(run), "--split", "val", "--bootstrap", "20"])
            assert evaluated.exit_code == 0, evaluated.output
            runs[name] = run
    return runs


def test_recipes_exist_and_hold_only_train_options():
    assert {r.stem for r in RECIPES} >= {"retinamnist", "eyepacs-256"}
    for recipe in RECIPES:
        keys = TrainConfig.from_file(recipe)  # raises on a key that is no option
        TrainConfig(**keys)  # and on a value no option takes
        assert "data" not in keys  # the data folder is the user's: given on the command line


def test_each_recipe_trains_through_config_with_command_line_overrides(recipe_runs):
    for recipe in RECIPES:
        saved = json.loads((recipe_runs[f"{recipe.stem}-s0"] / "config.json").read_text())
        wanted = {k.replace("-", "_"): v for k, v in tomllib.loads(recipe.read_text()).items()}
        wanted.pop("name", None)  # --name on the command line overrides it
        for key, value in wanted.items():
            assert saved[key] == OVERRIDES.get(key, value), (recipe.name, key)
        assert saved["recipe"] == str(recipe)
        assert saved["versions"]["cpus"] >= 1 and saved["versions"]["machine"]


def test_command_line_gives_back_the_config():
    cfg = TrainConfig(data="d/x y", img_size=28, head="ordinal", ema=0.98, epochs=12, amp=False, seed=3,
                      preprocess="graham", pretrained=True, recipe="r.toml")
    words = shlex.split(cfg.command_line())
    assert words[:2] == ["retino", "train"] and "--recipe" not in words and "--config" not in words
    assert "--no-amp" in words and "--pretrained" in words
    values, i = {}, 2
    while i < len(words):
        key = words[i][2:].replace("-", "_")
        if key.startswith("no_"):
            values[key[3:]], i = False, i + 1
        elif key in ("pretrained",):
            values[key], i = True, i + 1
        else:
            field = TrainConfig.__dataclass_fields__[key]
            kind = type(getattr(cfg, key))
            values[key], i = (kind(words[i + 1]) if field.default is not None else words[i + 1]), i + 2
    assert TrainConfig(**values) == TrainConfig(**{**cfg.to_dict(), "recipe": None})
    assert TrainConfig().command_line() == "retino train"


def _table(text: str, heading: str) -> list[dict[str, str]]:
    block = text.split(f"## {heading}\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    header = [c.strip() for c in block[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in block[2:]]


def _metric(report: dict, where: tuple[str, ...]) -> float:
    for key in where:
        report = report[key]
    return float(report)


def test_results_table_holds_the_runs_numbers(recipe_runs, tmp_path):
    out = tmp_path / "RESULTS.md"
    runs = [str(p) for p in recipe_runs.values()]
    result = runner.invoke(app, ["results", *runs, "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    per_run = {row["run"]: row for row in _table(text, "Runs")}
    assert set(per_run) == set(recipe_runs)
    for name, run in recipe_runs.items():
        report = json.loads((run / "metrics.json").read_text())
        row = per_run[name]
        for header, where in (*IMAGE_METRICS, *PATIENT_METRICS):
            if header in row and row[header] != "–":
                assert float(row[header]) == pytest.approx(_metric(report, where), abs=5e-4), (name, header)
        history = [line.split(",") for line in (run / "history.csv").read_text().splitlines()[1:]]
        assert row["train time"] == f"{sum(float(h[1]) for h in history) / 60:.1f} min"
        assert float(row["last-epoch QWK"]) == pytest.approx(float(history[-1][7]), abs=5e-4)
        commit = json.loads((run / "config.json").read_text())["versions"]["retino_commit"]
        assert row["code"] == ("–" if commit is None else commit[:7] + ("+dirty" if commit.endswith("+dirty") else ""))
    summary = _table(text, "Summary")
    assert len(summary) == 2  # retinamnist seeds 0 and 1 form one group; eyepacs-256 the other
    two = next(r for r in summary if r["recipe"] == "retinamnist.toml")
    assert two["seeds"] == "0,1" and two["head"] == "ordinal"
    reports = [json.loads((recipe_runs[f"retinamnist-s{s}"] / "metrics.json").read_text()) for s in (0, 1)]
    qwks = [r["metrics"]["qwk"] for r in reports]
    assert two["QWK"] == f"{statistics.mean(qwks):.3f} ± {statistics.stdev(qwks):.3f}"
    commands = re.findall(r"^\s*(retino train .*)$", text.split("## Commands", 1)[1], flags=re.M)
    recorded = [json.loads((run / "config.json").read_text())["command"] for run in recipe_runs.values()]
    assert sorted(commands) == sorted(recorded) and len(commands) == 3
    assert all("--img-size 16" in c and "--head ordinal" in c for c in commands)
    assert sum("--seed 1" in c for c in commands) == 1  # seed 0 is the default: not spelled out


def test_results_refuses_what_it_cannot_use(recipe_runs, tmp_path):
    run = next(iter(recipe_runs.values()))
    out = tmp_path / "R.md"
    out.write_text("mine")
    result = runner.invoke(app, ["results", str(run), "--out", str(out)])
    assert result.exit_code == 2 and "--force" in result.output and out.read_text() == "mine"
    result = runner.invoke(app, ["results", str(tmp_path), "--out", str(tmp_path / "x.md")])
    assert result.exit_code == 2 and "no config.json" in result.output and "Traceback" not in result.output
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((run / "config.json").read_text())
    result = runner.invoke(app, ["results", str(bare), "--out", str(tmp_path / "x.md")])
    assert result.exit_code == 2 and "--split val" in result.output
    (bare / "metrics.json").write_text(json.dumps({"split": "test"}))
    result = runner.invoke(app, ["results", str(bare), "--out", str(tmp_path / "x.md")])
    assert result.exit_code == 2 and "validation numbers only" in result.output
    assert not (tmp_path / "x.md").exists()


def test_results_section_keeps_the_notebook_around_it(recipe_runs, tmp_path):
    runs = [str(recipe_runs[f"retinamnist-s{s}"]) for s in (0, 1)]
    out = tmp_path / "NOTES.md"
    mine = "# My notebook\n\nWritten by hand: why seed 1 looks odd.\n"
    out.write_text(mine)
    args = ["results", *runs, "--out", str(out), "--section", "RetinaMNIST, two seeds"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    text = out.read_text()
    assert text.startswith(mine + "\n<!-- retino results: RetinaMNIST, two seeds -->\n## RetinaMNIST, two seeds\n")
    assert text.endswith("<!-- end of retino results: RetinaMNIST, two seeds -->\n")
    assert "\n### Summary\n" in text and "\n### Runs\n" in text and "\n# Results" not in text
    for row in record["runs"]:  # --json carries the numbers the table shows
        report = json.loads((Path(row["run"]) / "metrics.json").read_text())
        assert row["metrics"]["QWK"] == pytest.approx(report["metrics"]["qwk"], abs=1e-12)
    assert sorted(r["seed"] for r in record["runs"]) == [0, 1] and record["out"] == str(out)
    assert [r["QWK"] for r in _table(text, "Summary")] == [r["QWK"] for r in _table(_whole(runs, tmp_path), "Summary")]

    (out.open("a")).write("\nMore by hand, after the section.\n")
    before = out.read_text()
    result = runner.invoke(app, args)  # the section exists: only --force replaces it
    assert result.exit_code == 2 and "--force" in result.output and out.read_text() == before
    result = runner.invoke(app, ["results", runs[0], "--out", str(out), "--section", "seed 0 alone"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["results", runs[1], "--out", str(out), "--section", "RetinaMNIST, two seeds",
                                 "--force"])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.startswith(mine) and "More by hand, after the section.\n" in text
    assert text.count("<!-- retino results: ") == 2 and text.count("## RetinaMNIST, two seeds\n") == 1
    replaced = text.split("<!-- retino results: RetinaMNIST, two seeds -->", 1)[1].split("<!-- end of", 1)[0]
    assert [r["seeds"] for r in _table(replaced, "Summary")] == ["1"]
    assert text.index("More by hand") < text.index("seed 0 alone")  # the other section stays where it was

    out.write_text(text.replace("<!-- end of retino results: seed 0 alone -->\n", ""))
    result = runner.invoke(app, ["results", runs[0], "--out", str(out), "--section", "seed 0 alone", "--force"])
    assert result.exit_code == 2 and "lacks its end line" in result.output
    result = runner.invoke(app, ["results", runs[0], "--out", str(out), "--section", "a --> b"])
    assert result.exit_code == 2 and "--section must be one line" in result.output


def _whole(runs: list[str], tmp_path: Path) -> str:
    out = tmp_path / "whole.md"
    result = runner.invoke(app, ["results", *runs, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out.read_text()
