"""Training commands: train (one run or one per seed) and compare (a grid of runs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from retinocli.errors import RetinoError

from retinocli.cli import common
from retinocli.cli.common import ImagesOpt, LayoutOpt, app, print_differences, user_errors

# Options train and compare share, declared once (compare's defaults may differ, its help does not).
DataOpt = Annotated[Path, typer.Option(help="Dataset folder (any layout retino stats reads).")]
ModeOpt = Annotated[str, typer.Option(help="finetune (all layers), linear (frozen backbone), "
                                           "two-stage (head first, then all).")]
ImgSizeOpt = Annotated[int, typer.Option(help="Square input size in pixels.")]
PreprocessOpt = Annotated[str, typer.Option(help="none, crop (to the fundus circle), graham "
                                                 "(crop + Ben Graham's local-colour subtraction).")]
AugmentOpt = Annotated[str, typer.Option(help="none, light, strong.")]
ClassWeightsOpt = Annotated[str, typer.Option(help="Loss weights: none, balanced, sqrt.")]
LrOpt = Annotated[Optional[float], typer.Option(help="Peak learning rate (default 1e-3 from scratch, "
                                                     "3e-4 pretrained).")]
EpochsOpt = Annotated[int, typer.Option(help="Training epochs.")]
BatchSizeOpt = Annotated[int, typer.Option(help="Images per step (per GPU under torchrun).")]
SeedOpt = Annotated[int, typer.Option(help="Seed for weights, split and augmentation.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N, mps.")]
WorkersOpt = Annotated[Optional[int], typer.Option(help="Data-loading processes (default min(8, cores)).")]
ConfigOpt = Annotated[Optional[Path], typer.Option(help="TOML file of train options (keys as option "
                                                        "names); options given here override it.")]
ProjectOpt = Annotated[str, typer.Option(help="Parent folder of runs.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON at the end.")]


@app.command()
def train(
    ctx: typer.Context,
    data: DataOpt = Path("data"),
    layout: LayoutOpt = None,
    images: ImagesOpt = None,
    arch: Annotated[str, typer.Option(help="resnet18, resnet34, resnet50, resnet101, resnet152, "
                                           "resnext50_32x4d, resnext101_32x8d, wide_resnet50_2.")] = "resnet18",
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained",
                                             help="Start from ImageNet weights (DEFAULT unless --weights).")] = False,
    weights: Annotated[Optional[str], typer.Option(
        help="IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT, or a .pth state dict; implies --pretrained.")] = None,
    mode: ModeOpt = "finetune",
    head_epochs: Annotated[int, typer.Option(help="two-stage: epochs with the backbone frozen.")] = 1,
    stem: Annotated[str, typer.Option(help="auto, imagenet, small (3x3 stride-1 stem for tiny images; "
                                           "auto picks it at <= 32 px from scratch).")] = "auto",
    img_size: ImgSizeOpt = 512,
    preprocess: PreprocessOpt = "none",
    augment: AugmentOpt = "light",
    augment_on: Annotated[str, typer.Option(help="auto (device on CUDA, else opencv), opencv (per image in "
                                                 "the loader processes with OpenCV), workers (the same "
                                                 "with torchvision, the reference) or device (batched on "
                                                 "the training device: far faster on a GPU). All give "
                                                 "the same images.")] = "auto",
    decode: Annotated[str, typer.Option(help="cpu (PIL in the loader processes) or gpu (workers read JPEG "
                                             "bytes, CUDA decodes each batch; needs --augment-on device "
                                             "and --preprocess none).")] = "cpu",
    val_fraction: Annotated[float, typer.Option(help="Share of training patients carved into validation "
                                                     "when the dataset has no val split.")] = 0.1,
    class_weights: ClassWeightsOpt = "none",
    sampler: Annotated[str, typer.Option(help="uniform or balanced (every grade equally often).")] = "uniform",
    optimizer: Annotated[str, typer.Option(help="adamw or sgd.")] = "adamw",
    lr: LrOpt = None,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="Weight decay (not on biases and norms).")] = 0.05,
    scheduler: Annotated[str, typer.Option(help="cosine, step or none.")] = "cosine",
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up length in epochs.")] = 1.0,
    epochs: EpochsOpt = 20,
    batch_size: BatchSizeOpt = 64,
    label_smoothing: Annotated[float, typer.Option(help="Cross-entropy label smoothing.")] = 0.0,
    seed: SeedOpt = 0,
    seeds: Annotated[Optional[str], typer.Option(help="Train once per seed, e.g. 0,1,2: runs NAME-s0, NAME-s1, "
                                                      "...; the same command again skips finished seeds and "
                                                      "resumes a cut one.")] = None,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Bit-reproducible kernels.")] = False,
    device: DeviceOpt = "auto",
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="Mixed precision (default on CUDA: "
                                                "bf16, or fp16 with a grad scaler).")] = None,
    channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last",
                                                          help="NHWC memory format (default on CUDA).")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    workers: WorkersOpt = None,
    patience: Annotated[Optional[int], typer.Option(help="Stop after this many epochs without a better "
                                                         "--select-metric.")] = None,
    select_metric: Annotated[str, typer.Option(help="What picks best.pt: the best val qwk, accuracy or loss; "
                                                    "last: the final epoch (nothing chosen on validation).")] = "qwk",
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
    config: ConfigOpt = None,
    project: ProjectOpt = "runs",
    name: Annotated[str, typer.Option(help="Run name; taken names get a number (train2, train3).")] = "train",
    force: Annotated[bool, typer.Option("--force", help="Reuse runs/NAME even if it exists.")] = False,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this folder where it stopped.")] = None,
    list_archs: Annotated[bool, typer.Option("--list-archs", help="List architectures and exit.")] = False,
    json_out: JsonOpt = False,
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

        with display.event_bars(common.err_console if json_out else common.console, "img") as events:
            if seeds is not None:
                from retinocli.engine.seeds import parse_seeds, train_seeds

                study = train_seeds(cfg, parse_seeds(seeds), force=force, events=events)
            else:
                from retinocli.engine.trainer import train as run_training

                result = run_training(cfg, resume=resume, force=force, events=events)

    if seeds is not None:
        _show_seeds(study, json_out)
    else:
        _show_run(result, json_out)


def _show_run(result, json_out: bool) -> None:
    """One run's summary (or JSON), exit 130 if it was interrupted, and the next command."""
    from retinocli.reporting import render as display

    if json_out:
        sys.stdout.write(json.dumps({"run_dir": str(result.run_dir), "epochs": result.epochs_done,
                                     "best_epoch": result.best_epoch, "best": result.best_metrics,
                                     "stop": result.stop, "stopped": result.stopped, "notes": result.notes,
                                     "warnings": result.warnings, "interrupted": result.interrupted,
                                     "history": result.history}, indent=2) + "\n")
    else:
        display.render_training(result, common.console)
    if result.interrupted:  # 130, as a shell reports Ctrl-C, so `set -e` scripts stop here
        common.err_console.print(f"[bold red]interrupted:[/] {escape(result.stopped)}", highlight=False,
                                 soft_wrap=True)
        raise typer.Exit(130)
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    if not json_out and result.best_epoch and "evaluate" in commands:
        split = "" if result.evaluate_split == "test" else f" --split {result.evaluate_split}"
        common.console.print(f"Next: [bold]retino evaluate {escape(str(result.run_dir))}{split}[/]", soft_wrap=True)


