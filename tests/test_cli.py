from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retinocli.cli import app
from builders import course_tree, leaky_dataset, write_lines

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_stats_prints_balance_and_majority_bar(tmp_path):
    result = run("stats", leaky_dataset(tmp_path / "lab"), "--full")
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())  # rich wraps at the terminal width
    assert "layout: course" in out
    assert "62.5%" in out  # train: 5 of 8 are grade 0, the bar to clear
    assert "2 patient(s) have images in more than one split" in out
    assert "empty file" in out


def test_stats_json_and_plot(tmp_path):
    plot = tmp_path / "balance.png"
    result = run("stats", course_tree(tmp_path / "lab"), "--json", "--plot", plot)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["splits"]["train"]["counts"] == [1, 0, 1, 0, 2]
    assert data["overall"]["images"] == 7
    assert data["plot"] == str(plot) and plot.stat().st_size > 1000
    # An existing file is never overwritten without --force.
    again = run("stats", tmp_path / "lab", "--plot", plot)
    assert again.exit_code == 2 and "already exists; pass --force" in again.output
    assert run("stats", tmp_path / "lab", "--plot", plot, "--force").exit_code == 0


@pytest.mark.parametrize("setup, args, message", [
    (None, [], "no such folder"),
    ("empty", [], "no dataset layout recognised"),
    ("badgrade", [], "grade(s) are not 0-4"),
    ("lengths", [], "lists 4 images but train_label.csv has 3 labels"),
    ("badcols", [], "expected columns image,level"),
    ("lab", ["--layout", "nonsense"], "unknown layout 'nonsense'"),
    ("lab", ["--sample", "-1"], "--sample must be 0 or more"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, setup, args, message):
    root = tmp_path / "d"
    if setup == "empty":
        root.mkdir()
    elif setup in ("badgrade", "lengths", "lab"):
        course_tree(root)
        if setup == "badgrade":
            write_lines(root / "train_label.csv", ["0", "2", "5", "4"])
        if setup == "lengths":
            write_lines(root / "train_label.csv", ["0", "2", "4"])
    elif setup == "badcols":
        write_lines(root / "trainLabels.csv", ["img,grade", "1_left,0"])
    result = run("stats", root, *args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 3  # one line, soft-wrapped at most


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_help_and_stats_do_not_import_torch(tmp_path):
    course_tree(tmp_path / "lab")
    mods = _modules_after("from typer.testing import CliRunner\nfrom retinocli.cli import app\n"
                          "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0")
    assert "torch" not in mods and "pandas" not in mods
    mods = _modules_after("from typer.testing import CliRunner\nfrom retinocli.cli import app\n"
                          f"r = CliRunner().invoke(app, ['stats', {str(tmp_path / 'lab')!r}, '--plot', "
                          f"{str(tmp_path / 'b.png')!r}]); assert r.exit_code == 0, r.output")
    assert "torch" not in mods and "torchvision" not in mods
    assert "pandas" in mods  # the command really ran


def test_console_script_runs():
    exe = Path(sys.executable).with_name("retino")
    if not exe.exists():
        pytest.skip("retino console script not installed in this environment")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "stats" in out.stdout


def test_every_command_has_help_and_is_in_readme():
    readme = (ROOT / "README.md").read_text()
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        assert command.callback.__doc__, f"{name} has no help text"
        assert f"retino {name}" in readme, f"README does not show retino {name}"
        result = run(name, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "retinocli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "synth" in out.stdout


def test_synth_command(tmp_path):
    out = tmp_path / "demo"
    result = run("synth", out, "--n", "40", "--size", "32", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["patients"] == 20
    assert sum(summary["splits"]["train"].values()) + sum(summary["splits"]["test"].values()) == 40
    assert len(list((out / "train").glob("*.jpeg"))) == sum(summary["splits"]["train"].values())
    again = run("synth", out, "--n", "40", "--size", "32")
    assert again.exit_code == 2 and "--force" in again.output
    assert run("synth", out, "--n", "7").exit_code == 2
    stats = run("stats", out, "--json")
    assert json.loads(stats.stdout)["layout"] == "kaggle"


def _documented_calls() -> list[tuple[str, str, list[str]]]:
    """(source, command, --options) for every `retino CMD ...` line in examples/ and the README."""
    import re
    import shlex

    calls = []
    sources = [*sorted((ROOT / "examples").glob("*.sh")), ROOT / "README.md", ROOT / "Makefile"]
    for src in sources:
        text = src.read_text().replace("\\\n", " ")
        if src.suffix == ".md":  # code blocks and `inline code` only, not prose
            blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
            text = "\n".join(blocks + re.findall(r"`(retino [^`]+)`", text))
        for line in text.splitlines():
            line = line.split("#")[0]  # comments are prose
            for m in re.finditer(r"(?:retino|\$\(BIN\)/retino|-m retinocli)\s+([a-z]+)([^|#`;&]*)", line):
                try:
                    words = shlex.split(m.group(2))
                except ValueError:
                    words = m.group(2).split()
                calls.append((src.name, m.group(1), [w.split("=")[0] for w in words if w.startswith("--")]))
    return calls


def test_examples_and_readme_use_real_commands_and_options():
    import typer.main

    commands = {(c.name or c.callback.__name__): c for c in app.registered_commands}
    calls = _documented_calls()
    assert len(calls) > 30
    for src, name, options in calls:
        assert name in commands, f"{src}: retino {name} is not a command"
        click_cmd = typer.main.get_command(app).commands[name]
        known = {opt for p in click_cmd.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
        for opt in options:
            assert opt in known, f"{src}: retino {name} has no option {opt}"
