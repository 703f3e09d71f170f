"""Shipping a model: export (torch -> ONNX) and predict (onnxruntime, no torch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape


from retinocli.cli import common
from retinocli.cli.common import ProviderOpt, app, user_errors


@app.command()
def export(
    ctx: typer.Context,
    model: Annotated[Optional[Path], typer.Argument(
        help="A run folder (its best.pt) or a checkpoint; default: the newest run.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output .onnx (default: model.onnx in the run folder).")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Half-precision weights, for GPUs.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Static int8 quantisation (QDQ, per-channel), "
                                                      "calibrated on training images.")] = False,
    calibration_images: Annotated[int, typer.Option(help="--int8: training images to calibrate on.")] = 128,
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17).")] = 18,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Export a trained grader to ONNX with its preprocessing and grade names inside; checks parity."""
    from retinocli.reporting import render as display
    from retinocli.config import ExportConfig, from_options
    from retinocli.deploy.export import export as run_export

    with user_errors():
        with display.event_bars(common.err_console if json_out else common.console) as events:
            result = run_export(model, from_options(ExportConfig, ctx.params), events=events)
    if json_out:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    display.render_export(result, common.console)
    common.console.print(f"Next: [bold]retino predict FOLDER --model {result.path}[/]")


@app.command()
def predict(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(help="Folder of fundus photographs (searched recursively) "
                                                "or one image.")],
    model: Annotated[Optional[Path], typer.Option(
        help="Exported .onnx model (default: the newest one under runs/).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output file, or - for stdout (default predictions.csv; "
                                                     "with --json, stdout).")] = None,
    provider: ProviderOpt = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per inference call.")] = 32,
    threads: Annotated[Optional[int], typer.Option(help="Decoding threads (default min(8, cores)).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Keep the graded rows of the output file; read the "
                                                          "images it lacks or could not read.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the output file.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit with code 1 if any image failed.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="JSON lines (the CSV's columns as keys) instead of "
                                                          "CSV.")] = False,
    patients: Annotated[Optional[Path], typer.Option(help="Per-patient file (default: patients.csv beside the "
                                                          "output when names give eyes, e.g. 10_left).")] = None,
    fuse_eyes: Annotated[bool, typer.Option("--fuse-eyes", help="Refine each eye with its fellow eye (the "
                                                                "model's stored fusion) in the patients file.")] = False,
) -> None:
    """Grade every image in a folder with an exported ONNX model (onnxruntime; no torch needed)."""
    from retinocli.reporting import render as display
    from retinocli.config import PredictConfig, from_options
    from retinocli.deploy.predict import check_output, predict_folder
    from retinocli.rundir import newest_model
    from retinocli.deploy.onnx_model import OnnxGrader

    to_stdout = str(out) == "-" if out is not None else json_out
    shown = common.err_console if to_stdout else common.console  # stdout carries the rows
    target = sys.stdout if to_stdout else (out if out is not None else Path("predictions.csv"))
    with user_errors():
        cfg = from_options(PredictConfig, ctx.params, out=target, json_lines=json_out)
        check_output(target, resume=resume, force=force)  # before the model takes its time to load
        if model is None:
            model = newest_model()
            shown.print(f"Using the newest exported model: {escape(str(model))}", soft_wrap=True, highlight=False)
        grader = OnnxGrader(model, provider=provider, threads=threads)
        shown.print(f"Model {escape(str(model))} ({grader.info.arch}, {grader.info.precision}, "
                    f"{grader.info.preprocess.size}px {grader.info.preprocess.mode}) on "
                    f"[bold]{grader.provider}[/]", soft_wrap=True, highlight=False)
        for note in grader.notes:
            shown.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
        with display.event_bars(shown, "img") as events:
            summary = predict_folder(folder, grader, cfg, events=events)
    display.render_predict_summary(summary, list(grader.info.grade_names), shown)
    if strict and summary.errors:
        raise typer.Exit(1)
