"""``retino train --seeds 0,1,2``: the same recipe trained once per seed (issue #15).

Each seed is a run of its own beside the others, ``<project>/<name>-s<seed>`` (``runs/train-s0``,
``runs/train-s1``, ...): every other command (evaluate, export, report) takes it as any run,
and ``retino report runs/train-s*`` finds the seeds' group by their configs. Sibling folders
rather than one folder per seed inside the run keep a run folder one model, as everywhere else.

Running the same command again continues: a seed whose folder holds a finished run with the
same settings is skipped, one cut off is resumed from its ``last.pt``, one whose folder was made
but never finished an epoch starts again. A folder holding a run with other settings (or
something that is not a run) is refused before anything trains, unless ``force`` (then every
seed trains again from scratch in its folder).

The loop imports the trainer (and so torch) only when it trains.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from retinocli.config import NOT_RECIPE, TrainConfig
from retinocli.errors import RetinoError
from retinocli.events import EventsLike, emitter
from retinocli.rundir import RunDir, best_index

#: Settings whose automatic value (None, or "auto") config.json records as what it resolved to.
RESOLVED = {"amp": None, "channels_last": None, "augment_on": "auto"}
#: What a seed's folder holds, as :func:`seed_state` sees it.
NEW, EMPTY, PARTIAL, FINISHED = "new", "empty", "partial", "finished"


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``: distinct integers >= 0, at least one.

    Raises:
        RetinoError: anything else, naming the part that is wrong.
    """
    parts = [p.strip() for p in str(text).split(",")]
    seeds = []
    for part in parts:
        if not re.fullmatch(r"\d+", part):
            raise RetinoError(f"--seeds takes seeds (integers >= 0) separated by commas, e.g. 0,1,2; "
                              f"got {text!r}")
        seeds.append(int(part))
    if len(set(seeds)) != len(seeds):
        raise RetinoError(f"--seeds repeats a seed: {text}")
    return seeds


def seed_name(name: str, seed: int) -> str:
    """The run folder name of one seed: ``train`` and 3 -> ``train-s3``."""
    return f"{name}-s{seed}"


def seed_config(cfg: TrainConfig, seed: int) -> TrainConfig:
    """``cfg`` for one seed: its seed and its folder name."""
    return replace(cfg, seed=seed, name=seed_name(cfg.name, seed))


def _differences(saved: dict[str, Any], wanted: TrainConfig) -> list[str]:
    """``epochs 2 there, 1 here`` for each recipe setting a saved config does not share."""
    try:
        there = TrainConfig.from_dict(saved).to_dict()
    except (RetinoError, TypeError) as exc:
        return [f"an unreadable config ({exc})"]
    here = wanted.to_dict()
    return [f"{k} {there.get(k)!r} there, {v!r} here" for k, v in here.items()
            if k not in NOT_RECIPE and there.get(k) != v and not (k in RESOLVED and v == RESOLVED[k])]


def _stopped_early(history, cfg: TrainConfig) -> bool:
    """Whether ``--patience`` ended the run: no better ``val_<select_metric>`` in its last epochs."""
    best = best_index(history, cfg.select_metric) if cfg.patience and not history.empty else None
    return best is not None and len(history) - (best + 1) >= cfg.patience


def seed_state(cfg: TrainConfig) -> str:
    """What ``<project>/<name>`` holds for this seed's config: :data:`NEW` (nothing),
    :data:`EMPTY` (a run that never finished an epoch), :data:`PARTIAL` (cut off: resume it)
    or :data:`FINISHED` (all epochs, or stopped by ``--patience``).

    Raises:
        RetinoError: the folder holds something that is not a run, or a run with other settings.
    """
    run = RunDir(Path(cfg.project) / cfg.name)
    if not run.path.exists():
        return NEW
    if not run.config.is_file():
        if run.path.is_dir() and not any(run.path.iterdir()):
            return NEW
        raise RetinoError(f"{run.path} exists and is not a training run; pick another --name, or pass "
                          f"--force to train the seeds again")
    differ = _differences(run.read_config(), cfg)
    if differ:
        raise RetinoError(f"{run.path} holds a run trained with other settings ({'; '.join(differ[:3])}); "
                          f"pick another --name, or pass --force to train the seeds again")
    history = run.read_history() if run.history.is_file() else None
    if history is None or history.empty or not run.last.is_file():
        return EMPTY
    if len(history) >= cfg.epochs or _stopped_early(history, cfg):
        return FINISHED
    return PARTIAL


