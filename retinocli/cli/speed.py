"""bench: this machine's speed at every stage."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from retinocli.errors import RetinoError

from retinocli.cli import common
from retinocli.cli.common import app, user_errors


@app.command()
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="Seconds-long smoke version (tiny sizes, one arch).")] = False,
    arch: Annotated[Optional[list[str]], typer.Option(help="Architectures to time (default resnet18, resnet50).")] = None,
    size: Annotated[Optional[int], typer.Option(help="Training and inference size (default 512 on a GPU, "
                                                     "64/224 on CPU).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Training batch (default 128/64 on a GPU, 16 on CPU).")] = None,
    photos: Annotated[Optional[Path], typer.Option(
        help="Folder of full-size photos (default ../shared/data/kaggle-sample10 when present, "
             "else generated 3072x2048 JPEGs).")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="Also time training with torch.compile.")] = False,
    data: Annotated[Optional[Path], typer.Option(
        help="Images the input-pipeline rows decode, e.g. a `retino prepare` cache (default: generated "
             "fundus JPEGs); re-encoded at the training size when made at another.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Input-pipeline loader processes (default: what "
                                                        "retino train uses).")] = None,
    only: Annotated[Optional[str], typer.Option(help="Comma-separated sections: data, train, pipeline, "
                                                     "infer, predict (default: all).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    min_seconds: Annotated[float, typer.Option(help="Least time measured per row.")] = 2.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
) -> None:
    """Measure this machine: data pipeline, training step and inference, each against its baseline."""
    from retinocli.reporting import render as display
    from retinocli.reporting.bench import SECTIONS, Plan, run_bench

    default_photos = Path("../shared/data/kaggle-sample10")
    with user_errors():
        if size is not None and size < 8:
            raise RetinoError(f"--size must be at least 8, got {size}")
        if batch_size is not None and batch_size < 1:
            raise RetinoError(f"--batch-size must be at least 1, got {batch_size}")
        if photos is not None and not photos.is_dir():
            raise RetinoError(f"--photos {photos} is not a folder")
        if data is not None and not data.is_dir():
            raise RetinoError(f"--data {data} is not a folder")
        if workers is not None and workers < 0:
            raise RetinoError(f"--workers must be >= 0, got {workers}")
        sections = tuple(s.strip() for s in only.split(",") if s.strip()) if only is not None else SECTIONS
        plan = Plan(quick=quick, archs=tuple(arch) if arch else ("resnet18", "resnet50"), train_size=size,
                    infer_size=size, train_batch=batch_size, compile=compile, device=device,
                    min_seconds=min_seconds, sections=sections, cache=data, workers=workers,
                    full_size_photos=photos or (default_photos if default_photos.is_dir() else None))
        with display.event_stages(common.err_console if json_out else common.console, "benchmarking") as events:
            result = run_bench(plan, command="retino " + " ".join(sys.argv[1:]), events=events)
    if json_out:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    display.render_bench(result, common.console)
