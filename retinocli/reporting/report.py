"""Figures and a markdown summary of training runs: what ``retino report`` writes.

Reads only what other commands left in a run folder: ``config.json``, ``history.csv`` and
``split.csv`` from ``retino train``, and ``metrics.json`` (plus ``predictions.csv``, checked
against :mod:`retinocli.deploy.schema`) from ``retino evaluate`` once a run has been evaluated.
numpy, pandas and matplotlib only, no torch. Every figure is its own :class:`matplotlib.figure.Figure` on an Agg canvas, so no
pyplot state is created or changed; the ``*_figure`` functions return them for notebooks
and :func:`write_report` saves them next to ``report.md``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retinocli import GRADE_NAMES, NUM_GRADES
from retinocli.errors import RetinoError
from retinocli.rundir import RunDir

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

DPI = 150
#: Figure sizes in inches; a saved PNG is exactly ``size * DPI`` pixels.
FIGSIZE: dict[str, tuple[float, float]] = {
    "curves": (13.0, 4.2),          # loss, accuracy, QWK
    "curves_no_qwk": (9.0, 4.2),    # when val QWK was never defined
    "comparison": (11.0, 5.0),
    "confusion": (11.0, 5.0),
    "balance": (10.0, 4.5),
    "roc": (7.0, 6.5),
}
#: Okabe-Ito, distinguishable with every common colour-vision deficiency; yellow last
#: because it is faint on white.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
TRAIN_COLOR, VAL_COLOR, BASELINE_COLOR = "#E69F00", "#0072B2", "#555555"
SPLIT_COLORS = {"train": "#0072B2", "val": "#E69F00", "test": "#009E73"}
BASELINE_STYLE = "-."  # dash-dot: a majority-grade bar, never a training curve
MISSING = "–"  # what a table shows for NaN or a value the run did not record
METRIC_NAMES = {"qwk": "val QWK", "accuracy": "val accuracy", "loss": "val loss"}


# ---------------------------------------------------------------------------- runs


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
        """The epoch best.pt holds, chosen as the training loop does: the best finite
        ``val_<select_metric>`` (the first on ties), or the first epoch when none is finite.
        """
        import numpy as np

        values = self.history[f"val_{self.select_metric}"].to_numpy(dtype=float)
        if not np.isfinite(values).any():
            i = 0
        else:
            i = np.nanargmin(values) if self.select_metric == "loss" else np.nanargmax(values)
        return int(self.history["epoch"].iloc[int(i)])

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
                            what="`retino evaluate`'s predictions", remedy="run retino evaluate again with --force")
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


# ---------------------------------------------------------------------------- numbers


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pct(x: Any) -> str:
    """0.735 -> ``73.5 %``; NaN or missing -> ``–``."""
    return f"{100 * x:.1f} %" if _finite(x) else MISSING


def num(x: Any, digits: int = 3) -> str:
    """Kappa, AUC, F1: three decimals; NaN or missing -> ``–``."""
    return f"{x:.{digits}f}" if _finite(x) else MISSING


def params(n: Any) -> str:
    """11_689_512 -> ``11.7 M``."""
    if not _finite(n):
        return MISSING
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(int(n))


def _beats_majority(accuracy: float, majority: float) -> bool:
    """At least one percentage point above always answering the commonest grade."""
    return accuracy - majority >= 0.01 - 1e-9


# ---------------------------------------------------------------------------- figures


def _new_figure(size: tuple[float, float], **kw) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained", **kw)
    FigureCanvasAgg(fig)
    return fig


def _style(ax, *, grid: str = "both") -> None:
    ax.grid(True, axis=grid, alpha=0.3, linewidth=0.6)
    ax.spines[["top", "right"]].set_visible(False)


def _epoch_axis(ax, last_epoch: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.set_xlim(0.5, last_epoch + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _percent_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    # ticks on whole percents (steps of 1, 2, 5 or 10 points), so a label never rounds 57.5 to 58
    ax.yaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 5, 10]))
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=None))  # decimals from the view range


def _grade_short(grade: int) -> str:
    return GRADE_NAMES[grade] if 0 <= grade < len(GRADE_NAMES) else f"grade {grade}"


def grade_label(grade: int) -> str:
    """``2 Moderate``: how every figure's axis names a grade (confusion matrices, class balance)."""
    return f"{grade} {_grade_short(grade)}"


