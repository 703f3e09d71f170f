"""The error gallery of ``retino report`` (issue #18): where the model looked when it was wrong.

From an evaluated run's predictions.csv it picks two sets of images:

* the most confident wrong predictions: readable rows whose predicted grade is not the true
  grade, highest ``confidence`` first (ties by image name), the first ``size``;
* the missed referable cases: true grade >= 2 predicted < 2, lowest ``referable_prob`` first
  (the most confidently missed; ties by image name), the first ``size``;

and draws each set as one PNG: every image as the model saw it with the Grad-CAM heatmap of its
predicted grade over it (:func:`retinocli.reporting.explain.explain`), captioned with the true
and predicted grade and the confidence. A gallery needs the run's torch checkpoint and the
images themselves; when either is missing the report says why in one line instead.

No torch at import; :func:`write_galleries` imports it only when it draws.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from retinocli import NUM_GRADES
from retinocli.errors import RetinoError
from retinocli.rundir import RunDir

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

DEFAULT_SIZE = 8
COLUMNS_PER_ROW = 4
WRONG = "wrong"
MISSED = "missed-referable"
TITLES = {WRONG: "most confident wrong predictions",
          MISSED: "missed referable DR (true grade ≥ 2, predicted < 2)"}


@dataclass
class Gallery:
    """One gallery of one run: the rows shown (predictions.csv's, in order) and its PNG."""

    run: str
    kind: str  # WRONG or MISSED
    rows: pd.DataFrame
    png: Path | None = None


@dataclass
class GalleryResult:
    galleries: list[Gallery] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one line per run (or report) without a gallery

    @property
    def pngs(self) -> list[Path]:
        return [g.png for g in self.galleries if g.png is not None]


def read_predictions(path: Path, num_grades: int) -> pd.DataFrame:
    """evaluate's predictions.csv (header checked), its readable labelled rows, numbers as numbers."""
    import pandas as pd

    from retinocli.deploy import schema

    rows = schema.read_rows(path, schema.columns(num_grades, labelled=True),
                            what="`retino evaluate`'s predictions", remedy="run retino evaluate again with --force",
                            also=[schema.older_columns(num_grades, labelled=True)])
    frame = pd.DataFrame(rows, columns=list(schema.columns(num_grades, labelled=True)))
    frame = frame[frame[schema.STATUS] == schema.OK].copy()
    for column in (schema.TRUE_GRADE, schema.PREDICTED_GRADE, schema.CONFIDENCE, schema.REFERABLE_PROB):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame = frame.dropna(subset=[schema.TRUE_GRADE, schema.PREDICTED_GRADE, schema.CONFIDENCE])
    frame[schema.TRUE_GRADE] = frame[schema.TRUE_GRADE].astype(int)
    frame[schema.PREDICTED_GRADE] = frame[schema.PREDICTED_GRADE].astype(int)
    return frame.reset_index(drop=True)


def select_cases(predictions: pd.DataFrame, size: int = DEFAULT_SIZE) -> dict[str, pd.DataFrame]:
    """{WRONG: the ``size`` most confident wrong rows, MISSED: the ``size`` most confidently missed
    referable rows}, each in display order."""
    from retinocli.deploy import schema
    from retinocli.reporting.metrics import REFERABLE_GRADE

    true, pred = predictions[schema.TRUE_GRADE], predictions[schema.PREDICTED_GRADE]
    wrong = predictions[true != pred].sort_values([schema.CONFIDENCE, schema.IMAGE], ascending=[False, True])
    missed = predictions[(true >= REFERABLE_GRADE) & (pred < REFERABLE_GRADE)]
    missed = missed.sort_values([schema.REFERABLE_PROB, schema.IMAGE], ascending=[True, True])
    return {WRONG: wrong.head(size).reset_index(drop=True), MISSED: missed.head(size).reset_index(drop=True)}


def gallery_figure(rows: pd.DataFrame, overlays: dict[str, object], title: str) -> Figure:
    """A grid of heatmap overlays (``overlays``: path -> uint8 HWC array), each captioned with
    the image name, the true and predicted grade and the confidence."""
    from matplotlib.figure import Figure

    from retinocli.deploy import schema

    cols = min(len(rows), COLUMNS_PER_ROW)
    n_rows = -(-len(rows) // cols)
    fig = Figure(figsize=(2.0 * cols, 2.3 * n_rows + 0.4))
    fig.suptitle(title, fontsize=9)
    axes = fig.subplots(n_rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (_, row) in zip(axes.flat, rows.iterrows()):
        ax.imshow(overlays[str(Path(row[schema.PATH]))], interpolation="bilinear")
        ax.set_title(f"{row[schema.IMAGE]}\ntrue {row[schema.TRUE_GRADE]}, predicted {row[schema.PREDICTED_GRADE]} "
                     f"({row[schema.CONFIDENCE]:.0%})", fontsize=7)
    return fig


def write_galleries(runs: list, out: Path, *, size: int = DEFAULT_SIZE, device: str = "auto") -> GalleryResult:
    """The galleries of every evaluated run in ``runs`` (runs.RunSummary), PNGs in ``out``.

    A run that cannot have one (no predictions.csv, no torch checkpoint, no readable image,
    a model torchcam cannot explain) gets a one-line note instead; nothing is raised for it.
    """
    from retinocli.deploy import schema
    from retinocli.reporting.figures import DPI

    if size < 1:
        raise RetinoError(f"--gallery-size must be at least 1, got {size}")
    result = GalleryResult()
    evaluated = [r for r in runs if r.evaluated]
    if not evaluated:
        result.notes.append("No error gallery: no run is evaluated (no metrics.json).")
        return result
    for run in evaluated:
        rundir = RunDir(run.dir)
        why = f"No error gallery for `{run.name}`: "
        if not rundir.predictions().is_file():
            result.notes.append(why + f"it has no {RunDir.PREDICTIONS}.")
            continue
        if not (rundir.best.is_file() or rundir.last.is_file()):
            result.notes.append(why + f"it has no torch checkpoint ({RunDir.BEST}), which heatmaps need.")
            continue
        names = run.metrics.get("grade_names")
        cases = select_cases(read_predictions(rundir.predictions(), len(names) if names else NUM_GRADES), size)
        paths = sorted({p for rows in cases.values() for p in rows[schema.PATH]})
        readable = [p for p in paths if Path(p).is_file()]
        if paths and not readable:
            result.notes.append(why + f"none of its {len(paths)} images can be read (first: {paths[0]}).")
            continue
        try:
            overlays = _overlays(RunDir.resolve_checkpoint(run.dir), readable, device)
        except (RetinoError, ImportError, AttributeError, TypeError) as exc:
            result.notes.append(why + f"the heatmaps failed ({exc}).")
            continue
        for kind, rows in cases.items():
            drawn = rows[schema.PATH].map(lambda p: str(Path(p))).isin(list(overlays))
            rows = rows[drawn].reset_index(drop=True)
            gallery = Gallery(run=run.name, kind=kind, rows=rows)
            if not rows.empty:
                gallery.png = out / f"{run.name}-{kind}.png"
                fig = gallery_figure(rows, overlays, f"{run.name}: {TITLES[kind]}")
                fig.savefig(gallery.png, dpi=DPI / 1.5, bbox_inches="tight")
            result.galleries.append(gallery)
    return result


def _overlays(checkpoint: Path, paths: list[str], device: str) -> dict[str, object]:
    """str(Path(path)) -> the explain overlay (uint8 HWC, the model's input size) of each readable image."""
    import numpy as np
    from PIL import Image

    from retinocli.reporting.explain import explain

    if not paths:
        return {}
    with tempfile.TemporaryDirectory(prefix="retino-gallery-") as tmp:
        result = explain(checkpoint, list(paths), Path(tmp) / "x", device=device)
        overlays = {}
        for e in result.explanations:
            if e.status == "ok":
                with Image.open(e.overlay) as im:
                    overlays[e.image] = np.asarray(im.convert("RGB"))
    return overlays


def markdown_lines(result: GalleryResult, split_of: dict[str, str]) -> list[str]:
    """report.md's "Error gallery" section: per gallery its image and a table of the images shown."""
    from retinocli.deploy import schema

    lines = ["## Error gallery", "",
             "Each image as the model saw it, with the Grad-CAM heatmap of the grade it predicted "
             "(`retino explain`): where it looked when it was wrong.", ""]
    for note in result.notes:
        lines += [note, ""]
    for g in result.galleries:
        lines += [f"### `{g.run}`: {TITLES[g.kind]} ({split_of.get(g.run, '–')} split)", ""]
        if g.png is None:
            lines += ["None." if g.kind == MISSED else "No wrong prediction.", ""]
            continue
        lines += [f"![{g.run}: {TITLES[g.kind]}]({g.png.name})", "",
                  "| image | true grade | predicted grade | confidence |", "|---|---|---|---|"]
        for _, row in g.rows.iterrows():
            lines.append(f"| {row[schema.IMAGE]} | {row[schema.TRUE_GRADE]} | {row[schema.PREDICTED_GRADE]} | "
                         f"{row[schema.CONFIDENCE]:.1%} |")
        lines.append("")
    return lines
