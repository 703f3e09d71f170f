"""The course study in one call: train a grid of architectures with and without ImageNet weights on
shared settings, evaluate each on the test split, and write one report.

Everything lands in one parent folder (``runs/compare``): ``compare.json`` (the grid), one run
folder per cell (``resnet18-imagenet``, ``resnet18-scratch``, ...) and ``report/``. Running the
same command again after an interruption skips finished cells, resumes the one that was cut off
from its ``last.pt``, and evaluates what is not evaluated yet.

With ``seeds`` (``retino compare --seeds 0,1,2``) every cell trains once per seed, as
``resnet18-imagenet-s0``, ``resnet18-imagenet-s1``, ... (the names ``retino train --seeds``
gives); the report then shows each cell's mean ± sd and the paired comparisons of the cells
(:mod:`retinocli.reporting.study`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from retinocli.config import TrainConfig
from retinocli.errors import RetinoError
from retinocli.events import EventsLike, emitter
from retinocli.rundir import RunDir

PRETRAINED_CHOICES = ("yes", "no", "both")


@dataclass
class Cell:
    name: str
    arch: str
    pretrained: bool
    seed: int | None = None  # None: the shared --seed

    @property
    def label(self) -> str:
        seed = f", seed {self.seed}" if self.seed is not None else ""
        return f"{self.arch} {'ImageNet' if self.pretrained else 'scratch'}{seed}"


@dataclass
class CompareResult:
    parent: Path
    runs: list[Path]
    report_dir: Path
    markdown: Path
    evaluated_split: str
    done: list[str] = field(default_factory=list)  # what happened to each cell
    notes: list[str] = field(default_factory=list)
    # per run name, the settings not the same in every run (runs.settings_that_differ)
    differences: dict[str, dict[str, Any]] = field(default_factory=dict)
    study: Any = None  # with several seeds: the report's retinocli.reporting.study.Study

    def to_dict(self) -> dict[str, Any]:
        return {"parent": str(self.parent), "runs": [str(r) for r in self.runs], "report_dir": str(self.report_dir),
                "markdown": str(self.markdown), "split": self.evaluated_split, "done": self.done,
                "notes": self.notes, "differences": self.differences,
                "study": self.study.to_dict() if self.study is not None else None}


def grid(archs: list[str], pretrained: str, seeds: list[int] | None = None) -> list[Cell]:
    """Cells in the order they train: per architecture, ImageNet first, then scratch; each
    once per seed when ``seeds`` are given (``resnet18-imagenet-s0``, ...)."""
    from retinocli.engine.seeds import seed_name
    from retinocli.models.registry import check_arch

    if pretrained not in PRETRAINED_CHOICES:
        raise RetinoError(f"--pretrained must be one of {', '.join(PRETRAINED_CHOICES)}, got {pretrained!r}")
    if not archs:
        raise RetinoError("give at least one --arch")
    if len(set(archs)) != len(archs):
        raise RetinoError(f"--arch repeated: {', '.join(archs)}")
    flags = {"yes": [True], "no": [False], "both": [True, False]}[pretrained]
    cells = []
    for arch in archs:
        check_arch(arch)
        for p in flags:
            name = f"{arch}-{'imagenet' if p else 'scratch'}"
            cells.extend([Cell(seed_name(name, s), arch, p, s) for s in seeds] if seeds else [Cell(name, arch, p)])
    return cells


def _plan(base: TrainConfig, cells: list[Cell]) -> dict[str, Any]:
    shared = {k: v for k, v in base.to_dict().items() if k not in ("project", "name", "arch", "pretrained", "weights")}
    if any(c.seed is not None for c in cells):
        shared["seed"] = sorted({c.seed for c in cells})
    return {"cells": [c.name for c in cells], "settings": shared}


def _cell_config(base: TrainConfig, cell: Cell, parent: Path) -> TrainConfig:
    return replace(base, arch=cell.arch, pretrained=cell.pretrained, weights="DEFAULT" if cell.pretrained else None,
                   project=str(parent), name=cell.name, seed=base.seed if cell.seed is None else cell.seed)


def _trained_epochs(run: Path) -> int:
    from retinocli.engine.checkpoints import load_checkpoint

    last = RunDir(run).last
    return int(load_checkpoint(last)["epoch"]) if last.is_file() else 0


def compare(base: TrainConfig, archs: list[str], *, pretrained: str = "both", split: str = "test",
            tta: bool = False, force: bool = False, events: EventsLike = None, on_epoch_end=None,
            seeds: list[int] | None = None) -> CompareResult:
    """Train, evaluate and report every cell of the grid (once per seed of ``seeds``); see the module doc.

    ``on_epoch_end(cell_name, epoch, row)`` is called after every epoch of every cell; ``events``
    hears each cell's training and the comparison's own messages (see :mod:`retinocli.events`).
    """
    from retinocli.reporting.evaluate import evaluate
    from retinocli.models.registry import load_imagenet_state
    from retinocli.reporting.report import write_report
    from retinocli.engine.trainer import train

    events = emitter(events)
    say = events.message
    cells = grid(archs, pretrained, seeds)
    parent = Path(base.project) / base.name
    plan = _plan(base, cells)
    plan_file = RunDir(parent).compare_plan
    if plan_file.is_file() and not force:
        old = json.loads(plan_file.read_text())
        if old != json.loads(json.dumps(plan)):
            raise RetinoError(f"{parent} holds a different comparison; pick another --name, "
                              f"or pass --force to start it again")
        say(f"Continuing the comparison in {parent}")
    elif parent.exists() and any(parent.iterdir()) and not plan_file.is_file() and not force:
        raise RetinoError(f"{parent} exists and is not a comparison; pick another --name or pass --force")
    # Fail before hours of training, not in the middle: the split to evaluate on must exist and
    # every pretrained cell needs its weights.
    if split != "val":  # training carves a validation split when the dataset has none
        from retinocli.data.layouts import load_dataset

        records = load_dataset(base.data, layout=base.layout, images=base.images).records
        if not (records["split"].eq(split) & records["grade"].notna()).any():
            raise RetinoError(f"{base.data} has no labelled {split} split to evaluate on; "
                              f"pass --split val to evaluate on the validation split")
    for arch in sorted({c.arch for c in cells if c.pretrained}):
        load_imagenet_state(arch, "DEFAULT")
    parent.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps(plan, indent=2))

    done, runs, notes = [], [], []
    for i, cell in enumerate(cells, 1):
        run = parent / cell.name
        cfg = _cell_config(base, cell, parent)
        epochs = 0 if force else _trained_epochs(run)
        say(f"({i}/{len(cells)}) {cell.label}")
        if epochs >= cfg.epochs:
            done.append(f"{cell.name}: trained earlier ({epochs} epochs)")
        else:
            hook = (lambda e, row, name=cell.name: on_epoch_end(name, e, row)) if on_epoch_end else None
            result = train(None if epochs else cfg, resume=run if epochs else None, force=True, events=events,
                           on_epoch_end=hook)
            if result.stop == "interrupted":
                raise KeyboardInterrupt
            done.append(f"{cell.name}: {'resumed at epoch ' + str(epochs) if epochs else 'trained'}, {result.stopped}")
        runs.append(run)
        metrics_file = RunDir(run).metrics()
        best = RunDir(run).best
        if not best.is_file():
            notes.append(f"{cell.name} has no {best.name} (no finished epoch): not evaluated")
            continue
        if force or not metrics_file.is_file() or metrics_file.stat().st_mtime < best.stat().st_mtime:
            evaluated = evaluate(run, split=split, tta=tta, force=True)
            m = evaluated.report["metrics"]
            say(f"  {split}: accuracy {m['accuracy']:.1%} (majority {m['majority_accuracy']:.1%}), QWK {m['qwk']:.3f}")
            notes.extend(f"{cell.name}: {n}" for n in evaluated.notes)
    report = write_report(runs, parent / "report", force=True, title=f"Comparison {parent.name}")
    return CompareResult(parent=parent, runs=runs, report_dir=report.out, markdown=report.markdown,
                         evaluated_split=split, done=done, notes=notes, differences=report.differences,
                         study=report.study)
