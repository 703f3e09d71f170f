"""The training loop: data, model, optimiser, AMP, channels_last, DDP, checkpoints, history.

Reads top to bottom: :func:`train` sets up and runs epochs of :func:`train_one_epoch` and
:func:`evaluate`, writing the run folder's config, split, history and checkpoints through :class:`RunDir`.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from retinocli import GRADE_NAMES, NUM_GRADES, __version__
from retinocli.reporting import metrics
from retinocli.engine.augment import BatchAugment
from retinocli.engine.checkpoints import load_resume_state, model_state, save_checkpoint, training_state
from retinocli.config import TrainConfig
from retinocli.engine.dataset import (IGNORE, EpochSampler, FundusDataset, class_weights, default_workers,
                            make_loader, sample_weights, training_split)
from retinocli.errors import RetinoError
from retinocli.models.grading import Grader, fit_grader
from retinocli.models.heads import HeadLoss, rough_grades
from retinocli.engine.regularize import BatchMix, make_ema
from retinocli.models.registry import create_model, freeze_backbone, set_train_mode, use_small_stem
from retinocli.imaging.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from retinocli.rundir import RunDir

LOG_EVERY = 10  # steps between progress updates: the only host-device syncs in an epoch


class StopTraining(Exception):
    """Raised inside the loop to end training early with a message (NaN loss)."""


@dataclass
class RunResult:
    run_dir: Path
    epochs_done: int
    best_epoch: int | None
    best_metrics: dict
    history: list[dict]
    stopped: str = "completed"
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False  # Ctrl-C: the CLI exits 130 so scripts stop too
    warnings: list[str] = field(default_factory=list)
    evaluate_split: str = "test"  # the split `retino evaluate` should score: val when there is no test split


# ---------------------------------------------------------------------------- set-up


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA (this rank's GPU), then MPS, then CPU; anything named must exist."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise RetinoError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RetinoError(f"--device {spec}: CUDA is not available on this machine")
        device = with_index(device, local_rank)
        if device.index >= torch.cuda.device_count():
            raise RetinoError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RetinoError("--device mps: MPS is not available on this machine")
    return device


def with_index(device: torch.device, local_rank: int = 0) -> torch.device:
    """``cuda`` -> ``cuda:<local rank>``: torch.cuda.set_device and DDP need the index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


def amp_dtype_for(device: torch.device) -> torch.dtype:
    """Mixed precision's dtype: bf16 (no grad scaler needed), fp16 on GPUs without bf16."""
    return torch.bfloat16 if (device.type != "cuda" or torch.cuda.is_bf16_supported()) else torch.float16


def versions(device: torch.device) -> dict:
    import torchvision

    # str(): torch.__version__ is a TorchVersion, which the weights_only unpickler refuses
    out = {"retino": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
           "python": platform.python_version(), "device": str(device),
           # the machine the wall times in history.csv were measured on (RESULTS.md quotes it)
           "machine": f"{platform.system()} {platform.machine()}", "cpus": os.cpu_count(),
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["cuda"] = str(torch.version.cuda)
    return out


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step multiplier: linear warm-up, then cosine, step or constant."""
    total = cfg.epochs * steps_per_epoch
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    step_size = cfg.step_size or max(1, cfg.epochs // 3)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.scheduler == "cosine":
            t = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if cfg.scheduler == "step":
            return 0.1 ** ((step // steps_per_epoch) // step_size)
        return 1.0

    return f


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """No weight decay on biases and batch-norm parameters (they set scale, not capacity)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate)


