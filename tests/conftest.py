"""Shared test helpers: tiny images written into tmp_path, and the real data when present."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LONG_PATH = 160  # a clone deep in a cluster home folder: no test may depend on short paths
_OWN_BASETEMP = pytest.StashKey[Path]()


def pytest_configure(config) -> None:
    """The whole suite runs under a path over 150 characters and at a 60-column terminal width.

    Output that a test can only read when paths are short or lines are wide breaks here, in
    every run, not on some user's machine. ``--basetemp`` on the command line still wins.
    """
    import os
    import tempfile

    os.environ["COLUMNS"] = "60"
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # one intra-op thread per worker, read when torch (or OpenCV, or a child process)
        # starts: two workers with two OpenMP threads each on two cores spin against each
        # other, and the suite took longer than in one process
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, "1")
    if config.option.basetemp is None:
        stem = Path(tempfile.gettempdir()) / f"retino-tests-{os.getpid()}-"
        config.option.basetemp = str(stem) + "deep" * max(1, (LONG_PATH - len(str(stem))) // 4)
        config.stash[_OWN_BASETEMP] = Path(config.option.basetemp)


def pytest_sessionfinish(session, exitstatus) -> None:
    """Remove the long basetemp this conftest chose once every test passed.

    pytest removes only a basetemp it chose itself; a named one would otherwise pile up, one
    per run (about 1 GB of session-wide runs each), until the disk is full.
    """
    import shutil

    own = session.config.stash.get(_OWN_BASETEMP, None)
    if own is not None and exitstatus == 0:
        shutil.rmtree(own, ignore_errors=True)


@pytest.fixture
def shared_data() -> Path:
    """The real datasets in ../shared/data; tests that use them skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """The demo dataset, small: 300 images of 64 px, shared by every test that trains."""
    from retinocli.data.synth import generate

    out = tmp_path_factory.mktemp("synth") / "data"
    generate(out, n=300, size=64, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """48 demo images of 32 px (24 patients, a test split): for tests that train several runs."""
    from retinocli.data.synth import generate

    out = tmp_path_factory.mktemp("tiny") / "data"
    generate(out, n=48, size=32, seed=0)
    return out


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME: the torchvision weight cache the tests fill themselves."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def trained_run(synth_data, tmp_path_factory) -> Path:
    """``retino train`` of a resnet18, 5 epochs at 48 px on synth_data, through the CLI.

    Shared by the train, evaluate, export and predict tests; the CLI's ``--json`` output is
    kept beside the run as ``train-output.json``. Tests that write into a run copy it first.
    """
    from typer.testing import CliRunner

    from retinocli.cli import app

    project = tmp_path_factory.mktemp("trained") / "runs"
    result = CliRunner().invoke(app, ["train", "--data", str(synth_data), "--img-size", "48", "--epochs", "5",
                                      "--batch-size", "16", "--workers", "0", "--project", str(project), "--json"])
    assert result.exit_code == 0, result.output
    (project / "train-output.json").write_text(result.stdout)
    return project / "train"
