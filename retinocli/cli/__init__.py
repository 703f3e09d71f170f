"""The ``retino`` command line: parse, build a config, call one library function, render.

Heavy libraries (pandas, torch, onnxruntime) are imported inside the commands that need
them, so ``retino --help`` starts at once and ``stats``/``predict`` never load torch.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from retinocli import __version__
from retinocli.errors import RetinoError

PIPE_WIDTH = 200  # a log's line width when COLUMNS does not say: tables keep every column


def make_console(stderr: bool = False) -> Console:
    """A console for this invocation: ``COLUMNS`` wins; in a pipe, wide enough for whole tables."""
    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    width = None if (os.environ.get("COLUMNS") or tty) else PIPE_WIDTH
    return Console(stderr=stderr, width=width)


class RetinoGroup(TyperGroup):
    """Every error the user can cause, usage errors included: one ``error:`` line (and one
    usage hint), exit code 2. Typer would draw usage errors as boxed panels."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Exception as exc:  # click's exceptions, vendored by typer: recognised by shape
            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show()  # bare `retino`: the help, as before
                code = 0
            elif hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
                message = exc.format_message().strip().splitlines()
                err = make_console(stderr=True)
                err.print(f"[bold red]error:[/] {escape(' '.join(m.strip() for m in message if m.strip()))}",
                          highlight=False, soft_wrap=True)
                ctx = getattr(exc, "ctx", None)
                if ctx is not None:
                    err.print(f"usage: {escape(ctx.command_path)} --help", highlight=False, soft_wrap=True)
                code = exc.exit_code
            elif type(exc).__name__ == "Abort":
                make_console(stderr=True).print("[bold red]error:[/] aborted", highlight=False)
                code = 1
            elif isinstance(exc, OSError) and exc.errno == errno.EPIPE:  # `retino ... | head`
                code = 1
            else:
                raise
            if not standalone_mode:
                return code
            sys.exit(code)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="retino",
    help="Diabetic-retinopathy grading from colour fundus photographs: "
         "stats -> train -> evaluate -> report -> export -> predict.",
    cls=RetinoGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = make_console()
err_console = make_console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"retino {__version__}")
        raise typer.Exit(0)


@app.callback()
def _invocation(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print retino's version and exit.")] = False,
) -> None:
    """Runs before every command (the app's help is Typer's ``help=``, not this docstring).

    Consoles per invocation: COLUMNS and whether output is a terminal are read now, not at import.
    """
    global console, err_console
    console, err_console = make_console(), make_console(stderr=True)


@contextmanager
def user_errors():
    """Turn a :class:`RetinoError` into one red line on stderr and exit code 2."""
    try:
        yield
    except RetinoError as exc:
        # escaped: messages quote shapes and file names, and "[batch, 3, 64, 64]" is not markup
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def check_output_file(path: Path | None, force: bool) -> None:
    """Refuse to replace a file the user already has unless --force was given."""
    if path is not None and path.exists() and not force:
        raise RetinoError(f"{path} already exists; pass --force to overwrite it")


def _print_differences(differences: dict[str, dict]) -> None:
    """A line per run naming the settings it does not share with the others."""
    from retinocli.reporting.runs import describe_settings

    if differences:
        console.print("What differs between the runs:")
    for name, settings in differences.items():
        console.print(f"  {escape(name)}: {escape(describe_settings(settings))}", highlight=False, soft_wrap=True)


