"""Data commands: stats, synth, prepare."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from retinocli.errors import RetinoError

from retinocli.cli import common
from retinocli.cli.common import CsvOpt, ImageColOpt, ImagesOpt, LabelColOpt, LayoutOpt, app, user_errors


@app.command()
def stats(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(help="Dataset folder.")] = Path("data"),
    layout: LayoutOpt = None,
    images: ImagesOpt = None,
    csv: CsvOpt = None,
    image_col: ImageColOpt = None,
    label_col: LabelColOpt = None,
    sample: Annotated[int, typer.Option(
        help="Open and check this many images (seeded sample) for formats, sizes, damage.")] = 200,
    full: Annotated[bool, typer.Option("--full", help="Open and check every image.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the image sample.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print everything as JSON instead of tables.")] = False,
    plot: Annotated[Optional[Path], typer.Option(
        help="Save a class-balance bar chart per split to this PNG.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --plot file.")] = False,
) -> None:
    """Class balance, majority-grade bar, patients, leakage and broken files of a dataset."""
    from retinocli.config import StatsConfig, from_options
    from retinocli.data.stats import run_stats
    from retinocli.reporting import render as display

    with user_errors():
        cfg = from_options(StatsConfig, ctx.params)
        with display.event_bars(common.err_console if json_out else common.console, transient=True) as events:
            result = run_stats(data, cfg, events=events)
    if json_out:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    display.render_stats(result, result["warnings"], common.console)
    if plot is not None:
        common.console.print(f"Class balance chart: {plot}")


@app.command()
def synth(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(help="Folder to write the dataset into (Kaggle layout).")] = Path("data"),
    n: Annotated[int, typer.Option("--n", help="Number of images (two eyes per patient).")] = 400,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes.")] = 0,
    test_fraction: Annotated[float, typer.Option(help="Share of patients in the test split.")] = 0.2,
    force: Annotated[bool, typer.Option("--force", help="Replace a dataset already there.")] = False,
    masks: Annotated[bool, typer.Option("--masks", help="Also write masks/IMAGE.png: where the lesions are "
                                                        "(white), to check heatmaps against.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Generate the built-in demo data: procedural fundus photographs whose grade is learnable."""
    from retinocli.config import SynthConfig, from_options
    from retinocli.data import synth as synth_mod
    from retinocli.reporting import render as display

    with user_errors():
        with display.event_bars(common.err_console if json_out else common.console, transient=True) as events:
            summary = synth_mod.generate(out, from_options(SynthConfig, ctx.params), events=events)
    if json_out:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    counts = "; ".join(f"{split} " + "/".join(str(c) for c in per.values())
                       for split, per in summary["splits"].items())
    common.console.print(f"Wrote {n} images of {size}px ({summary['patients']} patients) to {out}: "
                  f"grades 0/1/2/3/4 {counts}")
    common.console.print(f"Next: [bold]retino stats {out}[/]")


@app.command()
def prepare(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(help="Dataset folder (any layout retino stats reads).")],
    out: Annotated[Path, typer.Option(help="Cache folder to write (train on it with --data OUT).")],
    size: Annotated[int, typer.Option(help="Square side in pixels; train with the same --img-size.")] = 512,
    mode: Annotated[str, typer.Option(help="crop (to the fundus circle), none or graham.")] = "crop",
    layout: LayoutOpt = None,
    images: ImagesOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="jpeg (quality 95, 4:4:4) or png (lossless: "
                                                      "bit-identical training).")] = "jpeg",
    quality: Annotated[int, typer.Option(help="JPEG quality.")] = 95,
    workers: Annotated[Optional[int], typer.Option(help="Processes (default one per core).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild a cache made with other settings.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Crop, resize and store every image once (parallel, resumable) so training never decodes a 4k photo."""
    from retinocli.reporting import render as display
    from retinocli.config import PrepareConfig, from_options
    from retinocli.imaging.cache import prepare as run_prepare

    shown = common.err_console if json_out else common.console
    with user_errors():
        try:
            with display.event_bars(shown, "img") as events:
                result = run_prepare(data, from_options(PrepareConfig, ctx.params), events=events)
        except KeyboardInterrupt:
            raise RetinoError(f"interrupted; run the same command again to finish {out}") from None
    if json_out:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    decoded = result.written + len(result.failed)
    common.console.print(f"{out}: {result.count:,} images ({result.written:,} written now, {result.skipped:,} already "
                  f"there), {result.bytes / 1e6:,.1f} MB; {result.images_per_second:,.1f} img/s "
                  f"({decoded:,} decoded in {result.work_seconds:,.1f} s)")
    for item in result.failed[:5]:
        common.console.print(f"[yellow]unreadable:[/] {item['path']}: {item['reason']}")
    if len(result.failed) > 5:
        common.console.print(f"[yellow]... and {len(result.failed) - 5} more unreadable (listed in {out}/retino-cache.json)[/]")
    for note in result.notes:
        common.console.print(f"[yellow]note:[/] {note}")
    common.console.print(f"Next: [bold]retino train --data {out} --img-size {size} --preprocess none[/]")