def _title(run: RunSummary) -> str:
    """The label, and the run's name unless the label already carries it."""
    return run.label if run.label.endswith(f"({run.name})") else f"{run.label} — {run.name}"


def curves_figure(run: RunSummary) -> Figure:
    """Loss, accuracy (with the validation majority bar) and val QWK per epoch, best epoch marked."""
    import numpy as np

    h = run.history
    epochs = h["epoch"].to_numpy()
    with_qwk = bool(np.isfinite(h["val_qwk"].to_numpy(dtype=float)).any())
    fig = _new_figure(FIGSIZE["curves" if with_qwk else "curves_no_qwk"])
    axes = fig.subplots(1, 3 if with_qwk else 2)
    best = run.best_epoch
    line = {"marker": "o", "markersize": 3.5 if len(h) <= 40 else 0, "linewidth": 1.6}
    panels = [("loss", "loss", False), ("accuracy", "accuracy", True)]
    if with_qwk:
        panels.append(("qwk", "quadratic weighted kappa", False))
    for i, (ax, (key, ylabel, percent)) in enumerate(zip(axes, panels)):
        if f"train_{key}" in h:
            ax.plot(epochs, h[f"train_{key}"], color=TRAIN_COLOR, linestyle="--", label="train", **line)
        ax.plot(epochs, h[f"val_{key}"], color=VAL_COLOR, label="validation", **line)
        ax.axvline(best, color="#888888", linestyle=":", linewidth=1.2,
                   label=f"best epoch {best} ({METRIC_NAMES[run.select_metric]})" if i == 0 else None)
        value = h.loc[h["epoch"] == best, f"val_{key}"].iloc[0]
        if _finite(value):
            ax.plot([best], [value], marker="*", markersize=13, color=VAL_COLOR,
                    markeredgecolor="black", markeredgewidth=0.6, linestyle="none", zorder=5)
        if key == "accuracy" and (base := run.val_baseline()) is not None:
            grade, acc = base
            ax.axhline(acc, color=BASELINE_COLOR, linestyle=BASELINE_STYLE, linewidth=1.2,
                       label=f"always {_grade_short(grade)}: {acc:.1%}")
        if key == "qwk":
            ax.axhline(0, color="#BBBBBB", linewidth=0.8)
        ax.set_title("Validation QWK" if key == "qwk" else key.capitalize(), fontsize=11)
        ax.set_ylabel(ylabel)
        _epoch_axis(ax, int(epochs.max()))
        if percent:
            _percent_axis(ax)
        _style(ax)
        ax.legend(fontsize=8, loc="best", framealpha=0.85)
    stopped = len(h) < int(run.config.get("epochs") or len(h))
    note = f" — stopped after {len(h)} of {run.config['epochs']} epochs" if stopped else ""
    fig.suptitle(f"{_title(run)}{note}", fontsize=12, fontweight="bold")
    return fig


def _baseline_groups(runs: list[RunSummary]) -> list[tuple[int, float, list[RunSummary]]]:
    """(grade, accuracy, runs) of always answering the commonest grade, once per validation split:
    runs whose split.csv lists the same validation images share one entry.
    """
    groups: list[tuple[int, float, list[RunSummary]]] = []
    for run in runs:
        base = run.val_baseline()
        if base is None:
            continue
        val = run.split[run.split["split"] == "val"]
        for _, _, members in groups:
            first = members[0].split
            if _same_split(first[first["split"] == "val"], val):
                members.append(run)
                break
        else:
            groups.append((*base, [run]))
    return groups


