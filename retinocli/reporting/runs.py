"""A run folder as ``retino report`` and ``retino compare`` read it, and how runs are labelled.

Reads only what other commands left in a run folder: ``config.json``, ``history.csv`` and
``split.csv`` from ``retino train``, and ``metrics.json`` (plus ``predictions.csv``, checked
against :mod:`retinocli.deploy.schema`) from ``retino evaluate`` once a run has been evaluated.
numpy and pandas only, no torch.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retinocli import NUM_GRADES
from retinocli.errors import RetinoError
from retinocli.rundir import RunDir, best_index

if TYPE_CHECKING:
    import pandas as pd

METRIC_NAMES = {"qwk": "val QWK", "accuracy": "val accuracy", "loss": "val loss", "last": "last epoch"}

@dataclass
class RunSummary:
    """Everything a report needs from one run folder.

    Attributes:
        dir: the run folder.
        config: its config.json.
        history: history.csv, one row per finished epoch (NaN where a value was undefined).
        split: split.csv (image, path, grade, split, ...), or None when absent.
        metrics: metrics.json from ``retino evaluate``, or None when not evaluated.
        label: ``arch · weights · mode``, the name figures use.
        name: the folder name, made unique among the runs of one report; file names use it.
    """

    dir: Path
    config: dict
    history: pd.DataFrame
    split: pd.DataFrame | None
    metrics: dict | None
    label: str
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or self.dir.name

    @property
    def select_metric(self) -> str:
        """The validation metric that chose best.pt (config.json ``select_metric``)."""
        metric = self.config.get("select_metric") or "qwk"
        return metric if metric in METRIC_NAMES else "qwk"

    @property
    def best_epoch(self) -> int:
        """The epoch best.pt holds, chosen as the training loop does (:func:`retinocli.rundir.best_index`),
        or the first epoch when no value is finite."""
        return int(self.history["epoch"].iloc[best_index(self.history, self.select_metric) or 0])

    def best_row(self) -> dict:
        return self.history[self.history["epoch"] == self.best_epoch].iloc[0].to_dict()

    def grades(self, split: str) -> list[int]:
        """Labelled grades of one split in split.csv (empty without split.csv)."""
        if self.split is None:
            return []
        part = self.split[self.split["split"] == split]["grade"].dropna()
        return [int(g) for g in part]

    def val_baseline(self) -> tuple[int, float] | None:
        """(grade, accuracy) of always answering the commonest validation grade."""
        from retinocli.reporting.metrics import majority_baseline

        grades = self.grades("val")
        return majority_baseline(grades) if grades else None

    @property
    def evaluated(self) -> bool:
        return self.metrics is not None

    def referable_roc(self) -> tuple[list[float], list[float]] | None:
        """(fpr, tpr) of referable DR: metrics.json's curve, else one from predictions.csv."""
        if self.metrics is None:
            return None
        roc = self.metrics.get("referable_roc")
        if isinstance(roc, dict) and roc.get("fpr") and roc.get("tpr"):
            return list(roc["fpr"]), list(roc["tpr"])
        names = self.metrics.get("grade_names")
        return _roc_from_predictions(RunDir(self.dir).predictions(), len(names) if names else NUM_GRADES)


def _roc_from_predictions(path: Path, num_grades: int) -> tuple[list[float], list[float]] | None:
    """The ROC of the readable rows of evaluate's predictions.csv (None without the file).

    Raises:
        RetinoError: the file is not evaluate's predictions for ``num_grades`` grades (predict's
            output, an older retino's columns, another model's grades).
    """
    import numpy as np

    from retinocli.deploy import schema
    from retinocli.reporting.metrics import REFERABLE_GRADE, roc_curve

    if not path.is_file():
        return None
    rows = schema.read_rows(path, schema.columns(num_grades, labelled=True),
                            what="`retino evaluate`'s predictions", remedy="run retino evaluate again with --force",
                            also=[schema.older_columns(num_grades, labelled=True)])
    ok = [r for r in rows if r[schema.STATUS] == schema.OK]
    try:
        grade = np.array([float(r[schema.TRUE_GRADE]) for r in ok])
        prob = np.array([float(r[schema.REFERABLE_PROB]) for r in ok])
    except ValueError as exc:
        raise RetinoError(f"{path}: a row with status ok holds a value that is not a number ({exc})") from None
    keep = np.isfinite(grade) & np.isfinite(prob)
    if not keep.any():
        return None
    fpr, tpr, _ = roc_curve((grade[keep] >= REFERABLE_GRADE).astype(int), prob[keep])
    return fpr.tolist(), tpr.tolist()


def weights_label(config: dict) -> str:
    """``scratch``, ``ImageNet`` (DEFAULT or an IMAGENET1K_* tag), or the weights file's name."""
    weights = config.get("weights")
    if not weights:
        return "ImageNet" if config.get("pretrained") else "scratch"
    weights = str(weights)
    if weights.upper() == "DEFAULT" or re.fullmatch(r"(\w+_Weights\.)?IMAGENET\w*", weights, re.IGNORECASE):
        return "ImageNet"
    return Path(weights).name