#: the recipe keys compare's grid sets itself (--arch, --pretrained), refused in its --config
GRID_KEYS = ("arch", "pretrained", "weights")


def _train_config(ctx: typer.Context, config: Path | None, *, grid: bool = False):
    """The run's settings: every option of the command that is a :class:`TrainConfig` field, and
    the values of the ``--config`` file where the command line did not name the option. For
    ``compare`` (``grid``) its own ``--arch`` and ``--pretrained`` are the grid's, not settings;
    the recipe's arch and weights are refused (the grid sets them) and its name is not used
    (``--name`` names the comparison, the grid its runs)."""
    from retinocli.config import TrainConfig
    from retinocli.models.registry import check_arch

    fields = TrainConfig.__dataclass_fields__
    values = {k: v for k, v in ctx.params.items() if k in fields and not (grid and k in GRID_KEYS)}
    for key in ("data", "images"):  # paths as config.json keeps them
        values[key] = str(values[key]) if values[key] is not None else None
    if config is not None:
        values["recipe"] = str(config)
        for key, value in TrainConfig.from_file(config).items():
            if grid and key in GRID_KEYS:
                raise RetinoError(f"--config {config}: {key!r} is set by compare's grid (--arch, --pretrained), "
                                  f"not by the recipe; remove it from the file")
            if grid and key == "name":
                continue
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
        display.render_seeds(study, common.console)
    if study.interrupted:
        common.err_console.print(f"[bold red]interrupted:[/] {escape(study.interrupted)}; run the same command again "
                          "to continue the seeds", highlight=False, soft_wrap=True)
        raise typer.Exit(130)


