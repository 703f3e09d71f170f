"""What a training run is made of, built once before the first epoch.

:func:`build_data` gives the split, datasets, samplers and loaders (:class:`Data`);
:func:`build_parts` the model and everything that updates it (:class:`Parts`): weight EMA,
mixup/cutmix, optimiser, schedule, grad scaler and loss. :mod:`retinocli.engine.trainer` runs
the epochs over them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from retinocli import NUM_GRADES
from retinocli.config import TrainConfig
from retinocli.engine.augment import BatchAugment
from retinocli.engine.dataset import (IGNORE, EpochSampler, FundusDataset, class_counts, class_weights, make_loader,
                                      sample_weights, training_split)
from retinocli.engine.placement import Placement
from retinocli.engine.regularize import BatchMix, make_ema
from retinocli.errors import RetinoError
from retinocli.imaging.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from retinocli.machine import loader_workers
from retinocli.models.heads import HeadLoss, coral_prior_bias
from retinocli.models.registry import create_model, use_small_stem

if TYPE_CHECKING:
    import pandas as pd

    from retinocli.data.layouts import Dataset


def preprocess_of(cfg: TrainConfig) -> Preprocess:
    return Preprocess(size=cfg.img_size, mode=cfg.preprocess, mean=IMAGENET_MEAN, std=IMAGENET_STD)


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
    """No weight decay on biases and batch-norm parameters (they set scale, not capacity).

    The fused implementation (one kernel over every parameter) where this torch and the model's
    device have it: an AdamW step of a ResNet18 on one CPU core took 894 ms with the default
    per-tensor loop, 463 ms with ``foreach`` and 11.6 ms fused (torch 2.14, 2026-11-28), which
    on small images is most of a training step. Elsewhere the default.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return _fused(torch.optim.SGD, groups, lr=cfg.learning_rate, momentum=cfg.momentum,
                      nesterov=cfg.momentum > 0)
    return _fused(torch.optim.AdamW, groups, lr=cfg.learning_rate)


def _fused(cls: type[torch.optim.Optimizer], groups: list[dict], **options) -> torch.optim.Optimizer:
    try:
        return cls(groups, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device without the fused kernel
        return cls(groups, **options)


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


@dataclass
class Data:
    """What one run trains and validates on, and how it is fed."""

    ds: Dataset
    records: pd.DataFrame  # every labelled image with its split (what split.csv holds)
    notes: list[str]
    prep: Preprocess
    train_grades: list[int]
    val_grades: list[int]
    val_names: np.ndarray  # image names in val_loader's order (not shuffled): patients for fusion
    train_set: FundusDataset
    val_set: FundusDataset
    train_sampler: EpochSampler
    train_loader: Any
    val_loader: Any
    batch_augment: BatchAugment | None  # augmentation on the device (``--augment-on device``)
    workers: int
    dropped: int  # images left out of each epoch by full batches only


def build_data(cfg: TrainConfig, place: Placement) -> Data:
    """The split (patients kept together), datasets, samplers and loaders of a run."""
    from retinocli.data.layouts import load_dataset

    ds = load_dataset(cfg.data, layout=cfg.layout, images=cfg.images)
    records, notes = training_split(ds.records, cfg.val_fraction, cfg.seed)
    prep = preprocess_of(cfg)
    train_rec = records[records["split"] == "train"]
    val_rec = records[records["split"] == "val"]
    train_grades = train_rec["grade"].astype(int).tolist()
    val_grades = val_rec["grade"].astype(int).tolist()
    val_names = val_rec["image"].astype(str).to_numpy()
    on_device = cfg.augment_on == "device"
    train_set = FundusDataset(train_rec["path"].tolist(), train_grades, prep, "none" if on_device else cfg.augment,
                              engine="opencv" if cfg.augment_on == "opencv" else "torchvision")
    batch_augment = BatchAugment(cfg.augment, seed=cfg.seed, rank=place.rank) if on_device else None
    val_set = FundusDataset(val_rec["path"].tolist(), val_grades, prep, "none")
    collate = None
    if cfg.decode == "gpu":  # workers read JPEG bytes; JpegBatch.to(device) decodes them (engine/jpeg_decode.py)
        from retinocli.engine.jpeg_decode import JpegBytesDataset, JpegCollate

        train_set = JpegBytesDataset(train_set.paths, train_set.grades, prep)
        val_set = JpegBytesDataset(val_set.paths, val_set.grades, prep)
        collate = JpegCollate(prep.size, prep.interpolation)
    workers = cfg.workers if cfg.workers is not None else loader_workers(place.device.type)
    weights = sample_weights(train_grades) if cfg.sampler == "balanced" else None
    train_sampler = EpochSampler(len(train_set), seed=cfg.seed, weights=weights, rank=place.rank, world=place.world)
    val_sampler = EpochSampler(len(val_set), shuffle=False, rank=place.rank, world=place.world, pad=False)
    pin = place.device.type == "cuda"
    drop_last = len(train_sampler) > cfg.batch_size
    train_loader = make_loader(train_set, train_sampler, batch_size=cfg.batch_size, workers=workers,
                               pin_memory=pin, drop_last=drop_last, collate_fn=collate)
    val_loader = make_loader(val_set, val_sampler, batch_size=cfg.batch_size, workers=workers, pin_memory=pin,
                             collate_fn=collate)
    if len(train_loader) == 0:
        raise RetinoError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set)} training images")
    if len(val_set) == 0:
        raise RetinoError(f"no validation images: the split gave {len(train_set)} train and 0 val images "
                          f"(--val-fraction {cfg.val_fraction} of too few patients per grade); pass a larger "
                          "--val-fraction, e.g. 0.2, or give the dataset a val split")
    dropped = len(train_sampler) % cfg.batch_size if drop_last else 0
    notes += squashed_note(train_rec["path"].tolist(), cfg) if place.is_main else []
    return Data(ds=ds, records=records, notes=notes, prep=prep, train_grades=train_grades, val_grades=val_grades, val_names=val_names,
                train_set=train_set, val_set=val_set, train_sampler=train_sampler, train_loader=train_loader,
                val_loader=val_loader, batch_augment=batch_augment, workers=workers, dropped=dropped)