def run_label(config: dict) -> str:
    """``resnet18 · ImageNet · finetune``: what a figure legend calls a run."""
    return f"{config.get('arch', '?')} · {weights_label(config)} · {config.get('mode', '?')}"


#: config.json keys that name a run or record its machine, not how it trained (``pretrained``
#: is said by ``weights``; ``parameters`` follows from ``arch``; ``command`` restates the settings
#: and ``recipe`` names the file they came from).
NOT_SETTINGS = ("name", "project", "versions", "dataset", "parameters", "pretrained", "command", "recipe")

def _settings(config: dict) -> dict[str, Any]:
    out = {k: v for k, v in config.items() if k not in NOT_SETTINGS}
    label = weights_label(config)
    tag = str(config.get("weights") or "")
    # two ImageNet tags (IMAGENET1K_V1 against DEFAULT) are different weights: keep the tag
    out["weights"] = f"{label} ({tag})" if label == "ImageNet" and tag and tag.upper() != "DEFAULT" else label
    return out


def settings_that_differ(configs: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Per run name, the config.json settings whose value is not the same in every run.

    ``weights`` is given as :func:`weights_label` says it (``ImageNet``, ``scratch``, a file
    name); a setting a run did not record is None. One run, or runs trained alike: {}.
    """
    values = {name: _settings(cfg) for name, cfg in configs.items()}
    keys = list(dict.fromkeys(k for v in values.values() for k in v))
    differ = [k for k in keys if len({json.dumps(v.get(k), sort_keys=True, default=str)
                                      for v in values.values()}) > 1]
    return {name: {k: v.get(k) for k in differ} for name, v in values.items()} if differ else {}


def describe_settings(settings: dict[str, Any]) -> str:
    """``arch resnet50, weights scratch, learning_rate 0.001``; None reads ``default``."""
    def word(v: Any) -> str:
        if v is None:
            return "default"
        if isinstance(v, bool):
            return "on" if v else "off"
        if isinstance(v, float):
            return f"{v:g}"
        return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)

    return ", ".join(f"{k} {word(v)}" for k, v in settings.items())


def load_run(path: str | Path) -> RunSummary:
    """Read a run folder (or a file inside it, such as its best.pt).

    Raises:
        RetinoError: the folder is missing, is not a run (no config.json or history.csv),
            has no finished epoch, or holds a file that cannot be read.
    """
    import pandas as pd

    rundir = RunDir.of(path)
    path = rundir.path
    if not path.is_dir():
        raise RetinoError(f"{path}: no such run folder")
    if (lacking := rundir.missing()) is not None:
        raise RetinoError(f"{path} is not a run folder: it has no {lacking}")
    config = rundir.read_config()
    history = rundir.read_history()
    if history.empty:
        raise RetinoError(f"{rundir.history} has no finished epoch")

    split = rundir.read_split()
    if split is not None:
        if not {"grade", "split"} <= set(split.columns):
            raise RetinoError(f"{rundir.split} needs the columns grade and split")
        split["grade"] = pd.to_numeric(split["grade"], errors="coerce")

    metrics = rundir.read_metrics()
    if metrics is not None and not isinstance(metrics.get("metrics"), dict):
        raise RetinoError(f"{rundir.metrics()} has no 'metrics' object; rerun retino evaluate")
    run = RunSummary(dir=path, config=config, history=history, split=split, metrics=metrics,
                     label=run_label(config))
    run.referable_roc()  # a predictions.csv it needs is checked now, before a figure is written
    return run


def load_runs(paths: list[str | Path]) -> list[RunSummary]:
    """:func:`load_run` for each folder (a folder given twice counts once), then make the
    file names and labels unique: a label shared by several runs gets the run's name added.
    """
    runs: list[RunSummary] = []
    seen: set[Path] = set()
    for p in paths:
        run = load_run(p)
        key = run.dir.resolve()
        if key not in seen:
            seen.add(key)
            runs.append(run)
    if not runs:
        raise RetinoError("no run folders given")
    used: set[str] = set()
    for run in runs:
        base = re.sub(r"[^\w.-]+", "-", run.dir.name).strip("-.") or "run"
        name, k = base, 2
        while name.lower() in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name.lower())
        run.name = name
    labels = Counter(run.label for run in runs)
    for run in runs:
        if labels[run.label] > 1:
            run.label = f"{run.label} ({run.name})"
    return runs


def same_split(a, b) -> bool:
    cols = [c for c in ("image", "grade", "split") if c in a.columns and c in b.columns]
    if len(a) != len(b):
        return False
    key = lambda df: df[cols].astype(str).sort_values(cols).reset_index(drop=True)  # noqa: E731
    return key(a).equals(key(b))