def squashed_note(paths: list[str], cfg: TrainConfig, sample: int = 20) -> list[str]:
    """A note when ``--preprocess none`` will squash non-square photos (3:2 cameras) to a square."""
    if cfg.preprocess != "none":
        return []
    from PIL import Image

    sizes = []
    for path in paths[:sample]:
        try:
            with Image.open(path) as im:  # the header only
                sizes.append(im.size)
        except Exception:  # noqa: BLE001 - unreadable files are counted elsewhere
            continue
    odd = [(w, h) for w, h in sizes if abs(w / h - 1) > 0.02]
    if not odd:
        return []
    w, h = odd[0]
    return [f"{len(odd)} of the first {len(sizes)} training images are not square (e.g. {w}x{h}): --preprocess "
            f"none squashes them to {cfg.img_size}x{cfg.img_size}; --preprocess crop crops to the fundus and pads "
            "it square"]


def preprocess_of(cfg: TrainConfig) -> Preprocess:
    return Preprocess(size=cfg.img_size, mode=cfg.preprocess, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _distributed() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) under torchrun, even with one process; else None.

    One process under torchrun still runs DistributedDataParallel, so the multi-GPU code
    path can be tried on a machine with one GPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA out of memory, however it surfaced: torch's own error, cuDNN or cuBLAS failing to
    allocate, or torch.compile wrapping one of those."""
    while exc is not None:
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        text = str(exc)
        if isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "_ALLOC_FAILED" in text):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def out_of_memory_error(cfg: TrainConfig, done: int, run_dir: Path | None) -> RetinoError:
    kept = (f"; {RunDir(run_dir).last} keeps epoch {done}, but a resumed run keeps its batch size"
            if done and run_dir is not None else "")
    return RetinoError(f"CUDA ran out of memory at --batch-size {cfg.batch_size} ({cfg.arch}, {cfg.img_size}px); "
                       f"try --batch-size {max(1, cfg.batch_size // 2)} or a smaller --img-size{kept}")


# ---------------------------------------------------------------------------- epochs


def to_input(images: torch.Tensor, device: torch.device, mean: torch.Tensor, std: torch.Tensor,
             channels_last: bool, augment: BatchAugment | None = None, step: int = 0) -> torch.Tensor:
    """uint8 NCHW on the host -> (augmented) normalised float on the device: (x / 255 - mean) / std.

    ``augment`` turns the batch on the device; its parameters come from its seed, its epoch
    and ``step``.
    """
    x = images.to(device, non_blocking=True).float().div_(255)
    if augment is not None:
        x = augment(x, step)
    x = x.sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, *, device, autocast,
                    mean, std, channels_last, progress=None, augment: BatchAugment | None = None,
                    head: str = "classification", mix: BatchMix | None = None, ema=None) -> dict:
    """One pass over the training loader; returns loss, accuracy, images and seconds.

    ``augment`` (already set to this epoch) augments each batch on the device; ``mix``
    (also set to this epoch) mixes it; ``ema`` is updated after every optimiser step.
    """
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = torch.zeros((), device=device, dtype=torch.long)
    skipped = torch.zeros((), device=device, dtype=torch.long)
    processed = 0  # images through the model, drop_last included: what images/s counts
    start = time.perf_counter()
    for step, (images, targets) in enumerate(loader, 1):
        processed += len(targets)
        x = to_input(images, device, mean, std, channels_last, augment, step)
        y = targets.to(device, non_blocking=True)
        if mix is not None:
            x, y_a, y_b, lam = mix(x, y, step)
        with autocast():
            logits = model(x)
            if mix is not None:
                loss = lam * criterion(logits.float(), y_a) + (1 - lam) * criterion(logits.float(), y_b)
            else:
                loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        valid = y != IGNORE
        n = valid.sum()
        loss_sum += loss.detach() * n
        correct += ((rough_grades(head, logits) == y) & valid).sum()
        seen += n
        skipped += (~valid).sum()
        if step % LOG_EVERY == 0 or step == len(loader):
            total_loss, total_seen = loss_sum.item(), max(1, seen.item())
            if not math.isfinite(total_loss):
                raise StopTraining(f"the training loss became {total_loss} at step {step}")
            if progress:
                progress(step, total_loss / total_seen, correct.item() / total_seen)
    seconds = time.perf_counter() - start
    n_seen = max(1, int(seen.item()))
    return {"loss": loss_sum.item() / n_seen, "accuracy": correct.item() / n_seen,
            "images": processed, "seconds": seconds,
            "unreadable": int(skipped.item())}


@torch.no_grad()
def predict_loader(model, loader, *, device, autocast, mean, std, channels_last) -> tuple[np.ndarray, np.ndarray]:
    """(targets, raw head outputs) over a loader, in the loader's order (see retinocli.models.grading)."""
    model.eval()
    targets, outputs = [], []
    for images, y in loader:
        x = to_input(images, device, mean, std, channels_last)
        with autocast():
            logits = model(x)
        outputs.append(logits.float().cpu())
        targets.append(y)
    if not outputs:
        return np.zeros(0, np.int64), np.zeros((0, NUM_GRADES), np.float32)
    return torch.cat(targets).numpy(), torch.cat(outputs).numpy()


