"""Looking at trained models: evaluate, report, explain, results."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from retinocli.cli import common
from retinocli.cli.common import ImagesOpt, LayoutOpt, ProviderOpt, app, print_differences, user_errors


@app.command()
def evaluate(
    ctx: typer.Context,
    model: Annotated[Optional[Path], typer.Argument(
        help="A run folder, a checkpoint (.pt) or an exported model (.onnx); default: the newest run.")] = None,
    data: Annotated[Optional[Path], typer.Option(
        help="Dataset to evaluate on (default: the images the run recorded in its split.csv).")] = None,
    split: Annotated[str, typer.Option(help="test, val or train.")] = "test",
    layout: LayoutOpt = None,
    images: ImagesOpt = None,
    tta: Annotated[bool, typer.Option("--tta", help="Average over the 8 flips and quarter turns.")] = False,
    out: Annotated[Optional[Path], typer.Option(
        help="Folder for metrics.json and predictions.csv (default: the run's folder).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    threads: Annotated[Optional[int], typer.Option(help="Decoding threads (default min(8, cores)).")] = None,
    device: Annotated[str, typer.Option(help="Checkpoints: auto, cpu, cuda, cuda:N, mps.")] = "auto",
    provider: ProviderOpt = "auto",
    bootstrap: Annotated[int, typer.Option(
        help="Bootstrap resamples for the 95% intervals (patients resampled where names carry them); "
             "0: point estimates only.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap: the same seed gives the same intervals.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace metrics.json/predictions.csv/patients.csv.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    fuse_eyes: Annotated[bool, typer.Option("--fuse-eyes", help="Refine each eye with its fellow eye (fusion "
                                                                "fitted on the run's validation split).")] = False,
) -> None:
    """Score a model on a labelled split: confusion table, per-grade and clinical metrics with 95% intervals,
    AUCs, and a patient-level section where image names carry patients (10_left)."""
    from retinocli.reporting import render as display
    from retinocli.config import EvaluateConfig, from_options
    from retinocli.reporting.evaluate import evaluate as run_evaluation

    shown = common.err_console if json_out else common.console
    with user_errors():
        with display.event_bars(shown, "img", transient=True) as events:
            result = run_evaluation(model, from_options(EvaluateConfig, ctx.params), events=events)
    if json_out:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    from retinocli.reporting.render_evaluate import render_evaluation

    render_evaluation(result.report, common.console)
    for note in result.notes:
        common.console.print(f"[yellow]note:[/] {note}")
    written = [result.metrics_path, result.predictions_path, result.report.get("patients", {}).get("path")]
    for path in filter(None, written):  # whole paths on lines of their own, never folded
        common.console.print(f"Wrote {path}", soft_wrap=True, markup=False, highlight=False)
    run = result.report.get("run")
    if run:
        common.console.print(f"Next: [bold]retino report {run}[/]  or  [bold]retino export {run}[/]")


@app.command()
def report(
    ctx: typer.Context,
    runs: Annotated[Optional[list[Path]], typer.Argument(help="Run folders to put side by side "
                                                              "(default: the newest run).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Report folder (default reports/<first run's name>).")] = None,
    svg: Annotated[bool, typer.Option("--svg", help="Also write every figure as SVG.")] = False,
    title: Annotated[Optional[str], typer.Option(help="Title of report.md.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a report folder that has files.")] = False,
    gallery: Annotated[bool, typer.Option("--gallery/--no-gallery", help="Error gallery: heatmaps of the most "
                                          "confident wrong and the missed referable images (needs best.pt "
                                          "and the images).")] = True,
    gallery_size: Annotated[int, typer.Option(help="Images per error gallery.")] = 8,
    device: Annotated[str, typer.Option(help="The gallery's heatmaps: auto, cpu, cuda, cuda:N, mps.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")] = False,
) -> None:
    """Figures a report needs: training curves, accuracy comparison, confusion heatmaps, ROC, error
    gallery, report.md."""
    from retinocli.config import ReportConfig, from_options
    from retinocli.reporting.report import write_report

    with user_errors():
        if not runs:
            from retinocli.rundir import RunDir

            runs = [RunDir.newest_with_history("runs").path]
            common.console.print(f"Reporting the newest run: {runs[0]}")
        target = out if out is not None else Path("reports") / runs[0].name
        result = write_report(list(runs), target, from_options(ReportConfig, ctx.params))
    if json_out:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    for fig in result.figures:
        common.console.print(f"  {fig}")
    for line in result.warnings:
        common.console.print(f"[bold red]warning:[/] {line}")
    for line in result.notes:
        common.console.print(f"[yellow]note:[/] {line}")
    print_differences(result.differences)
    if result.study is not None:
        from retinocli.reporting import render as display

        display.render_study(result.study, common.console)
    common.console.print(f"Wrote {len(result.figures)} figure(s) and {result.markdown}")


@app.command()
def results(
    ctx: typer.Context,
    runs: Annotated[list[Path], typer.Argument(help="Run folders, each evaluated with --split val.")],
    out: Annotated[Path, typer.Option(help="The Markdown file to write.")] = Path("RESULTS.md"),
    title: Annotated[str, typer.Option(help="Its heading (with --section, the section's name is).")] = "Results",
    section: Annotated[Optional[str], typer.Option(
        help="Write the tables as this section of --out (a lab notebook), keeping everything else in it: "
             "added at the end, or put in place of the section of that name with --force.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the file (with --section: that section) "
                                                        "if it exists.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print each run's row as JSON.")] = False,
) -> None:
    """RESULTS.md from runs: per-seed and mean ± sd validation numbers per recipe and head, with each
    group's command, training time and machine."""
    from dataclasses import asdict

    from retinocli.config import ResultsConfig, from_options
    from retinocli.reporting.results import write_results
    from retinocli.reporting.study import jsonable

    with user_errors():
        path, rows = write_results(runs, from_options(ResultsConfig, ctx.params))
    if json_out:
        record = {"out": str(path), "section": section, "runs": [asdict(r) for r in rows]}
        sys.stdout.write(json.dumps(jsonable(record), indent=2) + "\n")
        return
    where = f" (section {section!r})" if section else ""
    common.console.print(f"Wrote {path}{where}: {len(rows)} run(s)", soft_wrap=True, markup=False, highlight=False)