@dataclass
class SeedRun:
    """One seed of a study: its run folder and how it stands after :func:`train_seeds`."""

    seed: int
    run_dir: Path
    done: str  # "trained", "resumed at epoch N", "trained earlier", or "interrupted"
    stopped: str = ""
    epochs: int = 0
    best_epoch: int | None = None
    best: dict[str, float] = field(default_factory=dict)  # the best epoch's val_accuracy, val_qwk, ...

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "run_dir": str(self.run_dir), "done": self.done, "stopped": self.stopped,
                "epochs": self.epochs, "best_epoch": self.best_epoch, "best": self.best}


@dataclass
class SeedsResult:
    """What :func:`train_seeds` did. ``summary``: mean ± sd of the best epochs' validation
    metrics over the finished seeds (:func:`retinocli.reporting.clinical.summarise_seeds`)."""

    runs: list[SeedRun]
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)
    interrupted: str | None = None  # the trainer's message when Ctrl-C stopped a seed

    def to_dict(self) -> dict[str, Any]:
        from retinocli.reporting.study import jsonable

        return jsonable({"runs": [r.to_dict() for r in self.runs], "summary": self.summary,
                         "interrupted": self.interrupted})


#: history.csv columns summarised over seeds, at each run's best epoch.
VAL_COLUMNS = ("val_accuracy", "val_qwk", "val_balanced_accuracy", "val_loss")


def _best_row(run_dir: Path, cfg: TrainConfig) -> tuple[int, int | None, dict[str, float]]:
    """(epochs, best epoch, that epoch's validation metrics) from history.csv, as best.pt chose."""
    history = RunDir(run_dir).read_history()
    if history.empty:
        return 0, None, {}
    row = history.iloc[best_index(history, cfg.select_metric) or 0]
    best = {k: float(row[k]) for k in VAL_COLUMNS if k in row and math.isfinite(float(row[k]))}
    return len(history), int(row["epoch"]), best


def train_seeds(cfg: TrainConfig, seeds: Sequence[int], *, force: bool = False, events: EventsLike = None,
                on_epoch_end: Callable[[int, int, dict], None] | None = None) -> SeedsResult:
    """Train ``cfg`` once per seed into ``<project>/<name>-s<seed>``; see the module doc.

    Args:
        cfg: the recipe; its ``seed`` and ``name`` are replaced per seed.
        seeds: the seeds, trained in this order.
        force: train every seed again from scratch, in its existing folder.
        events: a listener for each seed's training and these messages (see :mod:`retinocli.events`).
        on_epoch_end: called with (seed, epoch, history row) after every epoch.

    Raises:
        RetinoError: no seeds, or a seed's folder that holds other settings (checked for every
            seed before any trains).
    """
    if not seeds:
        raise RetinoError("give at least one seed")
    events = emitter(events)
    say = events.message
    configs = [seed_config(cfg, s) for s in seeds]
    states = [NEW if force else seed_state(c) for c in configs]  # every refusal before hours of training
    runs: list[SeedRun] = []
    for i, (seed, c, state) in enumerate(zip(seeds, configs, states), 1):
        run_dir = Path(c.project) / c.name
        say(f"seed {seed} ({i}/{len(seeds)}): {run_dir}")
        if state == FINISHED:
            done, stopped = "trained earlier", ""
        else:
            from retinocli.engine.trainer import train

            hook = (lambda e, row, s=seed: on_epoch_end(s, e, row)) if on_epoch_end else None
            resume = run_dir if state == PARTIAL else None
            done = f"resumed after epoch {len(RunDir(run_dir).read_history())}" if resume else "trained"
            result = train(None if resume else c, resume=resume, force=True, events=events, on_epoch_end=hook)
            stopped = result.stopped
            if result.interrupted:
                runs.append(SeedRun(seed, run_dir, "interrupted", stopped, result.epochs_done))
                return SeedsResult(runs, _summary(runs), interrupted=stopped)
        epochs, best_epoch, best = _best_row(run_dir, c)
        runs.append(SeedRun(seed, run_dir, done, stopped, epochs, best_epoch, best))
    return SeedsResult(runs, _summary(runs))


def _summary(runs: list[SeedRun]) -> dict[str, dict[str, Any]]:
    """Mean ± sd of the finished seeds' best validation metrics."""
    from retinocli.reporting.clinical import summarise_seeds

    finished = [r.best for r in runs if r.best]
    return summarise_seeds(finished) if finished else {}