def comparison_figure(runs: list[RunSummary]) -> Figure:
    """Every run's validation (solid) and training (dashed) accuracy on one axis, with the
    majority-grade bar (dash-dot) of each validation split: grey when all runs share one,
    else in the colour of the run whose split it is.
    """
    from matplotlib.lines import Line2D

    fig = _new_figure(FIGSIZE["comparison"])
    ax = fig.subplots()
    handles = []
    for i, run in enumerate(runs):
        color = PALETTE[i % len(PALETTE)]
        h = run.history
        ax.plot(h["epoch"], h["train_accuracy"], color=color, linestyle="--", linewidth=1.3, alpha=0.8)
        (val,) = ax.plot(h["epoch"], h["val_accuracy"], color=color, linewidth=2, marker="o", markersize=3.5,
                         label=run.label)
        handles.append(val)
    groups = _baseline_groups(runs)
    for grade, acc, members in groups:
        if len(groups) == 1:  # one validation split for every run: one grey bar
            color, label = BASELINE_COLOR, f"majority grade (always {_grade_short(grade)}), val split: {acc:.1%}"
        else:  # each split's bar in the colour of the (first) run it belongs to
            color = PALETTE[runs.index(members[0]) % len(PALETTE)]
            whose = ", ".join(r.name for r in members)
            label = f"majority grade (always {_grade_short(grade)}), val split of {whose}: {acc:.1%}"
        handles.append(ax.axhline(acc, color=color, linestyle=BASELINE_STYLE, linewidth=1.4, label=label))
    handles += [Line2D([], [], color="black", linewidth=2, label="validation (solid)"),
                Line2D([], [], color="black", linestyle="--", linewidth=1.3, label="train (dashed)")]
    _epoch_axis(ax, max(int(r.history["epoch"].max()) for r in runs))
    _percent_axis(ax)
    ax.set_ylabel("accuracy")
    _style(ax)
    ax.set_title("Accuracy per epoch: validation (solid) and training (dashed)", fontsize=12)
    fig.legend(handles=handles, loc="outside right upper", fontsize=9, frameon=False)
    return fig


def _heatmap(ax, values, text: list[list[str]], *, vmax: float, empty_rows: set[int]) -> None:
    import numpy as np

    cmap = "Blues"
    im = ax.imshow(values, cmap=cmap, vmin=0, vmax=vmax if vmax > 0 else 1)
    k = values.shape[0]
    for r in range(k):
        for c in range(k):
            rgba = im.cmap(im.norm(values[r, c]))
            luminance = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
            ax.text(c, r, text[r][c], ha="center", va="center", fontsize=10,
                    color="white" if luminance < 0.5 else "black",
                    alpha=0.45 if r in empty_rows else 1.0)
    ax.set_xticks(np.arange(k), [grade_label(g) for g in range(k)], rotation=25, ha="right", fontsize=9)
    ax.set_xlabel("predicted grade")
    ax.set_ylabel("true grade")
    ax.tick_params(length=0)
    ax.spines[:].set_visible(False)


def confusion_figure(run: RunSummary) -> Figure:
    """Counts and row-normalised percentages of an evaluated run, true grade per row."""
    import numpy as np

    if run.metrics is None:
        raise ValueError(f"{run.name} has no metrics.json")
    m = run.metrics["metrics"]
    cm = np.asarray(m["confusion_matrix"], dtype=float)
    k = cm.shape[0]
    support = cm.sum(axis=1)
    norm = np.divide(cm, support[:, None], out=np.zeros_like(cm), where=support[:, None] > 0)
    empty = {r for r in range(k) if support[r] == 0}
    fig = _new_figure(FIGSIZE["confusion"])
    ax_n, ax_p = fig.subplots(1, 2)
    _heatmap(ax_n, cm, [[f"{int(v):,}" for v in row] for row in cm], vmax=cm.max(), empty_rows=empty)
    _heatmap(ax_p, norm, [[MISSING if r in empty else f"{100 * v:.0f}%" for v in norm[r]] for r in range(k)],
             vmax=1.0, empty_rows=empty)
    rows = [f"{grade_label(g)} (n={int(support[g]):,})" for g in range(k)]
    for ax in (ax_n, ax_p):
        ax.set_yticks(np.arange(k), rows, fontsize=9)
    ax_n.set_title("counts", fontsize=11)
    ax_p.set_title("% of each true grade (rows sum to 100 %)", fontsize=11)
    split = run.metrics.get("split") or "evaluation"
    fig.suptitle(f"{_title(run)}: {split} split, {int(support.sum()):,} images\n"
                 f"accuracy {pct(m.get('accuracy'))} (majority {pct(m.get('majority_accuracy'))}), "
                 f"QWK {num(m.get('qwk'))}", fontsize=12, fontweight="bold")
    return fig


