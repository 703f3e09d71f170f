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
