"""The training loop: epochs of training and validation, the grader, history and checkpoints.

Reads top to bottom: :func:`train` chooses where to run (:mod:`retinocli.engine.placement`),
builds the data and the model (:mod:`retinocli.engine.parts`), and runs epochs of
:func:`train_one_epoch` and :func:`predict_loader`, writing the run folder's config, split,
history and checkpoints through :class:`RunDir`. Progress and messages go out as
:mod:`retinocli.events`; nothing here draws on a terminal.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from retinocli import GRADE_NAMES, NUM_GRADES
from retinocli.config import TrainConfig
from retinocli.engine.augment import BatchAugment, auto_augment_on
from retinocli.engine.jpeg_decode import check_gpu_decode
from retinocli.engine.checkpoints import load_resume_state, model_state, save_checkpoint, training_state
from retinocli.engine.dataset import IGNORE
from retinocli.engine.parts import Data, Parts, build_data, build_parts, preprocess_of, restore
from retinocli.engine.placement import Placement, versions
from retinocli.errors import RetinoError
from retinocli.events import Emitter, EventsLike, emitter
from retinocli.models.freeze import freeze_grader
from retinocli.models.grading import Grader
from retinocli.models.heads import rough_grades
from retinocli.models.registry import freeze_backbone, set_train_mode
from retinocli.reporting import metrics
from retinocli.rundir import RunDir, improves

LOG_EVERY = 10  # steps between progress updates: the only host-device syncs in an epoch


class StopTraining(Exception):
    """Raised inside the loop to end training early with a message (NaN loss)."""


STOP_REASONS = ("completed", "patience", "diverged", "interrupted")


@dataclass
class RunResult:
    run_dir: Path
    epochs_done: int
    best_epoch: int | None
    best_metrics: dict
    history: list[dict]
    stop: str = "completed"  # why it ended: one of STOP_REASONS
    stopped: str = "completed"  # the same for a person: what happened and what to do next
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False  # Ctrl-C: the CLI exits 130 so scripts stop too
    warnings: list[str] = field(default_factory=list)
    evaluate_split: str = "test"  # the split `retino evaluate` should score: val when there is no test split


# ---------------------------------------------------------------------------- set-up


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
    and ``step``. Under ``--decode gpu`` ``images`` is a :class:`retinocli.engine.jpeg_decode.JpegBatch`,
    whose ``.to(device)`` decodes it there.
    """
    x = images.to(device, non_blocking=True)
    x = augment(x, step) if augment is not None else x.float().div_(255)
    x = x.sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_one_epoch(parts: Parts, loader, place: Placement, *, augment: BatchAugment | None = None,
                    head: str = "classification", progress=None) -> dict:
    """One pass over the training loader; returns loss, accuracy, images and seconds.

    ``augment`` (already set to this epoch) augments each batch on the device; ``parts.mix``
    (also set to this epoch) mixes it; ``parts.ema`` is updated after every optimiser step.
    ``progress`` is called with (step, mean loss, accuracy) every ``LOG_EVERY`` steps.
    """
    model, criterion, optimizer, scheduler, scaler = (parts.model, parts.criterion, parts.optimizer,
                                                      parts.scheduler, parts.scaler)
    mix, ema, device = parts.mix, parts.ema, place.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = torch.zeros((), device=device, dtype=torch.long)
    skipped = torch.zeros((), device=device, dtype=torch.long)
    processed = 0  # images through the model, drop_last included: what images/s counts
    start = time.perf_counter()
    for step, (images, targets) in enumerate(loader, 1):
        processed += len(targets)
        x = to_input(images, device, parts.mean, parts.std, place.channels_last, augment, step)
        y = targets.to(device, non_blocking=True)
        if mix is not None:
            x, y_a, y_b, lam = mix(x, y, step)
        with place.autocast():
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
def predict_loader(model, loader, place: Placement, mean: torch.Tensor, std: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(targets, raw head outputs) over a loader, in the loader's order (see retinocli.models.grading)."""
    model.eval()
    targets, outputs = [], []
    for images, y in loader:
        x = to_input(images, place.device, mean, std, place.channels_last)
        with place.autocast():
            logits = model(x)
        outputs.append(logits.float().cpu())
        targets.append(y)
    if not outputs:
        return np.zeros(0, np.int64), np.zeros((0, NUM_GRADES), np.float32)
    return torch.cat(targets).numpy(), torch.cat(outputs).numpy()


def validation_metrics(y: np.ndarray, probs: np.ndarray, grader: Grader | None = None,
                       nll_probs: np.ndarray | None = None) -> dict:
    """Loss (NLL of ``nll_probs``, default ``probs``), accuracy, QWK and balanced accuracy over the
    readable images; ``grader`` turns probabilities into grades (None: argmax)."""
    keep = y != IGNORE
    nll = (probs if nll_probs is None else nll_probs)[keep]
    y, probs = y[keep], probs[keep]
    if len(y) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "qwk": float("nan"), "balanced_accuracy": float("nan")}
    pred = (grader or Grader()).grades(probs)
    loss = float(-np.log(np.clip(nll[np.arange(len(y)), y], 1e-12, None)).mean())
    # plain floats: numpy scalars would not pass the weights_only unpickler
    return {"loss": loss, "accuracy": float(metrics.accuracy(y, pred)),
            "qwk": float(metrics.quadratic_weighted_kappa(y, pred)),
            "balanced_accuracy": float(metrics.balanced_accuracy(y, pred))}