# ------------------------------------------------------------------ explain (issue #18)
@app.command()
def explain(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="A run folder or its checkpoint (.pt); not an .onnx file.")],
    inputs: Annotated[list[Path], typer.Argument(help="Images and folders of images (searched recursively).")],
    out: Annotated[Path, typer.Option(help="Folder for the overlay PNGs and contact-sheet.png.")],
    grade: Annotated[Optional[int], typer.Option(help="Explain this grade (default: each image's "
                                                      "predicted grade).")] = None,
    method: Annotated[str, typer.Option(help="gradcam, gradcam++, smoothgradcam++, xgradcam, layercam, "
                                             "scorecam.")] = "gradcam",
    layer: Annotated[str, typer.Option(help="ResNet stage whose last block is explained; layer3 gives "
                                            "twice the resolution at small input sizes.")] = "layer4",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N, mps.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Write into a folder that has files.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one record per image as JSON.")] = False,
) -> None:
    """Class-activation heatmaps: where in the fundus the model found its grade, blended over the
    pixels it saw, one PNG per image plus a contact sheet."""
    from retinocli.reporting import render as display
    from retinocli.config import ExplainConfig, from_options
    from retinocli.reporting.explain import explain as run_explain

    shown = common.err_console if json_out else common.console
    with user_errors():
        with display.event_bars(shown, "img", transient=True) as events:
            result = run_explain(model, inputs, out, from_options(ExplainConfig, ctx.params), events=events)
    if json_out:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    for e in result.errors:
        common.console.print(f"[yellow]unreadable:[/] {escape(e.error or e.image)}", highlight=False, soft_wrap=True)
    for note in result.notes:
        common.console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    done = len(result.explanations) - len(result.errors)
    common.console.print(f"Explained {done} image(s) with {result.method} on {result.arch} {result.layer} "
                  f"({result.size}px, {result.device}) in {result.seconds:.1f} s; "
                  f"{len(result.errors)} unreadable", highlight=False, soft_wrap=True)
    if result.contact_sheet:
        common.console.print(f"Contact sheet: [bold]{escape(result.contact_sheet)}[/]", highlight=False, soft_wrap=True)
