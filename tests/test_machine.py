"""Default thread and worker counts follow the cores this process may use, not the host's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_one_allowed_core_gives_one_thread_and_no_cpu_loader_workers():
    code = ("import os, json\nos.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
            "from retinocli import machine as m\n"
            "print(json.dumps([m.cores(), m.decode_threads(), m.process_workers(), m.loader_workers('cpu'),"
            " m.loader_workers('cuda')]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout) == [1, 1, 1, 0, 1]


def test_rules_cap_threads_at_eight_and_leave_a_core_to_a_cpu_model():
    from retinocli import machine

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert machine.cores() == n
    assert machine.decode_threads() == min(8, n)
    assert machine.loader_workers("cpu") == min(4, n - 1)
    assert machine.loader_workers("cuda") == min(8, n)


def _git(where: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(where), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_source_revision_names_the_commit_of_the_package_folder(tmp_path):
    from retinocli.machine import source_revision

    repo = tmp_path / "clone"
    (repo / "retinocli").mkdir(parents=True)
    (repo / "retinocli" / "code.py").write_text("x = 1\n")
    (repo / "README.md").write_text("notes\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "first")
    head = _git(repo, "rev-parse", "HEAD")
    assert len(head) == 40 and source_revision(repo / "retinocli") == head
    (repo / "README.md").write_text("notes, edited\n")  # outside the package: the code is still HEAD's
    (repo / "retinocli" / "new.py").write_text("y = 2\n")  # untracked: nothing that was imported changed
    assert source_revision(repo / "retinocli") == head
    (repo / "retinocli" / "code.py").write_text("x = 2\n")
    assert source_revision(repo / "retinocli") == head + "+dirty"

    # an installed copy inside a user's own repository is not that repository's code
    site = repo / ".venv" / "lib" / "site-packages" / "retinocli"
    site.mkdir(parents=True)
    assert source_revision(site) is None
    plain = tmp_path / "plain" / "retinocli"
    plain.mkdir(parents=True)
    assert source_revision(plain) is None

    # this very package: the checkout's HEAD when the suite runs from one
    try:
        expected = _git(ROOT, "rev-parse", "HEAD") if (ROOT / ".git").exists() else None
    except subprocess.CalledProcessError:
        expected = None
    got = source_revision()
    assert (got if got is None else got.removesuffix("+dirty")) == expected
