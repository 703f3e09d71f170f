"""The run folder: the one place that knows the names of the files a run writes.

A training run lives in ``<project>/<name>/``::

    config.json      the settings it trained with (TrainConfig + what was chosen for them)
    split.csv        every image with its split (train / val / test): SPLIT_COLUMNS
    history.csv      one row per finished epoch: HISTORY_FIELDS
    best.pt          the model to use (engine.checkpoints.MODEL_KEYS)
    last.pt          the training state to resume (MODEL_KEYS + RESUME_KEYS)
    metrics.json     what ``retino evaluate`` measured
    predictions.csv  evaluate's row per image (reporting.schema)
    patients.csv     evaluate's row per patient (the worse eye decides), where names carry patients
    model.onnx       ``retino export``'s model (model-fp16.onnx, model-int8.onnx)
    compare.json     a comparison's plan (in the comparison's parent folder)

Every other module asks a :class:`RunDir` for a path or a file's contents. No torch here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from retinocli.errors import RetinoError, atomic_write, first_line

if TYPE_CHECKING:
    import pandas as pd

#: history.csv's columns, in order: the history schema, written by training and read by reports.
HISTORY_FIELDS = ("epoch", "seconds", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                  "val_qwk", "val_balanced_accuracy", "images_per_second")
#: split.csv's columns, in order.
SPLIT_COLUMNS = ("image", "path", "grade", "split", "patient", "eye")


def improves(metric: str, value: float, kept: float | None) -> bool:
    """Whether an epoch scoring ``value`` replaces the kept epoch (scoring ``kept``; None when
    none is kept yet) as best.pt: the one selection rule, for training and for every reader.

    A higher ``val_<metric>`` wins, a lower one for ``loss``; ties keep the earlier epoch; a
    non-finite value never replaces a finite one; with ``last`` every epoch replaces the one before.
    """
    import math

    if kept is None or metric == "last":
        return True
    if not math.isfinite(value):
        return False
    if not math.isfinite(kept):
        return True
    return value < kept if metric == "loss" else value > kept


def best_index(history: pd.DataFrame, metric: str) -> int | None:
    """The row of history.csv whose epoch best.pt holds, replayed with :func:`improves`. None
    when there is no row, or when no value of ``val_<metric>`` is finite."""
    if history.empty:
        return None
    if metric == "last":
        return len(history) - 1
    index, kept = None, None
    for row, value in enumerate(history[f"val_{metric}"].astype(float)):
        if improves(metric, value, kept):
            index, kept = row, value
    return index if kept == kept else None  # NaN: no epoch had a finite value


def newest(root: str | Path, pattern: str, missing: str) -> Path:
    """The most recently written file matching ``pattern`` anywhere under ``root``.

    Raises:
        RetinoError: no such file under ``root`` (``missing`` is the message).
    """
    root = Path(root)
    found = [p for p in root.rglob(pattern) if p.is_file()] if root.is_dir() else []
    if not found:
        raise RetinoError(missing)
    return max(found, key=lambda p: (p.stat().st_mtime_ns, str(p)))


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; a RetinoError with one line when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise RetinoError(f"{path}: cannot read it ({exc.__class__.__name__})") from None
    except json.JSONDecodeError as exc:
        raise RetinoError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise RetinoError(f"{path}: expected a JSON object")
    return data


def read_csv(path: Path, dtype: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """A CSV file as a DataFrame; a RetinoError with one line when it cannot be read."""
    import pandas as pd

    try:
        return pd.read_csv(path, dtype=dict(dtype) if dtype else None)
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as exc:
        raise RetinoError(f"{path}: cannot read it as CSV ({first_line(exc)})") from None


def newest_model(root: str | Path = "runs") -> Path:
    """The ONNX model written last anywhere under ``root`` (a run's export, or any other)."""
    return newest(root, RunDir.MODEL_GLOB, f"no exported model under {root}/; run `retino export` first")


@dataclass(frozen=True)
class RunDir:
    """One run folder and the files in it."""

    path: Path

    CONFIG: ClassVar[str] = "config.json"
    SPLIT: ClassVar[str] = "split.csv"
    HISTORY: ClassVar[str] = "history.csv"
    BEST: ClassVar[str] = "best.pt"
    LAST: ClassVar[str] = "last.pt"
    METRICS: ClassVar[str] = "metrics.json"
    PREDICTIONS: ClassVar[str] = "predictions.csv"
    PATIENTS: ClassVar[str] = "patients.csv"
    COMPARE_PLAN: ClassVar[str] = "compare.json"
    MODEL_GLOB: ClassVar[str] = "*.onnx"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # ------------------------------------------------------------------ finding runs

    @classmethod
    def of(cls, path: str | Path) -> RunDir:
        """The run a folder is, or the run holding a file (such as its best.pt)."""
        path = Path(path)
        return cls(path.parent if path.is_file() else path)

    @classmethod
    def create(cls, project: str | Path, name: str, *, force: bool = False) -> RunDir:
        """``runs/train``, then ``runs/train2``, ``runs/train3``: a run never overwrites another.

        With ``force`` the named folder is reused as it is.
        """
        base = Path(project) / name
        if force or not base.exists():
            base.mkdir(parents=True, exist_ok=True)
            return cls(base)
        k = 2
        while (candidate := Path(project) / f"{name}{k}").exists():
            k += 1
        candidate.mkdir(parents=True)
        return cls(candidate)

    @classmethod
    def newest_trained(cls, root: str | Path = "runs") -> RunDir:
        """The run whose best.pt was written last under ``root``."""
        return cls(newest(root, cls.BEST, f"no trained run under {root}/ (no {cls.BEST}); run `retino train` "
                                          f"first or name a run folder or checkpoint").parent)

    @classmethod
    def newest_with_history(cls, root: str | Path = "runs") -> RunDir:
        """The run whose history.csv was written last under ``root``."""
        return cls(newest(root, cls.HISTORY, f"no training run under {root}/; run `retino train` first "
                                             "or name run folders").parent)

    @classmethod
    def resolve_checkpoint(cls, target: str | Path | None, root: str | Path = "runs") -> Path:
        """A run folder -> its best.pt (else last.pt); a file -> itself; None -> the newest run's best.pt."""
        if target is None:
            return cls.newest_trained(root).best
        path = Path(target)
        if path.is_dir():
            for candidate in (cls(path).best, cls(path).last):
                if candidate.is_file():
                    return candidate
            raise RetinoError(f"{path} holds no {cls.BEST} or {cls.LAST}: not a training run folder")
        if not path.exists():
            raise RetinoError(f"no such run or checkpoint: {path}")
        return path

    @classmethod
    def resume_checkpoint(cls, target: str | Path) -> Path:
        """``--resume``: a run folder -> its last.pt; a file -> itself."""
        path = Path(target)
        return cls(path).last if path.is_dir() else path

    @classmethod
    def is_last(cls, checkpoint: Path) -> bool:
        return Path(checkpoint).name == cls.LAST

    # ------------------------------------------------------------------ paths

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def split(self) -> Path:
        return self.path / self.SPLIT

    @property
    def history(self) -> Path:
        return self.path / self.HISTORY

    @property
    def best(self) -> Path:
        return self.path / self.BEST

    @property
    def last(self) -> Path:
        return self.path / self.LAST

    @property
    def compare_plan(self) -> Path:
        return self.path / self.COMPARE_PLAN

    def metrics(self, out: str | Path | None = None) -> Path:
        """metrics.json, in the run folder or in an evaluation's ``out`` folder."""
        return Path(out or self.path) / self.METRICS

    def predictions(self, out: str | Path | None = None) -> Path:
        """evaluate's predictions.csv, in the run folder or in ``out``."""
        return Path(out or self.path) / self.PREDICTIONS

    def patients(self, out: str | Path | None = None) -> Path:
        """evaluate's patients.csv, in the run folder or in ``out``."""
        return Path(out or self.path) / self.PATIENTS

    def model(self, precision: str = "fp32") -> Path:
        """Where ``retino export`` writes a model of this precision."""
        return self.path / ("model.onnx" if precision == "fp32" else f"model-{precision}.onnx")

    def missing(self) -> str | None:
        """The first file a finished-epoch run must have that this folder lacks, or None."""
        for needed in (self.config, self.history):
            if not needed.is_file():
                return needed.name
        return None

    # ------------------------------------------------------------------ contents

    def write_config(self, config: Mapping[str, Any]) -> None:
        atomic_write(self.config, json.dumps(dict(config), indent=2))

    def read_config(self) -> dict:
        return read_json(self.config)

    def write_split(self, records: pd.DataFrame) -> None:
        atomic_write(self.split, records[list(SPLIT_COLUMNS)].to_csv(index=False))

    def read_split(self) -> pd.DataFrame | None:
        """split.csv (image and path as text), or None when the run has none."""
        return read_csv(self.split, {"image": str, "path": str}) if self.split.is_file() else None

    def write_history(self, rows: Iterable[Mapping[str, Any]]) -> None:
        import csv
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\r\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in HISTORY_FIELDS})
        atomic_write(self.history, buf.getvalue())

    def read_history(self) -> pd.DataFrame:
        """history.csv with every HISTORY_FIELDS column numeric (NaN where missing or undefined)."""
        import pandas as pd

        history = read_csv(self.history)
        # Older runs may lack a column; a missing one reads as NaN, never as an error.
        history = history.reindex(columns=[*HISTORY_FIELDS, *(c for c in history.columns if c not in HISTORY_FIELDS)])
        for column in HISTORY_FIELDS:
            history[column] = pd.to_numeric(history[column], errors="coerce")
        if history["epoch"].isna().any():
            history["epoch"] = range(1, len(history) + 1)
        if not history.empty:
            history["epoch"] = history["epoch"].astype(int)
        return history

    def read_metrics(self) -> dict | None:
        return read_json(self.metrics()) if self.metrics().is_file() else None

    def remove_temporaries(self) -> None:
        """Half-written temporaries of a killed checkpoint or history write."""
        for stale in self.path.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
