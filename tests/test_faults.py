"""Faults: SIGKILL during training, during a checkpoint write and during prediction.

Each fault is real: a separate process is killed with SIGKILL (no handler can run), at a
moment chosen by watching its files or, for the checkpoint write, by the process killing
itself half-way through writing the bytes. Afterwards every checkpoint must load, and resuming
must give what an uninterrupted run gives.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retinocli.engine.checkpoints import load_checkpoint
from builders import build_tiny_onnx

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ARGS = ["--img-size", "32", "--epochs", "2", "--batch-size", "16", "--workers", "0", "--deterministic",
              "--augment", "light", "--seed", "7"]


def retino(*args: str) -> list[str]:
    return [sys.executable, "-m", "retinocli", *map(str, args)]


def env() -> dict[str, str]:
    # one intra-op thread in every process, so float sums add up in one order everywhere
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_ok(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return done


def wait_for(predicate, timeout: float = 300.0, every: float = 0.02) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(every)


def history_rows(run: Path) -> int:
    try:
        return max(0, len((run / "history.csv").read_text().splitlines()) - 1)
    except OSError:
        return 0


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(synth_data, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must end up equal to."""
    project = tmp_path_factory.mktemp("faults") / "runs"
    run_ok(retino("train", "--data", synth_data, *TRAIN_ARGS, "--project", project, "--name", "full"))
    return project / "full"


def test_sigkill_mid_epoch_then_resume(reference, synth_data, tmp_path):
    project = tmp_path / "runs"
    run = project / "cut"
    proc = subprocess.Popen(retino("train", "--data", synth_data, *TRAIN_ARGS, "--project", project, "--name", "cut"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), cwd=ROOT)
    try:
        wait_for(lambda: history_rows(run) >= 1 or proc.poll() is not None)
        time.sleep(0.2)  # into epoch 2 (about 3 s long)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done = load_checkpoint(run / "last.pt")["epoch"]
    assert done == 1, "the kill did not land in epoch 2"
    load_checkpoint(run / "best.pt")  # loads
    assert history_rows(run) == done

    run_ok(retino("train", "--resume", run))
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    assert same(weights(run / "last.pt"), weights(reference / "last.pt"))
    assert history_rows(run) == 2
    assert not list(run.glob(".*.tmp"))


def test_ctrl_c_mid_epoch_exits_130_names_resume_then_resumes(reference, synth_data, tmp_path):
    """SIGINT (Ctrl-C) is not success: exit 130 so `set -e` scripts stop, and say how to go on."""
    project = tmp_path / "runs"
    run = project / "cut"
    # a suite started in the background by a non-interactive shell inherits SIGINT ignored, and
    # Python then never turns it into KeyboardInterrupt: give the child the default disposition
    proc = subprocess.Popen(retino("train", "--data", synth_data, *TRAIN_ARGS, "--project", project, "--name", "cut"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # at once: epoch 1 is saved (history.csv is written last), so any moment from here is in epoch 2
        wait_for(lambda: history_rows(run) >= 1 or proc.poll() is not None)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err
    assert f"last.pt holds epoch 1; continue with: retino train --resume {run}" in err
    assert "Next:" not in out
    assert load_checkpoint(run / "last.pt")["epoch"] == 1

    run_ok(retino("train", "--resume", run))
    assert same(weights(run / "last.pt"), weights(reference / "last.pt"))
    assert history_rows(run) == 2


def test_sigkill_while_writing_a_checkpoint(reference, synth_data, tmp_path):
    """The process kills itself after writing half of epoch 2's first checkpoint file."""
    project = tmp_path / "runs"
    script = textwrap.dedent(f"""
        import io, os, signal, sys
        import torch
        import retinocli.engine.checkpoints as ck
        real_save, calls = torch.save, []

        def dying_save(obj, fh, *a, **k):
            calls.append(1)
            if len(calls) < 3:          # epoch 1 writes best.pt and last.pt whole
                return real_save(obj, fh, *a, **k)
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        ck.torch.save = dying_save
        from retinocli.cli import main
        sys.argv = ["retino", "train", "--data", {str(synth_data)!r}, *{TRAIN_ARGS!r},
                    "--project", {str(project)!r}, "--name", "cut"]
        main()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env(), cwd=ROOT,
                          timeout=1800)
    assert done.returncode == -signal.SIGKILL, done.stderr
    run = project / "cut"
    assert list(run.glob(".*.tmp")), "the kill should have left a half-written temporary file"
    assert load_checkpoint(run / "last.pt")["epoch"] == 1  # the old file, whole
    assert load_checkpoint(run / "best.pt")["epoch"] == 1

    run_ok(retino("train", "--resume", run))
    assert same(weights(run / "last.pt"), weights(reference / "last.pt"))
    assert not list(run.glob(".*.tmp")), "resume cleans up what the kill left"


def test_sigkill_predict_then_resume(tmp_path):
    model = build_tiny_onnx(tmp_path / "tiny.onnx")
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1500):
        arr = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i:05d}.png", compress_level=0)
    (folder / "00007.png").write_bytes(b"")  # one broken file among them
    out = tmp_path / "predictions.csv"
    cmd = retino("predict", folder, "--model", model, "--out", out, "--batch-size", "4", "--threads", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), cwd=ROOT)
    try:
        wait_for(lambda: out.exists() and out.stat().st_size > 4000 or proc.poll() is not None)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    before = out.read_text()
    complete = before[: before.rfind("\n") + 1]
    finished = len(complete.splitlines()) - 1
    assert 0 < finished < 1500, "the kill did not land mid-run"

    again = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT)
    assert again.returncode == 2 and "--resume" in again.stderr  # never overwritten by accident
    run_ok([*cmd, "--resume"])
    after = out.read_text()
    graded = "".join(line for line in complete.splitlines(keepends=True) if ",error," not in line)
    assert after.startswith(graded)  # graded rows untouched; the unreadable one is read again
    rows = list(csv.DictReader(open(out)))
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == 1500  # every image exactly once
    assert {Path(p).name for p in paths} == {f"{i:05d}.png" for i in range(1500)}
    assert [r["status"] for r in rows if Path(r["path"]).name == "00007.png"] == ["error"]
