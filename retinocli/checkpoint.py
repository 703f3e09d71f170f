"""Checkpoints as plain dicts: written atomically, loaded with ``weights_only=True``.

A run keeps two, with different jobs:

    best.pt  the model to use (``MODEL_KEYS``): ``model`` (state dict), ``epoch`` (completed
             epochs), ``config`` (TrainConfig as a dict), ``class_names``, ``preprocess``
             (Preprocess as a dict), ``small_stem``, ``metrics`` (validation metrics of that
             epoch), ``versions``, ``grader`` (retinocli.grading.Grader as a dict: head, cut
             points; absent in older runs: softmax). With --ema, ``model`` is the averaged
             weights. What evaluate and export read; a third of last.pt's bytes
             with AdamW, which keeps two moments per weight.
    last.pt  the training state to resume (``MODEL_KEYS`` + ``RESUME_KEYS``): also
             ``optimizer``, ``scheduler``, ``scaler``, ``rng`` (generator states for an exact
             resume), ``best_metrics``, ``best_epoch``, ``history``; with --ema, ``ema`` (the
             AveragedModel's state dict), while ``model`` there is the raw weights.

Everything in them is a tensor or plain Python data, so the safe unpickler loads them and no
code in a file ever runs.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import torch

from retinocli.errors import RetinoError

MODEL_KEYS = ("model", "epoch", "config", "class_names", "preprocess", "small_stem", "metrics", "versions",
              "grader")
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "rng", "best_metrics", "best_epoch", "history", "ema")


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> Path:
    """Write ``obj`` to ``path`` so that a crash at any moment leaves the old file or the new one.

    The bytes go to a temporary file in the same folder, are flushed to disk, and only then
    replace ``path`` with one atomic rename. The file gets the permissions of any other
    output (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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


def newest_run_checkpoint(root: str | Path = "runs") -> Path:
    """The ``best.pt`` most recently written anywhere under ``root`` (the newest run)."""
    from retinocli.runs import newest

    return newest(root, "best.pt", f"no trained run under {root}/ (no best.pt); run `retino train` first "
                                   f"or name a run folder or checkpoint")


def resolve_checkpoint(target: str | Path | None, root: str | Path = "runs") -> Path:
    """A run folder -> its best.pt; a file -> itself; None -> the newest run's best.pt."""
    if target is None:
        return newest_run_checkpoint(root)
    path = Path(target)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise RetinoError(f"{path} holds no best.pt or last.pt: not a training run folder")
    if not path.exists():
        raise RetinoError(f"no such run or checkpoint: {path}")
    return path


def load_trained(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild the model a checkpoint was trained as and load its weights, in eval mode.

    Returns:
        ``(model, state)``; ``state`` is the checkpoint dict (config, preprocess, metrics...).

    Raises:
        RetinoError: unreadable checkpoint, no preprocessing settings, or weights that do not fit
            the stored architecture.
    """
    from retinocli.models import build_model

    state = load_checkpoint(path, map_location=map_location)
    if not isinstance(state.get("preprocess"), dict):
        # export and evaluate serve the model the pixels these settings describe
        raise RetinoError(f"{path}: not a trained retino checkpoint (no preprocessing settings inside)")
    cfg = state["config"]
    arch = cfg.get("arch") if isinstance(cfg, dict) else None
    names = state.get("class_names") or []
    try:
        model = build_model(str(arch), num_classes=len(names) or 5, small_stem=bool(state.get("small_stem")),
                            head=cfg.get("head", "classification"), pool=cfg.get("pool", "avg"))
        model.load_state_dict(state["model"])
    except RetinoError:
        raise
    except Exception as exc:  # a state dict of another arch or head size
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RetinoError(f"{path}: weights do not fit {arch} with {len(names) or 5} grades ({first[:160]})") from None
    return model.eval(), state
