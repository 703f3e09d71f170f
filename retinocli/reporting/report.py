"""``retino report``: the figures of some runs and a markdown summary, ``report.md``, beside them.

The runs are read by :mod:`retinocli.reporting.runs`, drawn by :mod:`retinocli.reporting.figures`
and the numbers written as :mod:`retinocli.reporting.numbers` says. numpy, pandas and matplotlib
only, no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retinocli import GRADE_NAMES
from retinocli.config import ReportConfig, config_of
from retinocli.errors import RetinoError
from retinocli.reporting.figures import (BALANCE_TITLE, balance_figure, comparison_figure, confusion_figure,
                                         curves_figure, roc_figure, save_figure, split_counts)
from retinocli.reporting.numbers import MISSING, beats_majority, finite, markdown_table, num, params, pct
from retinocli.reporting.runs import (METRIC_NAMES, RunSummary, describe_settings, load_runs, same_split,
                                      settings_that_differ, weights_label)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# ---------------------------------------------------------------------------- markdown


TRAIN_HEADER = ["run", "arch", "weights", "mode", "img size", "epochs", "best epoch", "val accuracy", "val QWK",
                "s / epoch", "device", "parameters"]
TEST_HEADER = ["run", "split", "images", "accuracy", "majority baseline", "balanced accuracy", "macro F1", "QWK",
               "referable sensitivity", "referable specificity", "referable AUC", "OvR macro AUC"]
GRADE_HEADER = ["grade", "precision", "recall", "F1", "support"]
DIFFER_COLUMN = "differs from the others"


def _train_row(run: RunSummary) -> list[Any]:
    cfg, h = run.config, run.history
    best = run.best_row()
    planned = cfg.get("epochs")
    epochs = f"{len(h)} of {planned}" if finite(planned) and len(h) < planned else str(len(h))
    seconds = h["seconds"].mean()
    versions = cfg.get("versions") or {}
    return [f"`{run.name}`", cfg.get("arch", MISSING), weights_label(cfg), cfg.get("mode", MISSING),
            cfg.get("img_size", MISSING), epochs, run.best_epoch, pct(best.get("val_accuracy")),
            num(best.get("val_qwk")), f"{seconds:.1f}" if finite(seconds) else MISSING,
            versions.get("gpu") or versions.get("device") or MISSING, params(cfg.get("parameters"))]


def _test_row(run: RunSummary) -> list[Any]:
    assert run.metrics is not None
    m = run.metrics["metrics"]
    ref = m.get("referable") or {}
    bounds = ((run.metrics.get("intervals") or {}).get("metrics") or {})

    def cell(value: Any, key: str, fmt) -> str:
        """The value and, where evaluate bootstrapped it, its 95 % interval: ``0.512 [0.401–0.608]``."""
        iv = bounds.get(key) or {}
        if finite(iv.get("low")) and finite(iv.get("high")):
            return f"{fmt(value)} [{fmt(iv['low'])}–{fmt(iv['high'])}]"
        return fmt(value)

    return [f"`{run.name}`", run.metrics.get("split", MISSING), m.get("n", MISSING),
            cell(m.get("accuracy"), "accuracy", pct), pct(m.get("majority_accuracy")),
            cell(m.get("balanced_accuracy"), "balanced_accuracy", pct), cell(m.get("macro_f1"), "macro_f1", num),
            cell(m.get("qwk"), "qwk", num), cell(ref.get("sensitivity"), "referable_sensitivity", pct),
            cell(ref.get("specificity"), "referable_specificity", pct), cell(ref.get("auc"), "referable_auc", num),
            cell(m.get("ovr_macro_auc"), "ovr_macro_auc", num)]


def _interval_note(runs: list[RunSummary]) -> list[str]:
    """What the brackets in the evaluation table are, when any run has them."""
    units = sorted({f"{iv['n_boot']:,} bootstrap resamples of {iv['unit']}s (seed {iv['seed']})"
                    for r in runs if (iv := (r.metrics or {}).get("intervals")) and iv.get("n_boot")})
    if not units:
        return []
    return [f"In brackets: the 95 % interval from {'; '.join(units)}, as `retino evaluate` computed it.", ""]


def majority_warnings(runs: list[RunSummary]) -> list[str]:
    """One sentence per run that does not beat always answering the commonest grade by a point.

    Evaluated runs are judged on their test metrics; the others on validation accuracy at
    the best epoch against the validation split's majority grade.
    """
    out = []
    for run in runs:
        if run.metrics is not None:
            m = run.metrics["metrics"]
            acc, maj, grade = m.get("accuracy"), m.get("majority_accuracy"), m.get("majority_grade")
            where = f"the {run.metrics.get('split', 'evaluation')} split"
        else:
            base = run.val_baseline()
            if base is None:
                continue
            grade, maj = base
            acc, where = run.best_row().get("val_accuracy"), "the validation split (best epoch; not evaluated yet)"
        if not (finite(acc) and finite(maj)) or beats_majority(acc, maj):
            continue
        names = (run.metrics or {}).get("grade_names") or GRADE_NAMES
        answer = names[grade] if isinstance(grade, int) and 0 <= grade < len(names) else f"grade {grade}"
        out.append(f"`{run.name}` ({run.label}) scores {pct(acc)} on {where}, against {pct(maj)} for "
                   f"the majority grade: it is no better than answering {answer} for every image.")
    return out


def markdown(runs: list[RunSummary], figures: dict[str, Path], *, title: str,
             notes: list[str] | None = None, gallery: list[str] | None = None,
             study: list[str] | None = None) -> str:
    """The text of report.md; ``figures`` maps a caption to its PNG (already in the report folder);
    ``gallery`` is the error gallery's section (:func:`retinocli.reporting.gallery.markdown_lines`);
    ``study`` the seeds section (:func:`retinocli.reporting.study.markdown_lines`)."""
    evaluated = [r for r in runs if r.evaluated]
    lines = [f"# {title}", "",
             f"{len(runs)} run(s): " + ", ".join(f"`{r.name}` ({r.label}, `{r.dir}`)" for r in runs) + ".", "",
             "## Training", ""]
    differ = settings_that_differ({r.name: r.config for r in runs})
    if differ:
        lines += markdown_table([*TRAIN_HEADER, DIFFER_COLUMN],
                        [[*_train_row(r), describe_settings(differ[r.name])] for r in runs])
        lines += ["", f"{DIFFER_COLUMN}: the settings in config.json whose value is not the same in every run "
                  f"({', '.join(next(iter(differ.values())))}); all other settings are shared."]
    else:
        lines += markdown_table(TRAIN_HEADER, [_train_row(r) for r in runs])
        if len(runs) > 1:
            lines += ["", "The runs were trained with the same settings (config.json)."]
    metrics_used = sorted({METRIC_NAMES[r.select_metric] for r in runs})
    lines += ["", f"Best epoch: the epoch best.pt keeps, chosen by {' / '.join(metrics_used)} (each run's "
              "`select_metric`: the best value, or the last epoch); val accuracy and val QWK are that epoch's. "
              "s / epoch is the mean training time of an epoch.", ""]

    lines += ["## Evaluation", ""]
    if evaluated:
        lines += markdown_table(TEST_HEADER, [_test_row(r) for r in evaluated])
        lines += ["", "Majority baseline: the accuracy of answering the split's commonest grade for every image. "
                  "Referable DR: grade ≥ 2 (moderate or worse); OvR macro AUC averages each grade against the rest.",
                  ""]
        lines += _interval_note(evaluated)
    else:
        lines += ["No run has been evaluated yet (no metrics.json): there is no test table, confusion matrix or "
                  "ROC curve. Run `retino evaluate` on a run folder, then report again.", ""]
    pending = [r for r in runs if not r.evaluated]
    if evaluated and pending:
        lines += ["Not evaluated (no metrics.json): " + ", ".join(f"`{r.name}`" for r in pending) + ".", ""]
    warnings = majority_warnings(runs)
    for w in warnings:
        lines += [f"**Warning:** {w}", ""]

    for run in evaluated:
        assert run.metrics is not None
        meta, m = run.metrics, run.metrics["metrics"]
        lines += [f"### `{run.name}` per grade ({run.label}, {meta.get('split', MISSING)} split)", ""]
        model = meta.get("model", MISSING)
        epoch = f" (epoch {meta['epoch']})" if meta.get("epoch") is not None else ""
        lines += [f"Model `{model}`{epoch}, {meta.get('kind', MISSING)} on {meta.get('runtime', MISSING)}, "
                  f"TTA {'on' if meta.get('tta') else 'off'}; {meta.get('n_images', m.get('n', MISSING))} images, "
                  f"{meta.get('n_unreadable', 0)} unreadable.", ""]
        rows = [[f"{c['grade']} {c['name']}", pct(c.get("precision")), pct(c.get("recall")), num(c.get("f1")),
                 c.get("support", MISSING)] for c in m.get("per_class", [])]
        lines += markdown_table(GRADE_HEADER, rows) + [""]
    lines += study or []

    lines += ["## Figures", ""]
    for note in notes or []:
        lines += [note, ""]
    for caption, png in figures.items():
        lines += [f"### {caption}", "", f"![{caption}]({png.name})", ""]
    lines += gallery or []
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------- the report


@dataclass
class ReportResult:
    """What :func:`write_report` wrote.

    Attributes:
        out: the report folder.
        figures: every image written (PNG, and SVG when asked), in report order.
        markdown: report.md.
        warnings: runs no better than the majority grade (also in report.md).
        notes: figures skipped and why.
        differences: per run name, the settings not the same in every run
            (:func:`settings_that_differ`; also in report.md's training table).
        study: seeds and paired comparison (:class:`retinocli.reporting.study.Study`), when the
            runs hold a recipe with several seeds or two recipes evaluated on the same images.
    """

    out: Path
    figures: list[Path]
    markdown: Path
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    differences: dict[str, dict[str, Any]] = field(default_factory=dict)
    study: Any = None

    def to_dict(self) -> dict:
        return {"out": str(self.out), "markdown": str(self.markdown), "figures": [str(p) for p in self.figures],
                "warnings": list(self.warnings), "notes": list(self.notes), "differences": self.differences,
                "study": self.study.to_dict() if self.study is not None else None}


def write_report(runs: list[str | Path], out: str | Path, config: ReportConfig | None = None,
                 **options) -> ReportResult:
    """Figures and report.md comparing runs, in the folder ``out``.

    Writes ``<run>-curves.png`` per run, ``accuracy-comparison.png``, ``<run>-confusion.png``
    per evaluated run (and ``<run>-reliability.png`` where evaluate measured calibration),
    ``class-balance.png`` (the first run's split.csv that has one; runs
    with another split are named in report.md), ``referable-roc.png`` when any run is
    evaluated, and ``report.md`` linking them.

    Args:
        runs: run folders from ``retino train`` (evaluated ones hold metrics.json).
        out: the report folder; created, or refused when it holds files and not ``force``.
        config: a :class:`retinocli.config.ReportConfig`, or ``options``, its fields as keywords:
        svg: also save every figure as SVG.
        force: write into a non-empty ``out``, replacing files of the same name.
        title: the heading of report.md (default names the runs).
        gallery: add the error gallery (``<run>-wrong.png``, ``<run>-missed-referable.png``) of
            each evaluated run that has a checkpoint and readable images; a note says why not.
        gallery_size: at most this many images per gallery.
        device: where the gallery's heatmaps are computed (auto, cpu, cuda, ...).

    Raises:
        RetinoError: no runs, a folder that is not a run, or ``out`` not empty without force.
    """
    cfg = config_of(ReportConfig, config, options)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RetinoError(f"{out} is a file; the report needs a folder")
    if out.is_dir() and any(out.iterdir()) and not cfg.force:
        raise RetinoError(f"{out} exists; pass --force to overwrite")
    loaded = load_runs(list(runs))
    out.mkdir(parents=True, exist_ok=True)
    shown: dict[str, Path] = {}  # caption -> PNG, for report.md
    written: list[Path] = []

    def save(fig: Figure, filename: str, caption: str) -> None:
        paths = save_figure(fig, out / filename, cfg.svg)
        written.extend(paths)
        shown[caption] = paths[0]

    notes = _figures(loaded, save)
    gallery_lines, gallery_notes = None, []
    if cfg.gallery:  # ------------------------------------------------ error gallery (issue #18)
        from retinocli.reporting.gallery import markdown_lines, write_galleries

        galleries = write_galleries(loaded, out, size=cfg.gallery_size, device=cfg.device)
        written.extend(galleries.pngs)
        gallery_notes = galleries.notes  # in report.md's gallery section, not under Figures
        gallery_lines = markdown_lines(galleries, {r.name: (r.metrics or {}).get("split", MISSING) for r in loaded})

    from retinocli.reporting.study import markdown_lines as study_lines, write_study  # seeds (#15)

    study = write_study(loaded, out)
    md = out / "report.md"
    text = markdown(loaded, shown, title=cfg.title or "Report: " + ", ".join(r.name for r in loaded),
                    notes=notes, gallery=gallery_lines, study=study_lines(study) if study.worth_showing else None)
    md.write_text(text, encoding="utf-8")
    return ReportResult(out=out, figures=written, markdown=md, warnings=majority_warnings(loaded),
                        notes=notes + gallery_notes,
                        differences=settings_that_differ({r.name: r.config for r in loaded}),
                        study=study if study.worth_showing else None)


def _figures(loaded: list, save: Callable[[Figure, str, str], None]) -> list[str]:
    """Every figure but the galleries, each handed to ``save(figure, filename, caption)``; returns
    report.md's notes on the figures that could not be drawn."""
    notes: list[str] = []
    for run in loaded:
        save(curves_figure(run), f"{run.name}-curves.png", f"Training curves: {run.name} ({run.label})")
    save(comparison_figure(loaded), "accuracy-comparison.png", "Accuracy of every run")
    for run in loaded:
        if run.evaluated:
            save(confusion_figure(run), f"{run.name}-confusion.png",
                 f"Confusion matrix: {run.name} ({run.label}, {run.metrics.get('split', MISSING)} split)")
    with_split = [r for r in loaded if r.split is not None]
    if with_split:
        first = with_split[0]
        root = (first.config.get("dataset") or {}).get("root") or first.config.get("data") or ""
        dataset = Path(root).name or "dataset"
        save(balance_figure(split_counts(first.split), f"{dataset}, the split of {first.name}"),
             "class-balance.png", BALANCE_TITLE)
        other = [r.name for r in with_split[1:] if not same_split(r.split, first.split)]
        if other:
            notes.append(f"The class balance shows the split of `{first.name}`; "
                         f"{', '.join(f'`{n}`' for n in other)} used a different split.")
    else:
        notes.append("No run has a split.csv, so there is no class-balance chart.")
    if any(r.evaluated for r in loaded):
        save(roc_figure(loaded), "referable-roc.png", "Referable DR ROC")
    else:
        notes.append("No run is evaluated, so there is no referable-DR ROC curve.")
    from retinocli.reporting.figures_calibration import calibration_figures  # issue #15

    for fig, filename, caption in calibration_figures(loaded):
        save(fig, filename, caption)
    return notes


