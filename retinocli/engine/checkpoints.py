"""Checkpoints as plain dicts: written atomically, loaded with ``weights_only=True``.

A run keeps two, with different jobs:

    best.pt  the model to use (``MODEL_KEYS``): ``model`` (state dict), ``epoch`` (completed
             epochs), ``config`` (TrainConfig as a dict), ``class_names``, ``preprocess``
             (Preprocess as a dict), ``small_stem``, ``metrics`` (validation metrics of that
             epoch), ``versions``, ``schema`` (SCHEMA_VERSION; files without it are version 1),
             ``grader`` (retinocli.models.grading.Grader as a dict: head, cut points; from
             version 4 also the temperature, the frozen referral point and the fellow-eye
             fusion, all fitted on validation; absent in older runs: softmax, T = 1,
             threshold 0.5 not frozen). With --ema, ``model`` is the averaged weights. What evaluate
             and export read; a third of last.pt's bytes
             with AdamW, which keeps two moments per weight.
    last.pt  the training state to resume (``MODEL_KEYS`` + ``RESUME_KEYS``): also
             ``optimizer``, ``scheduler``, ``scaler``, ``rng`` (generator states for an exact
             resume), ``best_metrics``, ``best_epoch``, ``history``; with --ema, ``ema`` (the
             AveragedModel's state dict), while ``model`` there is the raw weights.

Everything in them is a tensor or plain Python data, so the safe unpickler loads them and no
code in a file ever runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from retinocli.errors import RetinoError, atomic_write, first_line
from retinocli.rundir import RunDir

#: The version of the layout below; a change to the keys or their meaning bumps it.
SCHEMA_VERSION = 4  # 3: grader, ema; 4: grader["temperature", "referral", "fusion"]
MODEL_KEYS = ("model", "epoch", "config", "class_names", "preprocess", "small_stem", "metrics", "versions",
              "schema", "grader")
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "rng", "best_metrics", "best_epoch", "history", "ema")
#: What a resume cannot do without (the best-so-far and history may be absent).
RESUME_NEEDS = ("model", "optimizer", "scheduler", "scaler", "epoch", "config", "rng")


def model_state(*, model: dict, epoch: int, config: dict, class_names: list[str], preprocess: dict,
                small_stem: bool, metrics: dict, versions: dict, grader: dict) -> dict[str, Any]:
    """best.pt's dict, keys in MODEL_KEYS order."""
    return {"model": model, "epoch": epoch, "config": config, "class_names": class_names,
            "preprocess": preprocess, "small_stem": small_stem, "metrics": metrics, "versions": versions,
            "schema": SCHEMA_VERSION, "grader": grader}


def training_state(model_part: dict[str, Any], *, optimizer: dict, scheduler: dict, scaler: dict, rng: dict,
                   best_metrics: dict | None, best_epoch: int | None, history: list[dict],
                   ema: dict | None) -> dict[str, Any]:
    """last.pt's dict: :func:`model_state` plus what resuming reads, keys in RESUME_KEYS order.

    ``ema`` is the AveragedModel's state dict with --ema, else None.
    """
    return {**model_part, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "rng": rng,
            "best_metrics": best_metrics, "best_epoch": best_epoch, "history": history, "ema": ema}


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> Path:
    """Write ``obj`` to ``path`` so that a crash at any moment leaves the old file or the new one.

    The bytes go to a temporary file in the same folder, are flushed to disk, and only then
    replace ``path`` with one atomic rename. The file gets the permissions of any other
    output (0666 less the umask), not mkstemp's 0600.
    """
    return atomic_write(path, write=lambda fh: torch.save(obj, fh), binary=True)


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
        raise RetinoError(f"{path}: refused or unreadable checkpoint ({first_line(exc, 200)})") from None
    if not isinstance(obj, dict) or "model" not in obj or "config" not in obj:
        raise RetinoError(f"{path}: not a retino checkpoint (no model and config inside)")
    return obj


def load_resume_state(path: Path) -> dict:
    """The checkpoint ``--resume`` continues from, checked for what resuming reads.

    Raises:
        RetinoError: unreadable, or not a last.pt that ``retino train`` wrote (best.pt holds
            the model only).
    """
    state = load_checkpoint(path)
    lacks = [k for k in RESUME_NEEDS if k not in state]
    if lacks:
        where = (f"; best.pt keeps only the model (for evaluate and export): resume from "
                 f"{RunDir.of(path).last}" if not RunDir.is_last(path)
                 else " (retino train writes them into last.pt)")
        raise RetinoError(f"{path}: cannot resume from it, it lacks {', '.join(lacks)}{where}")
    epoch = state["epoch"]
    if not isinstance(state["config"], dict) or isinstance(epoch, bool) or not isinstance(epoch, int):
        raise RetinoError(f"{path}: cannot resume from it, its config or epoch is not what retino train writes")
    return state


def served_weights(state: dict[str, Any]) -> dict[str, Any]:
    """The weights a checkpoint serves: with --ema, last.pt's averaged ones, else ``model``.

    last.pt keeps the raw weights under ``model`` for resuming, but its grader (cut points,
    temperature, referral point) and metrics were fitted on the averaged model's outputs,
    as best.pt's were: serving the raw weights would pair them with a grader fitted elsewhere.
    """
    ema = state.get("ema")
    if not isinstance(ema, dict):
        return state["model"]
    return {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}


def load_trained(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild the model a checkpoint was trained as and load its served weights, in eval mode.

    Returns:
        ``(model, state)``; ``state`` is the checkpoint dict (config, preprocess, metrics...).

    Raises:
        RetinoError: unreadable checkpoint, no preprocessing settings, or weights that do not fit
            the stored architecture.
    """
    from retinocli.models.registry import random_model

    state = load_checkpoint(path, map_location=map_location)
    if not isinstance(state.get("preprocess"), dict):
        # export and evaluate serve the model the pixels these settings describe
        raise RetinoError(f"{path}: not a trained retino checkpoint (no preprocessing settings inside)")
    cfg = state["config"]
    arch = cfg.get("arch") if isinstance(cfg, dict) else None
    names = state.get("class_names") or []
    try:
        model = random_model(str(arch), num_classes=len(names) or 5, small_stem=bool(state.get("small_stem")),
                            head=cfg.get("head", "classification"), pool=cfg.get("pool", "avg"))
        model.load_state_dict(served_weights(state))
    except RetinoError:
        raise
    except Exception as exc:  # a state dict of another arch or head size
        raise RetinoError(f"{path}: weights do not fit {arch} with {len(names) or 5} grades "
                          f"({first_line(exc, 160)})") from None
    return model.eval(), state
