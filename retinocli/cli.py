"""The ``retino`` command line: parse, build a config, call one library function, render.

Heavy libraries (pandas, torch, onnxruntime) are imported inside the commands that need
them, so ``retino --help`` starts at once and ``stats``/``predict`` never load torch.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from retinocli.errors import RetinoError

app = typer.Typer(
    name="retino",
    help="Diabetic-retinopathy grading from colour fundus photographs: "
         "stats -> train -> evaluate -> report -> export -> predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)


@contextmanager
def user_errors():
    """Turn a :class:`RetinoError` into one red line on stderr and exit code 2."""
    try:
        yield
    except RetinoError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def check_output_file(path: Path | None, force: bool) -> None:
    """Refuse to replace a file the user already has unless --force was given."""
    if path is not None and path.exists() and not force:
        raise RetinoError(f"{path} already exists; pass --force to overwrite it")


# Options every command that reads a dataset shares.
LayoutOpt = Annotated[Optional[str], typer.Option(
    "--layout", help="Force a layout: course, kaggle, aptos, idrid, folders, csv (default: detect).")]
ImagesOpt = Annotated[Optional[Path], typer.Option(
    "--images", help="Folder holding the images, when not where the layout expects them.")]
CsvOpt = Annotated[Optional[Path], typer.Option("--csv", help="Any label CSV (csv layout).")]
ImageColOpt = Annotated[Optional[str], typer.Option("--image-col", help="--csv: column of image names.")]
LabelColOpt = Annotated[Optional[str], typer.Option("--label-col", help="--csv: column of grades 0-4.")]


@app.command()
def stats(
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
    from retinocli import display
    from retinocli import stats as stats_mod
    from retinocli.layouts import load_dataset

    with user_errors():
        if sample < 0:
            raise RetinoError(f"--sample must be 0 or more, got {sample}")
        check_output_file(plot, force)
        ds = load_dataset(data, layout=layout, images=images, csv=csv,
                          image_col=image_col, label_col=label_col)
        out = console if not json_out else err_console
        with display.progress_bar(out, transient=True) as bar:
            task = bar.add_task("checking images", total=None, postfix="")
            result = stats_mod.dataset_stats(
                ds, sample=None if full else sample, seed=seed,
                progress=lambda done, total: bar.update(task, completed=done, total=total))
        found = stats_mod.warnings(result)
        result["warnings"] = found
        if plot is not None:
            result["plot"] = str(stats_mod.plot_balance(result, plot))
        if json_out:
            sys.stdout.write(json.dumps(result, indent=2) + "\n")
            return
        display.render_stats(result, found, console)
        if plot is not None:
            console.print(f"Class balance chart: {plot}")


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the dataset into (Kaggle layout).")] = Path("data"),
    n: Annotated[int, typer.Option("--n", help="Number of images (two eyes per patient).")] = 400,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes.")] = 0,
    test_fraction: Annotated[float, typer.Option(help="Share of patients in the test split.")] = 0.2,
    force: Annotated[bool, typer.Option("--force", help="Replace a dataset already there.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Generate the built-in demo data: procedural fundus photographs whose grade is learnable."""
    from retinocli import display, synth as synth_mod

    with user_errors():
        with display.progress_bar(err_console if json_out else console, transient=True) as bar:
            task = bar.add_task("drawing fundus images", total=n, postfix="")
            summary = synth_mod.generate(out, n=n, size=size, seed=seed, test_fraction=test_fraction,
                                         force=force, progress=lambda k: bar.update(task, completed=k))
    if json_out:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    counts = "; ".join(f"{split} " + "/".join(str(c) for c in per.values())
                       for split, per in summary["splits"].items())
    console.print(f"Wrote {n} images of {size}px ({summary['patients']} patients) to {out}: "
                  f"grades 0/1/2/3/4 {counts}")
    console.print(f"Next: [bold]retino stats {out}[/]")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
