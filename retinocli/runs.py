"""Where a run's products are on disk: the newest run, checkpoint or exported model under runs/.

Plain pathlib, no torch: ``retino report`` and ``retino predict`` find their default input here.
"""

from __future__ import annotations

from pathlib import Path

from retinocli.errors import RetinoError


def newest(root: str | Path, pattern: str, missing: str) -> Path:
    """The most recently written file matching ``pattern`` anywhere under ``root``.

    Args:
        root: folder to search (recursively).
        pattern: a glob such as ``best.pt`` or ``*.onnx``.
        missing: the error message when there is none.

    Raises:
        RetinoError: no such file under ``root``.
    """
    root = Path(root)
    found = [p for p in root.rglob(pattern) if p.is_file()] if root.is_dir() else []
    if not found:
        raise RetinoError(missing)
    return max(found, key=lambda p: (p.stat().st_mtime_ns, str(p)))
