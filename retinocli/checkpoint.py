"""Checkpoints as plain dicts: written atomically, loaded with ``weights_only=True``.

A checkpoint holds: ``model`` (state dict), ``optimizer``, ``scheduler``, ``scaler``,
``epoch`` (completed epochs), ``config`` (TrainConfig as a dict), ``class_names``,
``preprocess`` (Preprocess as a dict), ``metrics`` (validation metrics of that epoch),
``rng`` (generator states for an exact resume), ``versions``. Everything in it is a tensor
or plain Python data, so the safe unpickler loads it and no code in a file ever runs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from retinocli.errors import RetinoError


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> Path:
    """Write ``obj`` to ``path`` so that a crash at any moment leaves the old file or the new one.

    The bytes go to a temporary file in the same folder, are flushed to disk, and only then
    replace ``path`` with one atomic rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a retino checkpoint with the safe unpickler.

    Raises:
        RetinoError: missing file, a file that is not a checkpoint, or one carrying code.
    """
    path = Path(path)
    if not path.is_file():
        raise RetinoError(f"no such checkpoint: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RetinoError(f"{path}: refused or unreadable checkpoint ({first[:200]})") from None
    if not isinstance(obj, dict) or "model" not in obj or "config" not in obj:
        raise RetinoError(f"{path}: not a retino checkpoint (no model and config inside)")
    return obj