@dataclass
class Parts:
    """The model and everything that updates it."""

    model: nn.Module  # what runs forward: wrapped in DDP and/or compiled when asked
    core: nn.Module  # the plain module whose weights are saved
    ema: Any  # torch.optim.swa_utils.AveragedModel or None; validated, saved and exported in place of core
    mix: BatchMix | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    mean: torch.Tensor  # (1, 3, 1, 1) on the device
    std: torch.Tensor
    small_stem: bool

    @property
    def served(self) -> nn.Module:
        """The weights validation sees and best.pt keeps: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.core


def loss_frequencies(cfg: TrainConfig, grades: list[int], weight: torch.Tensor | None) -> np.ndarray:
    """Each grade's share of the training loss: what the sampler draws times its class weight."""
    counts = class_counts(grades).astype(np.float64)
    if cfg.sampler == "balanced":
        counts = (counts > 0).astype(np.float64)
    return counts * (weight.numpy() if weight is not None else 1.0)


def build_parts(cfg: TrainConfig, place: Placement, data: Data, state: dict | None,
                ckpt_path: Path | None = None) -> Parts:
    """The model (``state``'s weights when resuming) on its device, with optimiser, schedule and loss.

    The optimiser, schedule and scaler start fresh; :func:`restore` loads a resumed run's.
    """
    small = use_small_stem(cfg.stem, cfg.img_size, cfg.pretrained)
    model = create_model(cfg.arch, weights=None if state else cfg.weights, small_stem=small, head=cfg.head,
                         pool=cfg.pool)
    weight = class_weights(data.train_grades, cfg.class_weights)
    if state is None and cfg.head == "ordinal":
        with torch.no_grad():
            model.fc.bias.copy_(coral_prior_bias(loss_frequencies(cfg, data.train_grades, weight)))
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:  # the weights of another arch or head size than its config says
            raise RetinoError(f"{ckpt_path}: cannot resume, its weights do not fit {cfg.arch} with "
                              f"{NUM_GRADES} grades ({str(exc).strip().splitlines()[0][:160]})") from None
    core = place.place(model)
    ema = make_ema(core, cfg.ema) if cfg.ema > 0 else None
    if ema is not None and state is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    mix = BatchMix(mixup=cfg.mixup, cutmix=cfg.cutmix, seed=cfg.seed, rank=place.rank) \
        if cfg.mixup or cfg.cutmix else None
    if place.distributed:
        device = place.device
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(cfg, core)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, len(data.train_loader)))
    scaler = torch.amp.GradScaler(place.device.type, enabled=place.needs_scaler)
    criterion = HeadLoss(cfg.head, weight=weight.to(place.device) if weight is not None else None,
                         label_smoothing=cfg.label_smoothing, ignore_index=IGNORE)
    mean = torch.tensor(data.prep.mean, device=place.device).view(1, 3, 1, 1)
    std = torch.tensor(data.prep.std, device=place.device).view(1, 3, 1, 1)
    return Parts(model=model, core=core, ema=ema, mix=mix, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                 criterion=criterion, mean=mean, std=std, small_stem=small)


def restore(parts: Parts, state: dict) -> None:
    """A resumed run's optimiser, schedule, grad scaler and torch RNG, where they stopped."""
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    parts.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
