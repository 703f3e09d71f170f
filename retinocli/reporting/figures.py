"""The figures of ``retino report``: training curves, accuracy comparison, confusion heatmaps,
class balance and referable-DR ROC.

Every figure is its own :class:`matplotlib.figure.Figure` on an Agg canvas, so no pyplot state
is created or changed; the ``*_figure`` functions return them for notebooks and
:func:`retinocli.reporting.report.write_report` saves them next to ``report.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from retinocli import GRADE_NAMES, NUM_GRADES
from retinocli.reporting.numbers import MISSING, finite, num, pct
from retinocli.reporting.runs import METRIC_NAMES, RunSummary, same_split

if TYPE_CHECKING:
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

def new_figure(size: tuple[float, float], **kw) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained", **kw)
    FigureCanvasAgg(fig)
    return fig


def style_axes(ax, *, grid: str = "both") -> None:
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
    fig = new_figure(FIGSIZE["curves" if with_qwk else "curves_no_qwk"])
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
        if finite(value):
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
        style_axes(ax)
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
            if same_split(first[first["split"] == "val"], val):
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

    fig = new_figure(FIGSIZE["comparison"])
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
    style_axes(ax)
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
    fig = new_figure(FIGSIZE["confusion"])
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

    fig = new_figure(FIGSIZE["balance"])
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
    style_axes(ax, grid="y")
    ax.legend(loc="upper right", fontsize=9, framealpha=0.9)
    ax.set_title(BALANCE_TITLE + (f"\n{source}" if source else ""), fontsize=12)
    return fig


def evaluated_on(run: RunSummary) -> str:
    """``test split, 1,000 images``: what an evaluated run was scored on."""
    meta = run.metrics or {}
    n = meta.get("n_images", (meta.get("metrics") or {}).get("n"))
    return f"{meta.get('split') or 'evaluation'} split" + (f", {n:,} images" if finite(n) else "")


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
    fig = new_figure(FIGSIZE["roc"])
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
        if finite(sens) and finite(spec):
            ax.plot([1 - spec], [sens], marker="o", markersize=9, color=color, markeredgecolor="black",
                    linestyle="none", zorder=5, label=label)
    ax.plot([], [], marker="o", markersize=8, color="white", markeredgecolor="black", linestyle="none",
            label="operating point (predicted grade ≥ 2)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 − specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    style_axes(ax)
    ax.legend(loc="lower right", fontsize=8.5, framealpha=0.9)
    where = evaluated_on(evaluated[0]) if shared and evaluated else "runs evaluated on different splits (legend)"
    ax.set_title(f"Referable DR (grade ≥ 2 vs < 2), {where}", fontsize=12)
    return fig


def save_figure(fig: Figure, path: Path, svg: bool) -> list[Path]:
    fig.savefig(path, dpi=DPI)
    written = [path]
    if svg:
        fig.savefig(path.with_suffix(".svg"))
        written.append(path.with_suffix(".svg"))
    return written
