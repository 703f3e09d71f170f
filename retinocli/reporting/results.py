"""RESULTS.md: validation numbers per recipe and head, written from run folders. No torch here.

Each run contributes one row: the metrics ``retino evaluate RUN --split val`` wrote into its
metrics.json, the training time its history.csv summed, the machine its config.json's
``versions`` named, and the ``retino train`` command its config.json recorded. Runs that
differ only in ``--seed`` (and their name: :func:`retinocli.config.recipe_key`, the rule ``retino
report`` groups recipes by) form one group, summarised as mean ± sample sd
(:func:`retinocli.reporting.clinical.summarise_seeds`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retinocli.config import ResultsConfig, config_of, recipe_key
from retinocli.errors import RetinoError, atomic_write
from retinocli.reporting.numbers import MISSING, markdown_table, num

#: (column header, metrics.json path) of each number in the tables, image level
IMAGE_METRICS = (("ACC", ("metrics", "accuracy")), ("AUC", ("metrics", "ovr_macro_auc")),
                 ("QWK", ("metrics", "qwk")), ("ref. AUC", ("metrics", "referable", "auc")))
#: the patient-level numbers (the worse eye decides), where image names carry patients
PATIENT_METRICS = (("patient ACC", ("patients", "metrics", "accuracy")),
                   ("patient QWK", ("patients", "metrics", "qwk")),
                   ("patient ref. AUC", ("patients", "intervals", "metrics", "referable_auc", "estimate")))


@dataclass
class RunResult:
    """One run's row of RESULTS.md."""

    run: str
    dataset: str
    recipe: str | None
    head: str
    seed: int
    command: str
    group: str  # the settings that make its recipe (:func:`retinocli.config.recipe_key`)
    epochs: int
    best_epoch: int | None
    train_seconds: float
    machine: str
    last_qwk: float  # history's validation QWK of the last epoch: no epoch chosen on validation
    metrics: dict[str, float] = field(default_factory=dict)
    code: str | None = None  # the git commit of the retino code that trained it (config.json's versions)


def _dig(d: Any, path: Sequence[str]) -> float:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return math.nan
        d = d[key]
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else math.nan


def machine_of(versions: dict[str, Any]) -> str:
    """'cpu, 2 cores (Linux x86_64)' or the GPU's name: what the times were measured on."""
    if versions.get("gpu"):
        return str(versions["gpu"])
    cpus = versions.get("cpus")
    where = f" ({versions['machine']})" if versions.get("machine") else ""
    return f"{versions.get('device', '?')}, {cpus} cores{where}" if cpus else f"{versions.get('device', '?')}{where}"


#: config.json keys that hold the value training resolved (amp on CUDA...) rather than the one
#: given: left at their defaults when a run from before the recorded command gets one rebuilt
RESOLVED = ("amp", "channels_last", "workers")


def _options(config: dict[str, Any], reset: Sequence[str]):
    from retinocli.config import TrainConfig

    fields = TrainConfig.__dataclass_fields__
    known = {k: v for k, v in config.items() if k in fields and k not in reset}
    return TrainConfig.from_dict(known)


def results_row(path: str | Path) -> RunResult:
    """A run's row, from config.json, history.csv and the metrics.json of ``evaluate --split val``.

    Raises:
        RetinoError: not a run folder, no metrics.json, or metrics of another split.
    """
    from retinocli.rundir import RunDir, read_json

    run = RunDir(path)
    if not run.config.is_file():
        raise RetinoError(f"{run.path}: no config.json; give run folders written by `retino train`")
    config = run.read_config()
    if not run.metrics().is_file():
        raise RetinoError(f"{run.path}: no metrics.json; run `retino evaluate {run.path} --split val` first")
    report = read_json(run.metrics())
    if report.get("split") != "val":
        raise RetinoError(f"{run.metrics()}: measured on the {report.get('split')!r} split; RESULTS.md holds "
                          f"validation numbers only: `retino evaluate {run.path} --split val --force`")
    history = run.read_history()
    # the command recorded when it trained; runs from before that record: rebuilt from the options
    command = config.get("command") or _options(config, RESOLVED).command_line()
    values = {header: _dig(report, where) for header, where in IMAGE_METRICS}
    if "patients" in report:  # evaluate's patient section (its referable AUC needs --bootstrap > 0)
        values.update({header: _dig(report, where) for header, where in PATIENT_METRICS})
    best = report.get("epoch")
    return RunResult(run=str(run.path), dataset=Path(str(config.get("data", "?"))).name, recipe=config.get("recipe"),
                     head=str(config.get("head", "classification")), seed=int(config.get("seed", 0)),
                     command=command, group=recipe_key(config),
                     epochs=int(len(history)),
                     best_epoch=int(best) if isinstance(best, int) else None,
                     train_seconds=float(history["seconds"].sum()) if len(history) else 0.0,
                     machine=machine_of(config.get("versions", {})),
                     last_qwk=float(history["val_qwk"].iloc[-1]) if len(history) else math.nan, metrics=values,
                     code=config.get("versions", {}).get("retino_commit"))


def group_runs(results: Sequence[RunResult]) -> list[list[RunResult]]:
    """Runs that share a command but for the seed, in the order their first run was given; seeds sorted.

    A run given its options through a recipe file and one given the same options on the command
    line train alike, so they share a group (named after the recipe).
    """
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.group, []).append(r)
    return [sorted(g, key=lambda r: (r.seed, r.run)) for g in groups.values()]


