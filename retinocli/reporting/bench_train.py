"""``retino bench``'s train and pipeline sections: a training step on synthetic batches, then on real ones.

The train rows time forward, backward and AdamW on tensors already on the device, per
:data:`~retinocli.reporting.bench.TRAIN_VARIANTS`; the pipeline rows time the mixed-precision
channels-last step fed by ``FundusDataset`` workers, whole epochs at a time, and are compared with
the synthetic row of the same step (see :mod:`retinocli.reporting.bench`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retinocli.errors import RetinoError
from retinocli.imaging.preprocess import Preprocess
from retinocli.machine import cores, loader_workers
from retinocli.reporting.bench import (AUGMENTS, TRAIN_BASELINE, TRAIN_FAST, TRAIN_VARIANTS, Context, Row,
                                       make_jpegs, pipeline_name, timed, train_name)


def run_train(ctx: Context) -> None:
    """The train section; with ``--only pipeline`` only the synthetic row the pipeline rows compare with."""
    variants = None if "train" in ctx.plan.sections else (TRAIN_FAST,)
    for arch in ctx.archs:
        ctx.say(f"training step {arch}")
        ctx.rows += bench_train(arch, ctx.train_size, ctx.train_batch(arch), ctx.device, compile_too=ctx.plan.compile,
                                min_seconds=ctx.min_seconds, variants=variants)


def run_pipeline(ctx: Context) -> None:
    """The pipeline section: each arch fed by the real input pipeline, per preset of :data:`AUGMENTS`."""
    plan = ctx.plan
    workers = plan.workers if plan.workers is not None else (0 if plan.quick else loader_workers(ctx.device.type))
    files = pipeline_images(plan.cache, ctx.train_size, ctx.tmp / "pipeline", 16 if plan.quick else 1024)
    for arch in ctx.archs:
        for augment in AUGMENTS:
            ctx.say(f"input pipeline {arch}, {augment} augmentation")
            ctx.rows.append(bench_pipeline(arch, files, ctx.train_size, ctx.train_batch(arch), ctx.device,
                                           augment=augment, workers=workers, min_seconds=ctx.min_seconds,
                                           epoch_batches=2 if plan.quick else 24))


def training_step(arch: str, device, *, amp: bool, channels_last: bool, compiled: bool) -> Callable[[Any, Any], None]:
    """A fresh ``arch`` and a function doing one forward, backward and AdamW step on (x, y)."""
    import torch
    from torch import nn

    from retinocli.models.registry import random_model
    from retinocli.engine.placement import amp_dtype_for

    torch.manual_seed(0)
    model = random_model(arch).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    amp_dtype = amp_dtype_for(device)
    model.train()

    def step(x, y) -> None:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            loss = loss_fn(step_model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_train(arch: str, size: int, batch: int, device, *, compile_too: bool, min_seconds: float,
                variants: tuple[str, ...] | None = None) -> list[Row]:
    import torch

    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 5, (batch,), device=device)
    rows: list[Row] = []
    if variants is None:
        variants = tuple(TRAIN_VARIANTS)[:3 if compile_too else 2]
    base = train_name(arch, TRAIN_BASELINE)
    for label in variants:
        amp, channels_last, compiled = TRAIN_VARIANTS[label]
        name = train_name(arch, label)
        try:
            step = training_step(arch, device, amp=amp, channels_last=channels_last, compiled=compiled)
            xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            rate = timed(lambda: step(xin, y) or batch, min_seconds=min_seconds, warmup=3, sync=sync)
        except torch.OutOfMemoryError:
            rows.append(Row("train", name, str(device), torch.get_num_threads(), batch, size, 0.0,
                            note="out of memory"))
            continue
        finally:
            step = None  # free the model before the next variant
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(Row("train", name, str(device), torch.get_num_threads(), batch, size, rate,
                        baseline=None if label == TRAIN_BASELINE else base))
    return rows


def pipeline_images(source: Path | None, size: int, folder: Path, n: int) -> list[Path]:
    """JPEGs of ``size`` px, as ``retino prepare`` writes them: ``source``'s images, else generated ones.

    A cache made at another size is re-encoded at ``size`` (JPEG quality 95), so the workers
    decode what a cache prepared for this size would hold.
    """
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from retinocli.deploy.predict import find_images

    if source is None:
        return make_jpegs(folder, n, (size, size))
    found = find_images(source)[:n]
    if not found:
        raise RetinoError(f"--data {source}: no images to feed the input pipeline")
    folder.mkdir(parents=True, exist_ok=True)

    def convert(item: tuple[int, Path]) -> Path:
        i, src = item
        with Image.open(src) as im:
            if im.size == (size, size) and im.format == "JPEG":
                return src
            out = folder / f"{i:05d}.jpg"
            im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC).save(out, quality=95)
            return out

    with ThreadPoolExecutor(max_workers=cores()) as pool:
        return list(pool.map(convert, enumerate(found)))


def bench_pipeline(arch: str, paths: list[Path], size: int, batch: int, device, *, augment: str, workers: int,
                   min_seconds: float, epoch_batches: int = 24) -> Row:
    """The mixed-precision channels-last training step fed by FundusDataset workers, whole epochs timed.

    Epoch 0 is the warm-up (worker start, cuDNN autotuning); then whole epochs are timed
    from the first batch request to the last step, so the prefetch queue starts empty each
    time, as in ``retino train``.
    """
    import torch

    from retinocli.engine.augment import BatchAugment
    from retinocli.engine.dataset import EpochSampler, FundusDataset, make_loader
    from retinocli.imaging.preprocess import IMAGENET_MEAN, IMAGENET_STD
    from retinocli.engine.trainer import to_input

    gpu = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize()) if gpu else (lambda: None)
    files = [str(p) for p in paths] * math.ceil(batch * epoch_batches / len(paths))
    files = files[: batch * epoch_batches]
    prep = Preprocess(size=size, mode="none", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    dataset = FundusDataset(files, [0] * len(files), prep, "none")  # workers decode; the device augments
    sampler = EpochSampler(len(dataset), seed=0)
    aug = BatchAugment(augment, seed=0)
    loader = make_loader(dataset, sampler, batch_size=batch, workers=workers, pin_memory=gpu, drop_last=True)
    step = training_step(arch, device, amp=True, channels_last=True, compiled=False)
    mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, device=device).view(1, 3, 1, 1)

    def epoch(e: int) -> int:
        sampler.set_epoch(e)
        aug.set_epoch(e)
        n = 0
        for k, (images, targets) in enumerate(loader, 1):
            step(to_input(images, device, mean, std, True, aug, k), targets.to(device, non_blocking=True))
            n += len(targets)
        sync()
        return n

    epoch(0)
    done, e, start = 0, 1, time.perf_counter()
    while True:
        done += epoch(e)
        e += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            break
    del loader  # stops the persistent workers
    return Row("pipeline", pipeline_name(arch, augment), str(device), workers, batch, size, done / elapsed,
               baseline=train_name(arch, TRAIN_FAST), note=f"{len(paths)} JPEGs")