# Options every command that reads a dataset shares.
LayoutOpt = Annotated[Optional[str], typer.Option(
    "--layout", help="Force a layout: course, kaggle, aptos, idrid, folders, csv, cache (default: detect).")]
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
    from retinocli.reporting import render as display
    from retinocli.data import stats as stats_mod
    from retinocli.data.layouts import load_dataset

    with user_errors():
        if sample < 0:
            raise RetinoError(f"--sample must be 0 or more, got {sample}")
        check_output_file(plot, force)
        ds = load_dataset(data, layout=layout, images=images, csv=csv,
                          image_col=image_col, label_col=label_col)
        out = console if not json_out else err_console
        with display.event_bars(out, transient=True) as events:
            result = stats_mod.dataset_stats(ds, sample=None if full else sample, seed=seed, events=events)
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
    masks: Annotated[bool, typer.Option("--masks", help="Also write masks/IMAGE.png: where the lesions are "
                                                        "(white), to check heatmaps against.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Generate the built-in demo data: procedural fundus photographs whose grade is learnable."""
    from retinocli.data import synth as synth_mod
    from retinocli.reporting import render as display

    with user_errors():
        with display.event_bars(err_console if json_out else console, transient=True) as events:
            summary = synth_mod.generate(out, n=n, size=size, seed=seed, test_fraction=test_fraction,
                                         force=force, masks=masks, events=events)
    if json_out:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    counts = "; ".join(f"{split} " + "/".join(str(c) for c in per.values())
                       for split, per in summary["splits"].items())
    console.print(f"Wrote {n} images of {size}px ({summary['patients']} patients) to {out}: "
                  f"grades 0/1/2/3/4 {counts}")
    console.print(f"Next: [bold]retino stats {out}[/]")


@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option(help="Dataset folder (any layout retino stats reads).")] = Path("data"),
    layout: LayoutOpt = None,
    images: ImagesOpt = None,
    arch: Annotated[str, typer.Option(help="resnet18, resnet34, resnet50, resnet101, resnet152, "
                                           "resnext50_32x4d, resnext101_32x8d, wide_resnet50_2.")] = "resnet18",
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained",
                                             help="Start from ImageNet weights (DEFAULT unless --weights).")] = False,
    weights: Annotated[Optional[str], typer.Option(
        help="IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT, or a .pth state dict; implies --pretrained.")] = None,
    mode: Annotated[str, typer.Option(help="finetune (all layers), linear (frozen backbone), "
                                           "two-stage (head first, then all).")] = "finetune",
    head_epochs: Annotated[int, typer.Option(help="two-stage: epochs with the backbone frozen.")] = 1,
    stem: Annotated[str, typer.Option(help="auto, imagenet, small (3x3 stride-1 stem for tiny images; "
                                           "auto picks it at <= 32 px from scratch).")] = "auto",
    img_size: Annotated[int, typer.Option(help="Square input size in pixels.")] = 512,
    preprocess: Annotated[str, typer.Option(help="none, crop (to the fundus circle), graham "
                                                 "(crop + Ben Graham's local-colour subtraction).")] = "none",
    augment: Annotated[str, typer.Option(help="none, light, strong.")] = "light",
    augment_on: Annotated[str, typer.Option(help="auto (device on CUDA, else workers), workers (per image "
                                                 "in the loader processes) or device (batched on the "
                                                 "training device, the same images: far faster on a "
                                                 "GPU).")] = "auto",
    decode: Annotated[str, typer.Option(help="cpu (PIL in the loader processes) or gpu (workers read JPEG "
                                             "bytes, CUDA decodes each batch; needs --augment-on device "
                                             "and --preprocess none).")] = "cpu",
    val_fraction: Annotated[float, typer.Option(help="Share of training patients carved into validation "
                                                     "when the dataset has no val split.")] = 0.1,
    class_weights: Annotated[str, typer.Option(help="Loss weights: none, balanced, sqrt.")] = "none",
    sampler: Annotated[str, typer.Option(help="uniform or balanced (every grade equally often).")] = "uniform",
    optimizer: Annotated[str, typer.Option(help="adamw or sgd.")] = "adamw",
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (default 1e-3 from scratch, "
                                                     "3e-4 pretrained).")] = None,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="Weight decay (not on biases and norms).")] = 0.05,
    scheduler: Annotated[str, typer.Option(help="cosine, step or none.")] = "cosine",
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up length in epochs.")] = 1.0,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 20,
    batch_size: Annotated[int, typer.Option(help="Images per step (per GPU under torchrun).")] = 64,
    label_smoothing: Annotated[float, typer.Option(help="Cross-entropy label smoothing.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for weights, split and augmentation.")] = 0,
    seeds: Annotated[Optional[str], typer.Option(help="Train once per seed, e.g. 0,1,2: runs NAME-s0, NAME-s1, "
                                                      "...; the same command again skips finished seeds and "
                                                      "resumes a cut one.")] = None,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Bit-reproducible kernels.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N, mps.")] = "auto",
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="Mixed precision (default on CUDA: "
                                                "bf16, or fp16 with a grad scaler).")] = None,
    channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last",
                                                          help="NHWC memory format (default on CUDA).")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    workers: Annotated[Optional[int], typer.Option(help="Data-loading processes (default min(8, cores)).")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Stop after this many epochs without a better "
                                                         "--select-metric.")] = None,
    select_metric: Annotated[str, typer.Option(help="What picks best.pt: qwk, accuracy, loss.")] = "qwk",
    head: Annotated[str, typer.Option(help="classification (softmax), regression (Huber on the grade) or "
                                           "ordinal (CORAL); the last two grade with cut points fitted "
                                           "on validation for QWK.")] = "classification",
    pool: Annotated[str, typer.Option(help="avg or gem (generalised mean, learnable p from 3).")] = "avg",
    ema: Annotated[float, typer.Option(help="Decay of an exponential moving average of the weights, used "
                                            "for validation, best.pt and export (0: off; e.g. 0.999).")] = 0.0,
    mixup: Annotated[float, typer.Option(help="Mixup Beta alpha (0: off; e.g. 0.2).")] = 0.0,
    cutmix: Annotated[float, typer.Option(help="CutMix Beta alpha (0: off; e.g. 1.0).")] = 0.0,
    target_sensitivity: Annotated[float, typer.Option(help="Referable-DR sensitivity the referral threshold is "
                                                           "frozen for on validation.")] = 0.87,
    config: Annotated[Optional[Path], typer.Option(help="TOML file of train options (keys as option "
                                                        "names); options given here override it.")] = None,
    project: Annotated[str, typer.Option(help="Parent folder of runs.")] = "runs",
    name: Annotated[str, typer.Option(help="Run name; taken names get a number (train2, train3).")] = "train",
    force: Annotated[bool, typer.Option("--force", help="Reuse runs/NAME even if it exists.")] = False,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this folder where it stopped.")] = None,
    list_archs: Annotated[bool, typer.Option("--list-archs", help="List architectures and exit.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON at the end.")] = False,
) -> None:
    """Train a ResNet grader (pretrained or from scratch); writes runs/NAME with checkpoints and history."""
    with user_errors():
        if list_archs:
            _list_archs(json_out)
            return
        if seeds is not None:  # ---- several seeds (#15)
            _check_seeds(ctx, seeds, resume)
        cfg = _train_config(ctx, config) if resume is None else None
        from retinocli.reporting import render as display

        with display.event_bars(err_console if json_out else console, "img") as events:
            if seeds is not None:
                from retinocli.engine.seeds import parse_seeds, train_seeds

                study = train_seeds(cfg, parse_seeds(seeds), force=force, events=events)
            else:
                from retinocli.engine.trainer import train as run_training

                result = run_training(cfg, resume=resume, force=force, events=events)

    if seeds is not None:
        _show_seeds(study, json_out)
        return

    if json_out:
        sys.stdout.write(json.dumps({"run_dir": str(result.run_dir), "epochs": result.epochs_done,
                                     "best_epoch": result.best_epoch, "best": result.best_metrics,
                                     "stopped": result.stopped, "notes": result.notes,
                                     "warnings": result.warnings, "interrupted": result.interrupted,
                                     "history": result.history}, indent=2) + "\n")
    else:
        display.render_training(result, console)
    if result.interrupted:  # 130, as a shell reports Ctrl-C, so `set -e` scripts stop here
        err_console.print(f"[bold red]interrupted:[/] {escape(result.stopped)}", highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    if not json_out and result.best_epoch and "evaluate" in commands:
        split = "" if result.evaluate_split == "test" else f" --split {result.evaluate_split}"
        console.print(f"Next: [bold]retino evaluate {escape(str(result.run_dir))}{split}[/]", soft_wrap=True)


# train's options that are not settings of the run (TrainConfig holds every other one)
NOT_TRAIN_SETTINGS = ("seeds", "config", "force", "resume", "list_archs", "json_out")


def _train_config(ctx: typer.Context, config: Path | None):
    """The run's settings: every option of ``retino train`` that is one, and the values of the
    ``--config`` file where the command line did not name the option."""
    from retinocli.config import TrainConfig
    from retinocli.models.registry import check_arch

    values = {k: v for k, v in ctx.params.items() if k not in NOT_TRAIN_SETTINGS}
    for key in ("data", "images"):  # paths as config.json keeps them
        values[key] = str(values[key]) if values[key] is not None else None
    if config is not None:
        values["recipe"] = str(config)
        for key, value in TrainConfig.from_file(config).items():
            source = ctx.get_parameter_source(key)  # click's ParameterSource (typer may vendor click)
            if getattr(source, "name", None) != "COMMANDLINE":
                values[key] = value
    cfg = TrainConfig(**values)
    check_arch(cfg.arch)
    return cfg


def _check_seeds(ctx: typer.Context, seeds: str, resume: Path | None) -> None:
    """--seeds names every seed itself: --seed (on the command line) and --resume are refused with it."""
    from retinocli.engine.seeds import parse_seeds

    if getattr(ctx.get_parameter_source("seed"), "name", None) == "COMMANDLINE":
        raise RetinoError("--seed and --seeds cannot be used together: --seeds 0,1,2 names every seed")
    if resume is not None:
        raise RetinoError("--resume and --seeds cannot be used together: run the same --seeds command again "
                          "to continue its seeds")
    parse_seeds(seeds)


def _show_seeds(study, json_out: bool) -> None:
    """A line per seed, the mean ± sd of the validation metrics, and the next commands; 130 on Ctrl-C."""
    from retinocli.reporting import render as display

    if json_out:
        sys.stdout.write(json.dumps(study.to_dict(), indent=2) + "\n")
    else:
        display.render_seeds(study, console)
    if study.interrupted:
        err_console.print(f"[bold red]interrupted:[/] {escape(study.interrupted)}; run the same command again "
                          "to continue the seeds", highlight=False, soft_wrap=True)
        raise typer.Exit(130)


ProviderOpt = Annotated[str, typer.Option(
    help="ONNX models: auto (TensorRT, then CUDA, then CPU), tensorrt, cuda, cpu.")]


@app.command()
def evaluate(
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
    from retinocli.reporting.evaluate import evaluate as run_evaluation

    shown = err_console if json_out else console
    with user_errors():
        with display.event_bars(shown, "img", transient=True) as events:
            result = run_evaluation(model, data=data, split=split, layout=layout, images=images, tta=tta,
                                    out=out, force=force, batch_size=batch_size, threads=threads,
                                    device=device, provider=provider, bootstrap=bootstrap, seed=seed,
                                    fuse_eyes=fuse_eyes, events=events)
    if json_out:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    display.render_evaluation(result.report, console)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    written = [result.metrics_path, result.predictions_path, result.report.get("patients", {}).get("path")]
    for path in filter(None, written):  # whole paths on lines of their own, never folded
        console.print(f"Wrote {path}", soft_wrap=True, markup=False, highlight=False)
    run = result.report.get("run")
    if run:
        console.print(f"Next: [bold]retino report {run}[/]  or  [bold]retino export {run}[/]")


@app.command()
def report(
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
    from retinocli.reporting.report import write_report

    with user_errors():
        if not runs:
            from retinocli.rundir import RunDir

            runs = [RunDir.newest_with_history("runs").path]
            console.print(f"Reporting the newest run: {runs[0]}")
        target = out if out is not None else Path("reports") / runs[0].name
        result = write_report(list(runs), target, svg=svg, force=force, title=title, gallery=gallery,
                              gallery_size=gallery_size, device=device)
    if json_out:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    for fig in result.figures:
        console.print(f"  {fig}")
    for line in result.warnings:
        console.print(f"[bold red]warning:[/] {line}")
    for line in result.notes:
        console.print(f"[yellow]note:[/] {line}")
    _print_differences(result.differences)
    if result.study is not None:
        from retinocli.reporting import render as display

        display.render_study(result.study, console)
    console.print(f"Wrote {len(result.figures)} figure(s) and {result.markdown}")


@app.command()
def results(
    runs: Annotated[list[Path], typer.Argument(help="Run folders, each evaluated with --split val.")],
    out: Annotated[Path, typer.Option(help="The Markdown file to write.")] = Path("RESULTS.md"),
    title: Annotated[str, typer.Option(help="Its heading.")] = "Results",
    force: Annotated[bool, typer.Option("--force", help="Replace the file if it exists.")] = False,
) -> None:
    """RESULTS.md from runs: per-seed and mean ± sd validation numbers per recipe and head, with each
    group's command, training time and machine."""
    from retinocli.reporting.results import write_results

    with user_errors():
        path, rows = write_results(runs, out, force=force, title=title)
    console.print(f"Wrote {path}: {len(rows)} run(s)", soft_wrap=True, markup=False, highlight=False)


@app.command()
def export(
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
    from retinocli.deploy.export import export as run_export

    with user_errors():
        with display.event_bars(err_console if json_out else console) as events:
            result = run_export(model, out=out, fp16=fp16, int8=int8, opset=opset, force=force,
                                calibration_images=calibration_images, events=events)
    if json_out:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    display.render_export(result, console)
    console.print(f"Next: [bold]retino predict FOLDER --model {result.path}[/]")


@app.command()
def predict(
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
    from retinocli.deploy.predict import check_output, predict_folder
    from retinocli.rundir import newest_model
    from retinocli.deploy.onnx_model import OnnxGrader

    to_stdout = str(out) == "-" if out is not None else json_out
    shown = err_console if to_stdout else console  # stdout carries the rows
    target = sys.stdout if to_stdout else (out if out is not None else Path("predictions.csv"))
    with user_errors():
        if batch_size < 1:
            raise RetinoError(f"--batch-size must be >= 1, got {batch_size}")
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
            summary = predict_folder(folder, grader, out=target, batch_size=batch_size, threads=threads,
                                     resume=resume, force=force, json_lines=json_out, events=events,
                                     patients=patients, fuse_eyes=fuse_eyes)
    display.render_predict_summary(summary, list(grader.info.grade_names), shown)
    if strict and summary.errors:
        raise typer.Exit(1)


@app.command()
def compare(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option(help="Dataset folder (any layout).")] = Path("data"),
    layout: LayoutOpt = None,
    images: ImagesOpt = None,
    arch: Annotated[Optional[list[str]], typer.Option(help="Architecture; repeat for several.")] = None,
    pretrained: Annotated[str, typer.Option(help="yes, no or both (ImageNet weights and scratch).")] = "both",
    mode: Annotated[str, typer.Option(help="finetune, linear, two-stage.")] = "finetune",
    img_size: Annotated[int, typer.Option(help="Square input size in pixels.")] = 512,
    preprocess: Annotated[str, typer.Option(help="none, crop, graham.")] = "none",
    augment: Annotated[str, typer.Option(help="none, light, strong.")] = "light",
    epochs: Annotated[int, typer.Option(help="Epochs per run.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 64,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (default by weights).")] = None,
    class_weights: Annotated[str, typer.Option(help="none, balanced, sqrt.")] = "none",
    seed: Annotated[int, typer.Option(help="Seed shared by every run.")] = 0,
    seeds: Annotated[Optional[str], typer.Option(help="Train every cell once per seed, e.g. 0,1,2 (runs "
                                                      "CELL-s0, ...): the report gives mean ± sd and paired "
                                                      "comparisons.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N, mps.")] = "auto",
    workers: Annotated[Optional[int], typer.Option(help="Data-loading processes.")] = None,
    split: Annotated[str, typer.Option(help="Split each run is evaluated on.")] = "test",
    tta: Annotated[bool, typer.Option("--tta", help="Evaluate with test-time augmentation.")] = False,
    project: Annotated[str, typer.Option(help="Parent folder of runs.")] = "runs",
    name: Annotated[str, typer.Option(help="Folder of this comparison under --project.")] = "compare",
    force: Annotated[bool, typer.Option("--force", help="Start the comparison again from scratch.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Train every arch with and without ImageNet weights, evaluate each, write one report (resumable)."""
    from retinocli.reporting.compare import compare as run_compare
    from retinocli.config import TrainConfig
    from retinocli.reporting import render as display

    with user_errors():
        if seeds is not None:
            from retinocli.engine.seeds import parse_seeds

            _check_seeds(ctx, seeds, None)
        base = TrainConfig(data=str(data), layout=layout, images=str(images) if images else None, mode=mode,
                           img_size=img_size, preprocess=preprocess, augment=augment, epochs=epochs,
                           batch_size=batch_size, lr=lr, class_weights=class_weights, seed=seed, device=device,
                           workers=workers, project=project, name=name)
        with display.event_bars(err_console if json_out else console, "img") as events:
            result = run_compare(base, arch or ["resnet18", "resnet50"], pretrained=pretrained, split=split,
                                 tta=tta, force=force, events=events,
                                 seeds=parse_seeds(seeds) if seeds is not None else None)
    if json_out:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    for line in result.done + [f"[yellow]note:[/] {n}" for n in result.notes]:
        console.print(line)
    _print_differences(result.differences)
    if result.study is not None:
        display.render_study(result.study, console)
    console.print(f"Report: [bold]{result.markdown}[/]")


@app.command()
def prepare(
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
    from retinocli.imaging.cache import prepare as run_prepare

    shown = err_console if json_out else console
    with user_errors():
        try:
            with display.event_bars(shown, "img") as events:
                result = run_prepare(data, out=out, size=size, mode=mode, layout=layout, images=images, fmt=fmt,
                                     quality=quality, workers=workers, force=force, events=events)
        except KeyboardInterrupt:
            raise RetinoError(f"interrupted; run the same command again to finish {out}") from None
    if json_out:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    decoded = result.written + len(result.failed)
    console.print(f"{out}: {result.count:,} images ({result.written:,} written now, {result.skipped:,} already "
                  f"there), {result.bytes / 1e6:,.1f} MB; {result.images_per_second:,.1f} img/s "
                  f"({decoded:,} decoded in {result.work_seconds:,.1f} s)")
    for item in result.failed[:5]:
        console.print(f"[yellow]unreadable:[/] {item['path']}: {item['reason']}")
    if len(result.failed) > 5:
        console.print(f"[yellow]... and {len(result.failed) - 5} more unreadable (listed in {out}/retino-cache.json)[/]")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"Next: [bold]retino train --data {out} --img-size {size} --preprocess none[/]")


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
        shown = err_console if json_out else console
        # a spinner on a terminal; a log gets one line per stage as it starts
        with shown.status("benchmarking") if shown.is_terminal else nullcontext() as status:
            say = ((lambda msg: status.update(f"benchmarking: {msg}")) if status is not None else
                   (lambda msg: shown.print(f"benchmarking: {msg}", markup=False, highlight=False, soft_wrap=True)))
            result = run_bench(plan, command="retino " + " ".join(sys.argv[1:]), events=lambda event: say(event.text))
    if json_out:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    display.render_bench(result, console)


# ------------------------------------------------------------------ explain (issue #18)
@app.command()
def explain(
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
    from retinocli.reporting.explain import explain as run_explain

    shown = err_console if json_out else console
    with user_errors():
        with display.event_bars(shown, "img", transient=True) as events:
            result = run_explain(model, inputs, out, grade=grade, method=method, layer=layer, device=device,
                                 force=force, events=events)
    if json_out:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    for e in result.errors:
        console.print(f"[yellow]unreadable:[/] {escape(e.error or e.image)}", highlight=False, soft_wrap=True)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    done = len(result.explanations) - len(result.errors)
    console.print(f"Explained {done} image(s) with {result.method} on {result.arch} {result.layer} "
                  f"({result.size}px, {result.device}) in {result.seconds:.1f} s; "
                  f"{len(result.errors)} unreadable", highlight=False, soft_wrap=True)
    if result.contact_sheet:
        console.print(f"Contact sheet: [bold]{escape(result.contact_sheet)}[/]", highlight=False, soft_wrap=True)
# ------------------------------------------------------------------ end explain


def _list_archs(json_out: bool) -> None:
    from retinocli.models.registry import ARCHS, parameter_count, weight_names

    rows = [{"arch": a, "parameters": parameter_count(a), "weights": weight_names(a)} for a in ARCHS]
    if json_out:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    from rich.table import Table

    table = Table(title="Architectures (with a 5-grade head)", title_justify="left")
    for col, justify in (("arch", "left"), ("parameters", "right"), ("ImageNet weights", "left")):
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(r["arch"], f"{r['parameters'] / 1e6:.1f} M", ", ".join(r["weights"]))
    console.print(table)


def main() -> None:
    """Console-script entry point (also ``python -m retinocli``: usage lines say ``retino`` either way)."""
    app(prog_name="retino")


if __name__ == "__main__":
    main()