# ---------------------------------------------------------------------------- main


def train(cfg: TrainConfig | None = None, *, resume: str | Path | None = None, force: bool = False,
          events: EventsLike = None, on_epoch_end: Callable[[int, dict], None] | None = None) -> RunResult:
    """Train a grader; with ``resume`` continue the run in that folder where it stopped.

    Args:
        cfg: the settings (ignored when resuming: the run's own config is used).
        resume: a run folder or its last.pt.
        force: reuse ``runs/<name>`` even if it exists.
        events: a listener for progress and messages (see :mod:`retinocli.events`): one task per
            epoch, counted in images, whose closing fields carry the epoch's history row as text.
        on_epoch_end: called with (epoch, history row) after each epoch's checkpoint.
    """
    state, ckpt_path = None, None
    if resume is not None:
        ckpt_path = RunDir.resume_checkpoint(Path(resume))
        state = load_resume_state(ckpt_path)
        cfg = TrainConfig.from_dict(state["config"])
        if state["epoch"] >= cfg.epochs:
            raise RetinoError(f"{ckpt_path} already finished all {cfg.epochs} epochs")
    assert cfg is not None
    place = Placement.choose(cfg.device, amp=cfg.amp, channels_last=cfg.channels_last, distributed=True)
    if cfg.augment_on == "auto":
        cfg = dataclasses.replace(cfg, augment_on=auto_augment_on(place.device.type))
    if cfg.decode == "gpu":
        check_gpu_decode(place.device, preprocess_of(cfg), cfg.augment, cfg.augment_on)
    say = emitter(events) if place.is_main else Emitter()
    if state is not None:
        say.message(f"Resuming {ckpt_path} after epoch {state['epoch']} of {cfg.epochs}, with the run's own settings")
    if place.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if place.device.type == "cuda" else "gloo")
    if place.device.type == "cuda":
        torch.cuda.set_device(place.device)
    _seed_and_determinism(cfg, place)

    data = build_data(cfg, place)
    for note in data.ds.notes + data.notes:
        say.message(note, level="note")
    parts = build_parts(cfg, place, data, state, ckpt_path)
    if state is not None:
        restore(parts, state)
        run = RunDir(ckpt_path.parent)
        if place.is_main:
            run.remove_temporaries()
    else:
        run = RunDir(_new_run_dir(cfg, place, force))
    loop = _Loop(cfg, place, data, parts, run, state, say)
    if place.is_main and state is None:
        run.write_config(loop.config_record())
        run.write_split(data.records)
    loop.announce()
    try:
        loop.run_epochs(on_epoch_end)
    finally:
        if place.distributed and dist.is_initialized():
            dist.destroy_process_group()
    return loop.result()


def _seed_and_determinism(cfg: TrainConfig, place: Placement) -> None:
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif place.device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _new_run_dir(cfg: TrainConfig, place: Placement, force: bool) -> Path:
    """``runs/<name>``, made by rank 0 and told to the other ranks."""
    run_dir = RunDir.create(cfg.project, cfg.name, force=force).path if place.is_main else None
    if place.distributed:
        box = [str(run_dir) if run_dir else None]
        dist.broadcast_object_list(box, src=0)
        run_dir = Path(box[0])
    return Path(run_dir)


