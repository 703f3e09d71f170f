"""``retino report``'s reliability diagrams (issue #15): top-1 confidence against accuracy,
before and after the temperature frozen on validation, from evaluate's ``metrics.json``
(``calibration.reliability_before`` / ``reliability_after``,
:func:`retinocli.reporting.calibration.reliability`). No torch; matplotlib's Agg canvas.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from retinocli.reporting.runs import RunSummary

__all__ = ["calibration_figures", "reliability_figure"]

_BEFORE, _AFTER = "#999999", "#1f77b4"


def _curve(ax, data: dict[str, list], color: str, label: str) -> None:
    count = np.asarray(data["count"], float)
    keep = count > 0
    conf = np.asarray(data["confidence"], float)[keep]
    acc = np.asarray(data["accuracy"], float)[keep]
    ax.plot(conf, acc, marker="o", color=color, linewidth=1.8, markersize=4, label=label)


def reliability_figure(cal: dict[str, Any], title: str) -> Figure:
    """Accuracy per confidence bin before and after temperature scaling, over the diagonal of
    perfect calibration, with the images per bin (after) as bars beneath."""
    from retinocli.reporting.figures import new_figure, style_axes
    from retinocli.reporting.numbers import num

    fig = new_figure((6.0, 6.4))
    ax, bars = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [4, 1]})
    ax.plot([0, 1], [0, 1], color="#cccccc", linestyle="--", linewidth=1, label="perfectly calibrated")
    _curve(ax, cal["reliability_before"], _BEFORE, f"before (ECE {num(cal['ece_before'])})")
    _curve(ax, cal["reliability_after"], _AFTER,
           f"after T = {cal['temperature']:.2f} (ECE {num(cal['ece_after'])})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy in the bin")
    ax.legend(loc="upper left", fontsize=8.5, framealpha=0.9)
    ax.set_title(title, fontsize=11)
    style_axes(ax)
    after = cal["reliability_after"]
    low, high = np.asarray(after["low"]), np.asarray(after["high"])
    bars.bar(low, after["count"], width=high - low, align="edge", color=_AFTER, alpha=0.5)
    bars.set_xlabel(f"top-1 confidence ({cal['n_bins']} equal bins)")
    bars.set_ylabel("images")
    style_axes(bars, grid="y")
    return fig


def calibration_figures(runs: list[RunSummary]) -> Iterator[tuple[Figure, str, str]]:
    """``(figure, file name, caption)`` for each run whose metrics.json has a calibration
    section (evaluated by a retino with issue #15; older ones are skipped)."""
    for run in runs:
        cal = (run.metrics or {}).get("calibration")
        if not cal or "reliability_after" not in cal:
            continue
        split = run.metrics.get("split", "?")
        how = "fitted on validation" if cal.get("fitted") else "none stored"
        yield (reliability_figure(cal, f"{run.name}, {split} split: temperature {how}"),
               f"{run.name}-reliability.png",
               f"Reliability: {run.name} ({split} split, before and after temperature scaling)")