def short_commit(commit: str | None) -> str:
    """A recorded commit as ``git log --oneline`` shows it (``+dirty`` kept); MISSING for runs of
    an installed retino or from before commits were recorded."""
    if not commit:
        return MISSING
    sha, dirty, _ = commit.partition("+dirty")
    return sha[:7] + ("+dirty" if dirty else "")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _recipe_label(group: Sequence[RunResult]) -> str:
    recipes = sorted({Path(r.recipe).name for r in group if r.recipe})
    return ", ".join(recipes) if recipes else "(options)"


def _headers(results: Sequence[RunResult]) -> list[str]:
    names = [h for h, _ in IMAGE_METRICS]
    if any(h in r.metrics for r in results for h, _ in PATIENT_METRICS):
        names += [h for h, _ in PATIENT_METRICS]
    return names


def render_results(results: Sequence[RunResult], *, title: str = "Results", level: int = 1) -> str:
    """RESULTS.md's text: a summary per group (mean ± sd over seeds), each run, each command;
    ``title`` is a heading of ``level`` (1: ``#``), the parts are one level below it."""
    from retinocli.reporting.clinical import summarise_seeds
    from retinocli.reporting.study import mean_sd

    metrics = _headers(results)
    groups = group_runs(results)
    top, sub = "#" * level, "#" * (level + 1)
    lines = [f"{top} {title}", "",
             "Validation-split numbers only (`retino evaluate RUN --split val`): the split that also chose each "
             "run's best epoch and, for the ordinal and regression heads, its cut points, so they are optimistic "
             "about unseen data. Written by `retino results` from the run folders; sd is the sample sd over seeds. "
             "The last-epoch QWK (history.csv) is the one number no epoch choice flatters. "
             "Training time is the sum of history.csv's epoch times (training passes, validation excluded). "
             "Code is the git commit of retino that trained the run (+dirty: with uncommitted changes).", "",
             f"{sub} Summary", ""]
    rows = []
    for i, g in enumerate(groups, 1):
        summary = summarise_seeds([{**r.metrics, "seconds": r.train_seconds} for r in g])
        first = g[0]
        rows.append([str(i), first.dataset, _recipe_label(g), first.head, ",".join(str(r.seed) for r in g),
                     *(mean_sd(h, summary.get(h, {})) for h in metrics),
                     _minutes(summary["seconds"]["mean"]), first.machine])
    lines += markdown_table(["group", "dataset", "recipe", "head", "seeds", *metrics, "train time / run",
                             "machine"], rows)
    lines += ["", f"{sub} Runs", ""]
    rows = [[str(i), Path(r.run).name, str(r.seed), str(r.epochs),
             MISSING if r.best_epoch is None else str(r.best_epoch),
             *(num(r.metrics.get(h, math.nan)) for h in metrics), num(r.last_qwk), _minutes(r.train_seconds),
             short_commit(r.code)]
            for i, g in enumerate(groups, 1) for r in g]
    lines += markdown_table(["group", "run", "seed", "epochs", "best epoch", *metrics, "last-epoch QWK",
                             "train time", "code"], rows)
    lines += ["", f"{sub} Commands", "",
              "Each run's `retino train` command as config.json recorded it, a recipe file's values spelled "
              "out as options; a group's runs differ only in `--seed`, `--name` and where they ran "
              "(`--project`, `--workers`).", ""]
    for i, g in enumerate(groups, 1):
        lines += [f"{i}. {_recipe_label(g)}, {g[0].head} head:", "", "   ```",
                  *(f"   {r.command}" for r in g), "   ```", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_results(runs: Sequence[str | Path], config: ResultsConfig | None = None,
                  **options) -> tuple[Path, list[RunResult]]:
    """Write RESULTS.md for ``runs`` (``config``: a :class:`retinocli.config.ResultsConfig`, or
    ``options``, its fields as keywords); returns its path and the rows.

    Raises:
        RetinoError: no runs, a run without validation metrics, or ``out`` exists without ``force``.
    """
    cfg = config_of(ResultsConfig, config, options)
    if not runs:
        raise RetinoError("give at least one run folder")
    out = Path(cfg.out)
    if out.exists() and not cfg.force and cfg.section is None:
        raise RetinoError(f"{out} already exists; pass --force to replace it, or --section to add to it")
    if out.is_dir():
        raise RetinoError(f"{out} is a folder; --out names the Markdown file to write")
    existing = out.read_text(encoding="utf-8") if cfg.section is not None and out.exists() else ""
    results = [results_row(r) for r in runs]
    if cfg.section is None:
        text = render_results(results, title=cfg.title)
    else:
        text = place_section(existing, cfg.section, render_results(results, title=cfg.section, level=2),
                             force=cfg.force, where=out)
    atomic_write(out, text)
    return out, results


def section_markers(title: str) -> tuple[str, str]:
    """The HTML comments (invisible in rendered Markdown) around a section ``retino results`` owns."""
    return f"<!-- retino results: {title} -->", f"<!-- end of retino results: {title} -->"


def place_section(existing: str, title: str, body: str, *, force: bool, where: Path | str) -> str:
    """``existing`` with ``body`` as its section ``title``: appended when there is none, put in
    place of the old one (only with ``force``); every other line is kept as it was.

    Raises:
        RetinoError: the section exists and ``force`` is off, or its end marker is missing.
    """
    begin, end = section_markers(title)
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    if begin not in existing:
        return f"{existing.rstrip()}\n\n{block}" if existing.strip() else block
    if not force:
        raise RetinoError(f"{where} already has the section {title!r}; pass --force to replace it")
    before, rest = existing.split(begin, 1)
    if end not in rest:
        raise RetinoError(f"{where}: the section {title!r} lacks its end line {end!r}; "
                          f"put it back where the section ends, or remove the section by hand")
    after = rest.split(end, 1)[1].lstrip("\n")
    return before + block + (f"\n{after}" if after else "")