@app.command()
def compare(
    ctx: typer.Context,
    data: DataOpt = Path("data"),
    layout: LayoutOpt = None,
    images: ImagesOpt = None,
    arch: Annotated[Optional[list[str]], typer.Option(help="Architecture; repeat for several.")] = None,
    pretrained: Annotated[str, typer.Option(help="yes, no or both (ImageNet weights and scratch).")] = "both",
    mode: ModeOpt = "finetune",
    img_size: ImgSizeOpt = 512,
    preprocess: PreprocessOpt = "none",
    augment: AugmentOpt = "light",
    epochs: EpochsOpt = 10,
    batch_size: BatchSizeOpt = 64,
    lr: LrOpt = None,
    class_weights: ClassWeightsOpt = "none",
    seed: SeedOpt = 0,
    seeds: Annotated[Optional[str], typer.Option(help="Train every cell once per seed, e.g. 0,1,2 (runs "
                                                      "CELL-s0, ...): the report gives mean ± sd and paired "
                                                      "comparisons.")] = None,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML file of train options every cell shares (a "
                                                        "recipe: head, EMA, ...); options given here override "
                                                        "it, the grid sets arch and weights.")] = None,
    split: Annotated[str, typer.Option(help="Split each run is evaluated on.")] = "test",
    tta: Annotated[bool, typer.Option("--tta", help="Evaluate with test-time augmentation.")] = False,
    project: ProjectOpt = "runs",
    name: Annotated[str, typer.Option(help="Folder of this comparison under --project.")] = "compare",
    force: Annotated[bool, typer.Option("--force", help="Start the comparison again from scratch.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Train every arch with and without ImageNet weights, evaluate each, write one report (resumable)."""
    from retinocli.reporting.compare import compare as run_compare
    from retinocli.reporting import render as display

    with user_errors():
        if seeds is not None:
            from retinocli.engine.seeds import parse_seeds

            _check_seeds(ctx, seeds, None)
        base = _train_config(ctx, config, grid=True)
        with display.event_bars(common.err_console if json_out else common.console, "img") as events:
            result = run_compare(base, arch or ["resnet18", "resnet50"], pretrained=pretrained, split=split,
                                 tta=tta, force=force, events=events,
                                 seeds=parse_seeds(seeds) if seeds is not None else None)
    if json_out:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    for line in result.done + [f"[yellow]note:[/] {n}" for n in result.notes]:
        common.console.print(line)
    print_differences(result.differences)
    if result.study is not None:
        display.render_study(result.study, common.console)
    common.console.print(f"Report: [bold]{result.markdown}[/]")


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
    common.console.print(table)
