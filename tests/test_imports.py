"""The packages marked "no torch" never import it, so `retino --help`, `stats` and `predict`
start at once and predict runs where torch is absent."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_FREE = ("retinocli", "retinocli.rundir", "retinocli.errors", "retinocli.config", "retinocli.events", "retinocli.machine",
              "retinocli.cli", "retinocli.data", "retinocli.imaging", "retinocli.deploy",
              "retinocli.reporting.metrics", "retinocli.reporting.bootstrap", "retinocli.reporting.clinical",
              "retinocli.reporting.calibration", "retinocli.models.grading", "retinocli.models.cutpoints",
              "retinocli.reporting.study", "retinocli.engine.seeds",
              "retinocli.models.freeze", "retinocli.reporting.referral", "retinocli.reporting.render_evaluate",
              "retinocli.reporting.figures_calibration", "retinocli.reporting.results")
TORCH_ALLOWED = ("retinocli.deploy.export",)  # torch -> ONNX needs torch


def _modules(package: str) -> list[str]:
    module = __import__(package, fromlist=["_"])
    names = [package]
    if hasattr(module, "__path__") and package != "retinocli":  # the top level alone; its packages are listed
        names += [m.name for m in pkgutil.walk_packages(module.__path__, package + ".")]
    return [n for n in names if n not in TORCH_ALLOWED]


def _imported_after(code: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("package", TORCH_FREE)
def test_torch_free_packages_do_not_import_torch(package):
    imported = _imported_after("\n".join(f"import {n}" for n in _modules(package)))
    assert "torch" not in imported, f"importing {package} pulled in torch"


def test_help_does_not_import_torch():
    for argv in (["--help"], ["predict", "--help"], ["train", "--help"]):
        imported = _imported_after("from typer.testing import CliRunner\nfrom retinocli.cli import app\n"
                                   f"CliRunner().invoke(app, {argv!r})")
        assert "torch" not in imported, argv


# library modules that report progress through retinocli.events: usable with no terminal
RICH_FREE = ("retinocli.events", "retinocli.machine", "retinocli.data.stats", "retinocli.data.synth", "retinocli.imaging.cache",
             "retinocli.deploy.onnx_model", "retinocli.deploy.metadata", "retinocli.deploy.providers")


@pytest.mark.parametrize("module", RICH_FREE)
def test_library_modules_do_not_import_rich(module):
    imported = _imported_after(f"import {module}")
    assert not [m for m in imported if m == "rich" or m.startswith("rich.")], f"{module} pulled in rich"