def validation_metrics(y: np.ndarray, probs: np.ndarray, grader: Grader | None = None) -> dict:
    """Loss (NLL of the grade probabilities), accuracy, QWK and balanced accuracy over the readable
    images; ``grader`` turns probabilities into grades (None: argmax)."""
    keep = y != IGNORE
    y, probs = y[keep], probs[keep]
    if len(y) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "qwk": float("nan"), "balanced_accuracy": float("nan")}
    pred = (grader or Grader()).grades(probs)
    loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
    # plain floats: numpy scalars would not pass the weights_only unpickler
    return {"loss": loss, "accuracy": float(metrics.accuracy(y, pred)),
            "qwk": float(metrics.quadratic_weighted_kappa(y, pred)),
            "balanced_accuracy": float(metrics.balanced_accuracy(y, pred))}


def _better(metric: str, new: dict, best: dict | None) -> bool:
    if best is None:
        return True
    a, b = new[metric], best[metric]
    if not math.isfinite(a):
        return False
    if not math.isfinite(b):
        return True
    return a < b if metric == "loss" else a > b


# ---------------------------------------------------------------------------- main


def train(cfg: TrainConfig | None = None, *, resume: str | Path | None = None, force: bool = False,
          console=None, on_epoch_end: Callable[[int, dict], None] | None = None) -> RunResult:
    """Train a grader; with ``resume`` continue the run in that folder where it stopped.

    Args:
        cfg: the settings (ignored when resuming: the run's own config is used).
        resume: a run folder or its last.pt.
        force: reuse ``runs/<name>`` even if it exists.
        console: a rich console for progress and messages (None: silent).
        on_epoch_end: called with (epoch, history row) after each epoch's checkpoint.
    """
    from rich.markup import escape

    from retinocli.reporting.render import progress_bar
    from retinocli.data.layouts import load_dataset

    ddp = _distributed()
    rank, world, local_rank = ddp or (0, 1, 0)
    state = None
    if resume is not None:
        resume = Path(resume)
        ckpt_path = RunDir.resume_checkpoint(resume)
        state = load_resume_state(ckpt_path)
        cfg = TrainConfig.from_dict(state["config"])
        if state["epoch"] >= cfg.epochs:
            raise RetinoError(f"{ckpt_path} already finished all {cfg.epochs} epochs")
    assert cfg is not None
    say = console.print if (console is not None and rank == 0) else (lambda *a, **k: None)
    if state is not None:
        say(f"Resuming {ckpt_path} after epoch {state['epoch']} of {cfg.epochs}, with the run's own settings")

    device = pick_device(cfg.device, local_rank)
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    amp_dtype = amp_dtype_for(device)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # Data
    ds = load_dataset(cfg.data, layout=cfg.layout, images=cfg.images)
    records, notes = training_split(ds.records, cfg.val_fraction, cfg.seed)
    prep = preprocess_of(cfg)
    train_rec = records[records["split"] == "train"]
    val_rec = records[records["split"] == "val"]
    train_grades = train_rec["grade"].astype(int).tolist()
    on_device = cfg.augment_on == "device"
    train_set = FundusDataset(train_rec["path"].tolist(), train_grades, prep, "none" if on_device else cfg.augment)
    batch_augment = BatchAugment(cfg.augment, seed=cfg.seed, rank=rank) if on_device else None
    val_set = FundusDataset(val_rec["path"].tolist(), val_rec["grade"].astype(int).tolist(), prep, "none")
    workers = cfg.workers if cfg.workers is not None else default_workers(device.type)
    weights = sample_weights(train_grades) if cfg.sampler == "balanced" else None
    train_sampler = EpochSampler(len(train_set), seed=cfg.seed, weights=weights, rank=rank, world=world)
    val_sampler = EpochSampler(len(val_set), shuffle=False, rank=rank, world=world, pad=False)
    pin = device.type == "cuda"
    drop_last = len(train_sampler) > cfg.batch_size
    train_loader = make_loader(train_set, train_sampler, batch_size=cfg.batch_size, workers=workers,
                               pin_memory=pin, drop_last=drop_last)
    val_loader = make_loader(val_set, val_sampler, batch_size=cfg.batch_size, workers=workers, pin_memory=pin)
    if len(train_loader) == 0:
        raise RetinoError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set)} training images")
    if len(val_set) == 0:
        raise RetinoError(f"no validation images: the split gave {len(train_set)} train and 0 val images "
                          f"(--val-fraction {cfg.val_fraction} of too few patients per grade); pass a larger "
                          "--val-fraction, e.g. 0.2, or give the dataset a val split")
    dropped = len(train_sampler) % cfg.batch_size if drop_last else 0
    notes += squashed_note(train_rec["path"].tolist(), cfg) if rank == 0 else []

    for note in ds.notes + notes:
        say(f"[dim]note:[/] {note}")

    # Model
    small = use_small_stem(cfg.stem, cfg.img_size, cfg.pretrained)
    model = create_model(cfg.arch, weights=None if state else cfg.weights, small_stem=small, head=cfg.head,
                         pool=cfg.pool)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:  # the weights of another arch or head size than its config says
            raise RetinoError(f"{ckpt_path}: cannot resume, its weights do not fit {cfg.arch} with "
                              f"{NUM_GRADES} grades ({str(exc).strip().splitlines()[0][:160]})") from None
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    core = model
    ema = make_ema(core, cfg.ema) if cfg.ema > 0 else None  # validated, saved and exported in place of core
    if ema is not None and state is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    mix = BatchMix(mixup=cfg.mixup, cutmix=cfg.cutmix, seed=cfg.seed, rank=rank) if cfg.mixup or cfg.cutmix else None
    grader = Grader(cfg.head, NUM_GRADES)
    if ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)

    optimizer = build_optimizer(cfg, core)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, len(train_loader)))
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)
    weight = class_weights(train_grades, cfg.class_weights)
    criterion = HeadLoss(cfg.head, weight=weight.to(device) if weight is not None else None,
                         label_smoothing=cfg.label_smoothing, ignore_index=IGNORE)
    mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, device=device).view(1, 3, 1, 1)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp else nullcontext()

    history: list[dict] = []
    best: dict | None = None
    best_epoch = None
    start_epoch = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        history = list(state.get("history", []))
        best, best_epoch = state.get("best_metrics"), state.get("best_epoch")
        grader = Grader.from_dict(state.get("grader")) if state.get("grader") else grader
        start_epoch = int(state["epoch"])
        run_dir = ckpt_path.parent
        if rank == 0:
            RunDir(run_dir).remove_temporaries()
    else:
        run_dir = RunDir.create(cfg.project, cfg.name, force=force).path if rank == 0 else None
        if ddp:
            box = [str(run_dir) if run_dir else None]
            dist.broadcast_object_list(box, src=0)
            run_dir = Path(box[0])
    run_dir = Path(run_dir)
    run = RunDir(run_dir)

    device_info = versions(device)
    if rank == 0 and state is None:
        run.write_config(
            {**cfg.to_dict(), "command": cfg.command_line(), "learning_rate": cfg.learning_rate, "small_stem": small,
             "parameters": sum(p.numel() for p in core.parameters()), "amp": amp,
             "amp_dtype": str(amp_dtype).removeprefix("torch.") if amp else None,
             "channels_last": channels_last, "workers": workers, "world_size": world,
             "distributed": bool(ddp),
             "versions": device_info, "dataset": {"root": str(ds.root), "layout": ds.layout}})
        run.write_split(records)

    say(f"Training [bold]{cfg.arch}[/] ({'weights ' + cfg.weights if cfg.weights else 'from scratch'}, "
        f"{cfg.mode}) on {device_info.get('gpu', device)} | {len(train_set)} train / {len(val_set)} val images "
        f"at {cfg.img_size}px | amp {'on (' + str(amp_dtype).removeprefix('torch.') + ')' if amp else 'off'}, "
        f"channels_last {'on' if channels_last else 'off'}")
    if dropped:
        say(f"Each epoch trains on {len(train_sampler) - dropped} of {len(train_sampler)} images: full batches "
            f"of {cfg.batch_size} only; the {dropped} left over are a different {dropped} each epoch")
    say(f"Run folder: {escape(str(run_dir))}")

    def checkpoint(epoch: int, row_metrics: dict, *, resumable: bool) -> dict:
        """best.pt's model (MODEL_KEYS); with ``resumable`` also last.pt's training state."""
        served = ema.module if ema is not None else core
        state = model_state(model=(core if resumable else served).state_dict(), epoch=epoch,
                            config=cfg.to_dict(), class_names=list(GRADE_NAMES), preprocess=prep.to_dict(),
                            small_stem=small, metrics=row_metrics, versions=device_info, grader=grader.to_dict())
        if not resumable:
            return state
        return training_state(state, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                              scaler=scaler.state_dict(), rng={"torch": torch.get_rng_state()},
                              best_metrics=best, best_epoch=best_epoch, history=history,
                              ema=ema.state_dict() if ema is not None else None)

    stopped = "completed"
    interrupted = False
    epoch = start_epoch
    unreadable = 0  # images per epoch that could not be decoded (counted in any worker)
    bar_ctx = progress_bar(console, "img") if (console is not None and rank == 0) else nullcontext()
    try:
        with bar_ctx as bar:
            for epoch in range(start_epoch, cfg.epochs):
                frozen = cfg.mode == "linear" or (cfg.mode == "two-stage" and epoch < cfg.head_epochs)
                freeze_backbone(core, frozen)
                set_train_mode(core, backbone_frozen=frozen)
                train_sampler.set_epoch(epoch)
                if batch_augment is not None:
                    batch_augment.set_epoch(epoch)
                if mix is not None:
                    mix.set_epoch(epoch)
                task = None
                if bar is not None:
                    task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", line_at_stop=True,
                                        total=len(train_loader) * cfg.batch_size, postfix="")

                epoch_start = time.perf_counter()

                def show(step, loss, acc, task=task, epoch_start=epoch_start):
                    if task is not None:  # counted in images; the rate is the epoch's so far, as history's
                        # (rich's own estimate read 2,210 img/s for a 75 img/s epoch, from the prefetch queue)
                        done = step * cfg.batch_size
                        bar.update(task, completed=done, postfix=f"loss {loss:.3f} acc {acc:.1%}",
                                   rate=done * world / max(time.perf_counter() - epoch_start, 1e-9))

                try:
                    tr = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, scaler,
                                         device=device, autocast=autocast, mean=mean, std=std,
                                         channels_last=channels_last, progress=show, augment=batch_augment,
                                         head=cfg.head, mix=mix, ema=ema)
                    y, raw = predict_loader(ema if ema is not None else model, val_loader, device=device,
                                            autocast=autocast, mean=mean, std=std, channels_last=channels_last)
                except (RuntimeError, MemoryError) as exc:
                    if not is_out_of_memory(exc):
                        raise
                    raise out_of_memory_error(cfg, len(history), run_dir) from None
                if ddp:
                    parts = [None] * world
                    dist.all_gather_object(parts, (y, raw))
                    y = np.concatenate([p[0] for p in parts])
                    raw = np.concatenate([p[1] for p in parts])
                # cut points (regression, ordinal) are fitted on this epoch's validation outputs
                readable = y != IGNORE
                grader = fit_grader(cfg.head, raw[readable], y[readable], NUM_GRADES)
                probs = grader.probabilities(raw)
                val = validation_metrics(y, probs, grader)
                unreadable = max(unreadable, tr["unreadable"] + int((y == IGNORE).sum()))
                row = {"epoch": epoch + 1, "seconds": round(tr["seconds"], 3),
                       "lr": optimizer.param_groups[0]["lr"], "train_loss": tr["loss"],
                       "train_accuracy": tr["accuracy"], "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                       "val_qwk": val["qwk"], "val_balanced_accuracy": val["balanced_accuracy"],
                       "images_per_second": round(tr["images"] * world / max(tr["seconds"], 1e-9), 1)}
                history.append(row)
                improved = _better(cfg.select_metric, val, best)
                if improved:
                    best, best_epoch = val, epoch + 1
                if rank == 0:
                    if improved:
                        save_checkpoint(checkpoint(epoch + 1, val, resumable=False), run.best)
                    save_checkpoint(checkpoint(epoch + 1, val, resumable=True), run.last)
                    run.write_history(history)
                if task is not None:  # every column of history.csv, so a log holds the whole epoch
                    bar.update(task, rate=row["images_per_second"], postfix=(
                        f"loss {tr['loss']:.3f} acc {tr['accuracy']:.1%} | lr {row['lr']:.2e} | val loss "
                        f"{val['loss']:.3f} acc {val['accuracy']:.1%} qwk {val['qwk']:.3f} bal acc "
                        f"{val['balanced_accuracy']:.1%}{' | best so far' if improved else ''}"))
                    bar.stop_task(task)
                if on_epoch_end is not None:
                    on_epoch_end(epoch + 1, row)
                if cfg.patience and best_epoch is not None and epoch + 1 - best_epoch >= cfg.patience:
                    stopped = f"early stop: no better val {cfg.select_metric} for {cfg.patience} epochs"
                    break
    except StopTraining as exc:
        stopped = f"{exc}; stopped, {RunDir.LAST} and {RunDir.BEST} keep the last good epoch ({epoch})"
    except KeyboardInterrupt:
        interrupted = True
        if history:
            stopped = (f"interrupted during epoch {epoch + 1}; {RunDir.LAST} holds epoch {len(history)}; "
                       f"continue with: retino train --resume {run_dir}")
        else:
            stopped = f"interrupted during epoch {epoch + 1}, before any epoch was saved; start again"
    finally:
        if ddp and dist.is_initialized():
            dist.destroy_process_group()
    failures = train_set.failures + val_set.failures  # paths are known only without worker processes
    result_notes = []
    warnings = []
    if best:
        grade, bar_acc = metrics.majority_baseline(val_rec["grade"].astype(int).to_numpy())
        if best["accuracy"] <= bar_acc + 0.01:
            warnings.append(f"the best validation accuracy, {best['accuracy']:.1%}, is no better than always "
                            f"answering {GRADE_NAMES[grade]} ({bar_acc:.1%} of the validation images): "
                            "this model has not learnt to grade yet")
    if unreadable:
        example = f", e.g. {failures[0][1]}" if failures else ""  # the reason names the file
        result_notes.append(f"{unreadable} image(s) per epoch could not be read and were skipped{example}")
    return RunResult(run_dir=run_dir, epochs_done=len(history), best_epoch=best_epoch, best_metrics=best or {},
                     history=history, stopped=stopped, notes=result_notes, interrupted=interrupted,
                     warnings=warnings, evaluate_split="test" if (records["split"] == "test").any() else "val")