def split_counts(split) -> dict[str, list[int]]:
    """Labelled images per grade of each split in a split.csv DataFrame: train, val, test first."""
    import numpy as np

    labelled = split.dropna(subset=["grade"])
    order = ["train", "val", "test"]
    names = [s for s in order if (labelled["split"] == s).any()]
    names += sorted(set(labelled["split"].astype(str)) - set(order))
    counts = {}
    for name in names:
        grades = labelled.loc[labelled["split"].astype(str) == name, "grade"].astype(int)
        counts[name] = np.bincount(grades.clip(0, NUM_GRADES - 1), minlength=NUM_GRADES)[:NUM_GRADES].tolist()
    return counts


BALANCE_TITLE = "Images per DR grade, by split"


def balance_figure(counts: dict[str, list[int]], source: str = "") -> Figure:
    """Images per grade and split (grouped bars), each bar's share of its split written on it.

    The one class-balance chart: ``retino stats --plot`` and ``retino report`` both draw it.
    The legend (inside the axes, upper right, with head room kept free for it) gives each
    split's size and what always answering its commonest grade would score.

    Args:
        counts: images per grade (``NUM_GRADES`` numbers) for each split, in legend order.
        source: a second title line saying what was counted (dataset, whose split).
    """
    import numpy as np

    fig = _new_figure(FIGSIZE["balance"])
    ax = fig.subplots()
    width = 0.8 / max(1, len(counts))
    x = np.arange(NUM_GRADES)
    for i, (name, per_grade) in enumerate(counts.items()):
        c = np.asarray(per_grade, dtype=int)
        total = int(c.sum())
        color = SPLIT_COLORS.get(name, PALETTE[(i + 3) % len(PALETTE)])
        label = f"{name}: {total:,} images"
        if total:
            top = int(np.argmax(c))  # ties go to the lowest grade, as in metrics.majority_baseline
            label += f"; always {_grade_short(top)} scores {c[top] / total:.1%}"
        bars = ax.bar(x + (i - (len(counts) - 1) / 2) * width, c, width * 0.95, color=color, label=label)
        for bar, n in zip(bars, c):
            ax.annotate(f"{n / max(1, total):.1%}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7.5)
    ax.set_xticks(x, [grade_label(g) for g in range(NUM_GRADES)])
    ax.set_xlabel("DR grade (above each bar: its share of the split)")
    ax.set_ylabel("images")
    highest = max((max(c, default=0) for c in counts.values()), default=0)
    # head room for the legend, one line per split, so it never covers a bar
    ax.set_ylim(0, max(1, highest) * (1.2 + 0.09 * len(counts)))
    _style(ax, grid="y")
    ax.legend(loc="upper right", fontsize=9, framealpha=0.9)
    ax.set_title(BALANCE_TITLE + (f"\n{source}" if source else ""), fontsize=12)
    return fig


def evaluated_on(run: RunSummary) -> str:
    """``test split, 1,000 images``: what an evaluated run was scored on."""
    meta = run.metrics or {}
    n = meta.get("n_images", (meta.get("metrics") or {}).get("n"))
    return f"{meta.get('split') or 'evaluation'} split" + (f", {n:,} images" if _finite(n) else "")


def _same_evaluation(runs: list[RunSummary]) -> bool:
    """Every run scored on one split: the same split name, data and number of images."""
    keys = {(str(r.metrics.get("split")), str(r.metrics.get("data")), str(r.metrics.get("n_images")))
            for r in runs if r.metrics is not None}
    return len(keys) <= 1


def roc_figure(runs: list[RunSummary]) -> Figure:
    """Referable-DR ROC of every evaluated run, AUC in the legend, operating points marked.

    Runs scored on one split name it in the title; otherwise each legend entry names its
    run's split and the title says the curves come from different splits.
    """
    evaluated = [r for r in runs if r.metrics is not None]
    shared = _same_evaluation(evaluated)
    fig = _new_figure(FIGSIZE["roc"])
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="chance")
    for i, run in enumerate(runs):
        if run.metrics is None:
            continue
        color = PALETTE[i % len(PALETTE)]
        ref = run.metrics["metrics"].get("referable") or {}
        where = "" if shared else f", {evaluated_on(run)}"
        label = f"{run.label}{where} (AUC {num(ref.get('auc'))})"
        roc = run.referable_roc()
        if roc is not None:
            ax.plot(roc[0], roc[1], color=color, linewidth=2, label=label)
            label = None
        sens, spec = ref.get("sensitivity"), ref.get("specificity")
        if _finite(sens) and _finite(spec):
            ax.plot([1 - spec], [sens], marker="o", markersize=9, color=color, markeredgecolor="black",
                    linestyle="none", zorder=5, label=label)
    ax.plot([], [], marker="o", markersize=8, color="white", markeredgecolor="black", linestyle="none",
            label="operating point (predicted grade ≥ 2)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 − specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    _style(ax)
    ax.legend(loc="lower right", fontsize=8.5, framealpha=0.9)
    where = evaluated_on(evaluated[0]) if shared and evaluated else "runs evaluated on different splits (legend)"
    ax.set_title(f"Referable DR (grade ≥ 2 vs < 2), {where}", fontsize=12)
    return fig


def _save(fig: Figure, path: Path, svg: bool) -> list[Path]:
    fig.savefig(path, dpi=DPI)
    written = [path]
    if svg:
        fig.savefig(path.with_suffix(".svg"))
        written.append(path.with_suffix(".svg"))
    return written


# ---------------------------------------------------------------------------- markdown


def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


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
    epochs = f"{len(h)} of {planned}" if _finite(planned) and len(h) < planned else str(len(h))
    seconds = h["seconds"].mean()
    versions = cfg.get("versions") or {}
    return [f"`{run.name}`", cfg.get("arch", MISSING), weights_label(cfg), cfg.get("mode", MISSING),
            cfg.get("img_size", MISSING), epochs, run.best_epoch, pct(best.get("val_accuracy")),
            num(best.get("val_qwk")), f"{seconds:.1f}" if _finite(seconds) else MISSING,
            versions.get("gpu") or versions.get("device") or MISSING, params(cfg.get("parameters"))]


def _test_row(run: RunSummary) -> list[Any]:
    assert run.metrics is not None
    m = run.metrics["metrics"]
    ref = m.get("referable") or {}
    return [f"`{run.name}`", run.metrics.get("split", MISSING), m.get("n", MISSING), pct(m.get("accuracy")),
            pct(m.get("majority_accuracy")), pct(m.get("balanced_accuracy")), num(m.get("macro_f1")),
            num(m.get("qwk")), pct(ref.get("sensitivity")), pct(ref.get("specificity")), num(ref.get("auc")),
            num(m.get("ovr_macro_auc"))]


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
        if not (_finite(acc) and _finite(maj)) or _beats_majority(acc, maj):
            continue
        names = (run.metrics or {}).get("grade_names") or GRADE_NAMES
        answer = names[grade] if isinstance(grade, int) and 0 <= grade < len(names) else f"grade {grade}"
        out.append(f"`{run.name}` ({run.label}) scores {pct(acc)} on {where}, against {pct(maj)} for "
                   f"the majority grade: it is no better than answering {answer} for every image.")
    return out


def markdown(runs: list[RunSummary], figures: dict[str, Path], *, title: str,
             notes: list[str] | None = None, gallery: list[str] | None = None) -> str:
    """The text of report.md; ``figures`` maps a caption to its PNG (already in the report folder);
    ``gallery`` is the error gallery's section (:func:`retinocli.reporting.gallery.markdown_lines`)."""
    evaluated = [r for r in runs if r.evaluated]
    lines = [f"# {title}", "",
             f"{len(runs)} run(s): " + ", ".join(f"`{r.name}` ({r.label}, `{r.dir}`)" for r in runs) + ".", "",
             "## Training", ""]
    differ = settings_that_differ({r.name: r.config for r in runs})
    if differ:
        lines += _table([*TRAIN_HEADER, DIFFER_COLUMN],
                        [[*_train_row(r), describe_settings(differ[r.name])] for r in runs])
        lines += ["", f"{DIFFER_COLUMN}: the settings in config.json whose value is not the same in every run "
                  f"({', '.join(next(iter(differ.values())))}); all other settings are shared."]
    else:
        lines += _table(TRAIN_HEADER, [_train_row(r) for r in runs])
        if len(runs) > 1:
            lines += ["", "The runs were trained with the same settings (config.json)."]
    metrics_used = sorted({METRIC_NAMES[r.select_metric] for r in runs})
    lines += ["", f"Best epoch: the epoch with the best {' / '.join(metrics_used)} (each run's `select_metric`, "
              "the one best.pt keeps); val accuracy and val QWK are that epoch's. "
              "s / epoch is the mean training time of an epoch.", ""]

    lines += ["## Evaluation", ""]
    if evaluated:
        lines += _table(TEST_HEADER, [_test_row(r) for r in evaluated])
        lines += ["", "Majority baseline: the accuracy of answering the split's commonest grade for every image. "
                  "Referable DR: grade ≥ 2 (moderate or worse); OvR macro AUC averages each grade against the rest.",
                  ""]
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
        lines += _table(GRADE_HEADER, rows) + [""]

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
    """

    out: Path
    figures: list[Path]
    markdown: Path
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    differences: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"out": str(self.out), "markdown": str(self.markdown), "figures": [str(p) for p in self.figures],
                "warnings": list(self.warnings), "notes": list(self.notes), "differences": self.differences}


def write_report(runs: list[str | Path], out: str | Path, *, svg: bool = False, force: bool = False,
                 title: str | None = None, gallery: bool = True, gallery_size: int = 8,
                 device: str = "auto") -> ReportResult:
    """Figures and report.md comparing runs, in the folder ``out``.

    Writes ``<run>-curves.png`` per run, ``accuracy-comparison.png``, ``<run>-confusion.png``
    per evaluated run, ``class-balance.png`` (the first run's split.csv that has one; runs
    with another split are named in report.md), ``referable-roc.png`` when any run is
    evaluated, and ``report.md`` linking them.

    Args:
        runs: run folders from ``retino train`` (evaluated ones hold metrics.json).
        out: the report folder; created, or refused when it holds files and not ``force``.
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
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RetinoError(f"{out} is a file; the report needs a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise RetinoError(f"{out} exists; pass --force to overwrite")
    if gallery and gallery_size < 1:
        raise RetinoError(f"--gallery-size must be at least 1, got {gallery_size}")
    loaded = load_runs(list(runs))
    out.mkdir(parents=True, exist_ok=True)

    shown: dict[str, Path] = {}  # caption -> PNG, for report.md
    written: list[Path] = []
    notes: list[str] = []

    def save(fig: Figure, filename: str, caption: str) -> None:
        paths = _save(fig, out / filename, svg)
        written.extend(paths)
        shown[caption] = paths[0]

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
        other = [r.name for r in with_split[1:] if not _same_split(r.split, first.split)]
        if other:
            notes.append(f"The class balance shows the split of `{first.name}`; "
                         f"{', '.join(f'`{n}`' for n in other)} used a different split.")
    else:
        notes.append("No run has a split.csv, so there is no class-balance chart.")

    if any(r.evaluated for r in loaded):
        save(roc_figure(loaded), "referable-roc.png", "Referable DR ROC")
    else:
        notes.append("No run is evaluated, so there is no referable-DR ROC curve.")

    gallery_lines, gallery_notes = None, []
    if gallery:  # ------------------------------------------------ error gallery (issue #18)
        from retinocli.reporting.gallery import markdown_lines, write_galleries

        galleries = write_galleries(loaded, out, size=gallery_size, device=device)
        written.extend(galleries.pngs)
        gallery_notes = galleries.notes  # in report.md's gallery section, not under Figures
        gallery_lines = markdown_lines(galleries, {r.name: (r.metrics or {}).get("split", MISSING) for r in loaded})

    md = out / "report.md"
    text = markdown(loaded, shown, title=title or "Report: " + ", ".join(r.name for r in loaded), notes=notes,
                    gallery=gallery_lines)
    md.write_text(text, encoding="utf-8")
    return ReportResult(out=out, figures=written, markdown=md, warnings=majority_warnings(loaded),
                        notes=notes + gallery_notes,
                        differences=settings_that_differ({r.name: r.config for r in loaded}))


def _same_split(a, b) -> bool:
    cols = [c for c in ("image", "grade", "split") if c in a.columns and c in b.columns]
    if len(a) != len(b):
        return False
    key = lambda df: df[cols].astype(str).sort_values(cols).reset_index(drop=True)  # noqa: E731
    return key(a).equals(key(b))