class _Loop:
    """The epochs of one run: train, validate, fit the grader, keep history and checkpoints."""

    def __init__(self, cfg: TrainConfig, place: Placement, data: Data, parts: Parts, run: RunDir,
                 state: dict | None, say: Emitter):
        self.cfg, self.place, self.data, self.parts, self.run, self.say = cfg, place, data, parts, run, say
        self.device_info = versions(place.device)
        self.history: list[dict] = list(state.get("history", [])) if state else []
        self.best: dict | None = state.get("best_metrics") if state else None
        self.best_epoch: int | None = state.get("best_epoch") if state else None
        self.grader = Grader.from_dict(state["grader"]) if state and state.get("grader") else \
            Grader(cfg.head, NUM_GRADES)
        self.start_epoch = int(state["epoch"]) if state else 0
        self.epoch = self.start_epoch
        self.unreadable = 0  # images per epoch that could not be decoded (counted in any worker)
        self.freeze_notes: list[str] = []  # what the last epoch could not freeze on validation (#15)
        self.stop, self.stopped = "completed", "completed"
        self.interrupted = False

    def config_record(self) -> dict:
        """config.json: the settings and what they resolved to on this machine."""
        cfg, place, data = self.cfg, self.place, self.data
        return {**cfg.to_dict(), "command": cfg.command_line(), "learning_rate": cfg.learning_rate, "small_stem": self.parts.small_stem,
                "parameters": sum(p.numel() for p in self.parts.core.parameters()), "amp": place.amp,
                "amp_dtype": place.amp_name, "channels_last": place.channels_last, "workers": data.workers,
                "world_size": place.world, "distributed": place.distributed, "versions": self.device_info,
                "dataset": {"root": str(data.ds.root), "layout": data.ds.layout}}

    def announce(self) -> None:
        cfg, place, data, say = self.cfg, self.place, self.data, self.say
        say.message(f"Training {cfg.arch} ({'weights ' + cfg.weights if cfg.weights else 'from scratch'}, "
                    f"{cfg.mode}) on {self.device_info.get('gpu', place.device)} | {len(data.train_set)} train / "
                    f"{len(data.val_set)} val images at {cfg.img_size}px | amp "
                    f"{'on (' + place.amp_name + ')' if place.amp else 'off'}, "
                    f"channels_last {'on' if place.channels_last else 'off'}")
        if data.dropped:
            n = len(data.train_sampler)
            say.message(f"Each epoch trains on {n - data.dropped} of {n} images: full batches of {cfg.batch_size} "
                        f"only; the {data.dropped} left over are a different {data.dropped} each epoch")
        say.message(f"Run folder: {self.run.path}")

    def checkpoint(self, epoch: int, row_metrics: dict, *, resumable: bool) -> dict:
        """best.pt's model (MODEL_KEYS); with ``resumable`` also last.pt's training state."""
        parts = self.parts
        state = model_state(model=(parts.core if resumable else parts.served).state_dict(), epoch=epoch,
                            config=self.cfg.to_dict(), class_names=list(GRADE_NAMES), preprocess=self.data.prep.to_dict(),
                            small_stem=parts.small_stem, metrics=row_metrics, versions=self.device_info,
                            grader=self.grader.to_dict())
        if not resumable:
            return state
        return training_state(state, optimizer=parts.optimizer.state_dict(), scheduler=parts.scheduler.state_dict(),
                              scaler=parts.scaler.state_dict(), rng={"torch": torch.get_rng_state()},
                              best_metrics=self.best, best_epoch=self.best_epoch, history=self.history,
                              ema=parts.ema.state_dict() if parts.ema is not None else None)

    def run_epochs(self, on_epoch_end: Callable[[int, dict], None] | None) -> None:
        cfg, run = self.cfg, self.run
        try:
            for self.epoch in range(self.start_epoch, cfg.epochs):
                row = self.one_epoch(self.epoch)
                if on_epoch_end is not None:
                    on_epoch_end(self.epoch + 1, row)
                if cfg.patience and self.best_epoch is not None and self.epoch + 1 - self.best_epoch >= cfg.patience:
                    self.stop = "patience"
                    self.stopped = f"early stop: no better val {cfg.select_metric} for {cfg.patience} epochs"
                    break
        except StopTraining as exc:
            self.stop = "diverged"
            self.stopped = f"{exc}; stopped, {RunDir.LAST} and {RunDir.BEST} keep the last good epoch ({self.epoch})"
        except KeyboardInterrupt:
            self.interrupted, self.stop = True, "interrupted"
            if self.history:
                self.stopped = (f"interrupted during epoch {self.epoch + 1}; {RunDir.LAST} holds epoch "
                                f"{len(self.history)}; continue with: retino train --resume {run.path}")
            else:
                self.stopped = f"interrupted during epoch {self.epoch + 1}, before any epoch was saved; start again"

    def one_epoch(self, epoch: int) -> dict:
        """Train, validate, refit the grader, save; returns the epoch's history row."""
        cfg, place, data, parts, say = self.cfg, self.place, self.data, self.parts, self.say
        frozen = cfg.mode == "linear" or (cfg.mode == "two-stage" and epoch < cfg.head_epochs)
        freeze_backbone(parts.core, frozen)
        set_train_mode(parts.core, backbone_frozen=frozen)
        for schedule in (data.train_sampler, data.batch_augment, parts.mix):
            if schedule is not None:
                schedule.set_epoch(epoch)
        task = f"epoch {epoch + 1}/{cfg.epochs}"
        say.started(task, total=len(data.train_loader) * cfg.batch_size, line_at_stop=True)
        epoch_start = time.perf_counter()

        def show(step: int, loss: float, acc: float) -> None:
            # counted in images; the rate is the epoch's so far, as history's (a bar's own estimate
            # read 2,210 img/s for a 75 img/s epoch, from the prefetch queue)
            done = step * cfg.batch_size
            say.progressed_to(task, done, postfix=f"loss {loss:.3f} acc {acc:.1%}",
                              rate=done * place.world / max(time.perf_counter() - epoch_start, 1e-9))

        tr, y, raw = self._train_and_validate(show)
        # cut points, temperature, referral threshold and fusion (#14, #15) are fitted on this
        # epoch's validation outputs; val loss is the model's own (T = 1) NLL
        readable = y != IGNORE
        self.grader, self.freeze_notes = freeze_grader(
            cfg.head, raw[readable], y[readable], num_grades=NUM_GRADES, target_sensitivity=cfg.target_sensitivity,
            names=None if place.distributed else data.val_names[readable])
        val = validation_metrics(y, self.grader.probabilities(raw), self.grader,
                                 nll_probs=self.grader.uncalibrated(raw))
        self.unreadable = max(self.unreadable, tr["unreadable"] + int((y == IGNORE).sum()))
        row = {"epoch": epoch + 1, "seconds": round(tr["seconds"], 3),
               "lr": parts.optimizer.param_groups[0]["lr"], "train_loss": tr["loss"],
               "train_accuracy": tr["accuracy"], "val_loss": val["loss"], "val_accuracy": val["accuracy"],
               "val_qwk": val["qwk"], "val_balanced_accuracy": val["balanced_accuracy"],
               "images_per_second": round(tr["images"] * place.world / max(tr["seconds"], 1e-9), 1)}
        self.history.append(row)
        metric = cfg.select_metric
        kept = None if self.best is None else self.best.get(metric, math.nan)
        improved = improves(metric, val.get(metric, math.nan), kept)
        if improved:
            self.best, self.best_epoch = val, epoch + 1
        if place.is_main:
            if improved:
                save_checkpoint(self.checkpoint(epoch + 1, val, resumable=False), self.run.best)
            save_checkpoint(self.checkpoint(epoch + 1, val, resumable=True), self.run.last)
            self.run.write_history(self.history)
        # every column of history.csv, so a log holds the whole epoch
        say.finished(task, rate=row["images_per_second"], postfix=(
            f"loss {tr['loss']:.3f} acc {tr['accuracy']:.1%} | lr {row['lr']:.2e} | val loss "
            f"{val['loss']:.3f} acc {val['accuracy']:.1%} qwk {val['qwk']:.3f} bal acc "
            f"{val['balanced_accuracy']:.1%}{' | best so far' if improved and metric != 'last' else ''}"))
        return row

    def _train_and_validate(self, show) -> tuple[dict, np.ndarray, np.ndarray]:
        """One epoch of training, then the validation targets and raw outputs of every rank."""
        cfg, place, data, parts = self.cfg, self.place, self.data, self.parts
        try:
            tr = train_one_epoch(parts, data.train_loader, place, augment=data.batch_augment, head=cfg.head,
                                 progress=show)
            y, raw = predict_loader(parts.ema if parts.ema is not None else parts.model, data.val_loader, place,
                                    parts.mean, parts.std)
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            raise out_of_memory_error(cfg, len(self.history), self.run.path) from None
        if place.distributed:
            gathered = [None] * place.world
            dist.all_gather_object(gathered, (y, raw))
            y = np.concatenate([p[0] for p in gathered])
            raw = np.concatenate([p[1] for p in gathered])
        return tr, y, raw

    def result(self) -> RunResult:
        data, best = self.data, self.best
        failures = data.train_set.failures + data.val_set.failures  # paths are known only without worker processes
        notes, warnings = [], []
        if best:
            grade, bar_acc = metrics.majority_baseline(np.asarray(data.val_grades))
            if best["accuracy"] <= bar_acc + 0.01:
                warnings.append(f"the best validation accuracy, {best['accuracy']:.1%}, is no better than always "
                                f"answering {GRADE_NAMES[grade]} ({bar_acc:.1%} of the validation images): "
                                "this model has not learnt to grade yet")
        if self.unreadable:
            example = f", e.g. {failures[0][1]}" if failures else ""  # the reason names the file
            notes.append(f"{self.unreadable} image(s) per epoch could not be read and were skipped{example}")
        notes += self.freeze_notes  # after the unreadable images: what training could not freeze (#15)
        return RunResult(run_dir=self.run.path, epochs_done=len(self.history), best_epoch=self.best_epoch,
                         best_metrics=best or {}, history=self.history, stop=self.stop, stopped=self.stopped, notes=notes,
                         interrupted=self.interrupted, warnings=warnings,
                         evaluate_split="test" if (data.records["split"] == "test").any() else "val")
