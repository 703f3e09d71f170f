"""``retino bench``: the speed of every stage on this machine, each beside the way it is usually done.

Three sections, one table:

- data: images/s of one worker process turning a file into a training tensor. Baseline: "PIL +
  torchvision transforms, one image at a time" (``PIL.Image.open().convert("RGB")``,
  ``transforms.Resize``, ``ToTensor``, ``Normalize`` per image, as the course reports do).
  retino's loader: ``preprocess.load_and_prepare`` (JPEG decoded at reduced size in draft mode,
  uint8 out; normalisation happens later, batched on the device) on the same files. Then the
  whole training input per augmentation preset (none, light, strong), per core, batches of 32:
  "... per image in the worker (torchvision)" (the old way) against "... batched on the
  CPU|GPU, transfer included" (workers decode only; ``augment.BatchAugment`` turns the batch
  on the device); on a GPU also the batched augmentation alone.
- train: images/s of a full training step (forward, backward, AdamW) on synthetic batches
  already on the device. Baseline: PyTorch in fp32 with the standard (NCHW) memory layout.
  retino: mixed precision (bf16 autocast, fp16 where a GPU has no bf16) with the channels-last
  (NHWC) memory layout, and torch.compile with ``--compile``.
- pipeline: the same mixed-precision channels-last step fed by retino's real input pipeline
  (worker processes decoding a prepared cache's JPEGs, pinned copies, augmentation batched on
  the device), per augmentation preset. Baseline: the synthetic-tensor row above, so the ratio says how much of
  the model's speed the input pipeline delivers.
- infer: images/s of a forward pass at batch 1, 8 and 64 (and 256 on a GPU). Baseline: PyTorch
  fp32 (eager). retino: PyTorch bf16 mixed precision and fp16 weights, channels-last, on a GPU;
  ONNX Runtime on CPU (fp32, fp16, int8) and on a GPU through CUDA / TensorRT (fp32, fp16) when
  present, and ``retino predict`` end to end over a folder of JPEGs (decode threads overlapped
  with inference). With a GPU the CPU rows run at batch 1 and 8 only, as the baseline a
  CPU-only machine would give.

Row names say what runs in the user's words; the functions below build them, so each row's
``baseline`` is exactly another row's name.

Speeds are measured after warm-up over at least ``min_seconds``; a GPU is synchronised before a
clock is read. Nothing here is asserted: targets live in BENCHMARKS.md.
"""

from __future__ import annotations

import math
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retinocli.errors import RetinoError
from retinocli.events import EventsLike, emitter
from retinocli.imaging.preprocess import Preprocess, load_and_prepare
from retinocli.machine import cores


@dataclass
class Row:
    section: str  # data, train, infer
    name: str
    device: str
    threads: int
    batch: int
    size: int
    images_per_second: float
    baseline: str | None = None  # name of the row this one is compared with
    ratio: float | None = None  # images_per_second / baseline's
    note: str = ""


@dataclass
class BenchResult:
    rows: list[Row]
    environment: dict[str, Any]
    command: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"environment": self.environment, "command": self.command, "notes": self.notes,
                "rows": [asdict(r) for r in self.rows]}


SECTIONS = ("data", "train", "pipeline", "infer", "predict")
AUGMENTS = ("none", "light")  # pipeline rows: no augmentation, then the training default

# ---------------------------------------------------------------------------- row names
DATA_BASELINE = "PIL + torchvision transforms, one image at a time"
DATA_RETINO = "retino loader (JPEG decoded at the size it needs, uint8)"
DATA_RETINO_CROP = "retino loader + crop to the fundus"
TRAIN_VARIANTS = {  # what a training row says: (amp, channels_last, compiled)
    "PyTorch, fp32, standard memory layout": (False, False, False),
    "mixed precision, channels-last memory layout": (True, True, False),
    "mixed precision, channels-last memory layout, torch.compile": (True, True, True),
}
TRAIN_BASELINE, TRAIN_FAST, TRAIN_COMPILED = TRAIN_VARIANTS
PROVIDER_WORDS = {"cpu": "CPU", "cuda": "GPU via CUDA", "tensorrt": "GPU via TensorRT"}
AUGMENT_WORDS = {"none": "no augmentation", "light": "light augmentation", "strong": "strong augmentation"}


def train_name(arch: str, variant: str) -> str:
    return f"{arch}, {variant}"


def augment_old_name(augment: str, label: str) -> str:
    return f"retino loader + {AUGMENT_WORDS[augment]} per image in the worker (torchvision), {label}"


def augment_new_name(augment: str, label: str, device_type: str) -> str:
    where = "GPU" if device_type == "cuda" else "CPU"
    return f"retino loader + {AUGMENT_WORDS[augment]} batched on the {where}, transfer included, {label}"


def augment_alone_name(augment: str) -> str:
    return f"{AUGMENT_WORDS[augment]} batched on the GPU alone (uint8 batch already there)"


def pipeline_name(arch: str, augment: str) -> str:
    return f"{arch}, {TRAIN_FAST}, fed by the real input pipeline ({AUGMENT_WORDS[augment]})"


def torch_infer_name(arch: str, what: str, device_type: str) -> str:
    """``resnet18, PyTorch fp32, CPU``; ``what`` is the precision (and memory layout)."""
    return f"{arch}, PyTorch {what}, {'GPU' if device_type == 'cuda' else 'CPU'}"


def onnx_infer_name(arch: str, precision: str, provider: str) -> str:
    return f"{arch}, ONNX Runtime {precision}, {PROVIDER_WORDS.get(provider, provider)}"


def predict_name(provider: str, precision: str) -> str:
    return f"retino predict end to end, JPEG folder ({PROVIDER_WORDS.get(provider, provider)}, {precision})"


@dataclass(frozen=True)
class Plan:
    """What to measure; ``quick`` is the seconds-long version the tests run."""

    quick: bool = False
    sections: tuple[str, ...] = SECTIONS
    cache: Path | None = None  # images the pipeline rows decode (None: generated fundus JPEGs)
    workers: int | None = None  # pipeline rows' loader processes (None: what retino train uses)
    data_size: int = 512
    full_size_photos: Path | None = None
    archs: tuple[str, ...] = ("resnet18", "resnet50")
    train_size: int | None = None  # None: 512 on a GPU, 64 on CPU
    train_batch: int | None = None  # None: 128/64 on a GPU, 16 on CPU
    infer_size: int | None = None  # None: 512 on a GPU, 224 on CPU
    infer_batches: tuple[int, ...] | None = None  # None: 1, 8, 64 (and 256 on a GPU)
    compile: bool = False
    device: str = "auto"
    min_seconds: float = 2.0


def timed(fn: Callable[[], int], *, min_seconds: float, warmup: int = 1, sync: Callable[[], None] = lambda: None,
          max_calls: int = 10_000) -> float:
    """Items per second of ``fn`` (which returns how many items one call handled)."""
    for _ in range(warmup):
        fn()
    sync()
    done, calls, start = 0, 0, time.perf_counter()
    while True:
        done += fn()
        calls += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or calls >= max_calls:
            return done / elapsed


def environment(device: str) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu": platform.processor() or
           platform.machine(), "cores": cores(), "torch": torch.__version__, "onnxruntime": ort.__version__,
           "torch_threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        try:
            import subprocess

            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        import tensorrt  # noqa: F401 (only its version)

        env["tensorrt"] = tensorrt.__version__
    except Exception:  # noqa: BLE001
        pass
    return env


# ---------------------------------------------------------------------------- inputs


def make_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """Fundus-like JPEGs (the demo generator's drawings, scaled to ``size``) for timing."""
    from PIL import Image

    from retinocli.data.synth import generate

    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "_synth"
    generate(src, n=max(n, 10), size=256, seed=seed, force=True)
    paths = []
    for i, f in enumerate(sorted((src / "train").glob("*.jpeg"))[:n]):
        with Image.open(f) as im:
            big = im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        out = folder / f"{i:04d}.jpg"
        big.save(out, quality=90)
        paths.append(out)
    return paths


# ---------------------------------------------------------------------------- sections


def bench_data(paths: list[Path], size: int, label: str, min_seconds: float) -> list[Row]:
    """One process, one thread: PIL + torchvision transforms per image against retino's loader."""
    import torch
    from PIL import Image
    from torchvision import transforms

    torch.set_num_threads(1)
    pil_transforms = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                         transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    prep = Preprocess(size=size, mode="none")
    crop = Preprocess(size=size, mode="crop")
    it = {"i": 0}

    def next_path() -> Path:
        it["i"] = (it["i"] + 1) % len(paths)
        return paths[it["i"]]

    def per_image() -> int:
        with Image.open(next_path()) as im:
            pil_transforms(im.convert("RGB"))
        return 1

    def retino(p: Preprocess) -> Callable[[], int]:
        def f() -> int:
            torch.from_numpy(load_and_prepare(next_path(), p)).permute(2, 0, 1)  # what a worker hands over
            return 1
        return f

    base = f"{DATA_BASELINE}, {label}"
    rows = [Row("data", base, "cpu", 1, 1, size, timed(per_image, min_seconds=min_seconds))]
    for name, p in ((f"{DATA_RETINO}, {label}", prep), (f"{DATA_RETINO_CROP}, {label}", crop)):
        rows.append(Row("data", name, "cpu", 1, 1, size, timed(retino(p), min_seconds=min_seconds), baseline=base))
    torch.set_num_threads(cores())
    return rows


def bench_augment(paths: list[Path], size: int, label: str, device, min_seconds: float, batch: int = 32,
                  augments: tuple[str, ...] = ("none", "light", "strong")) -> list[Row]:
    """The whole training input path per core, per preset: the old way against the batched one.

    Both decode ``batch`` images one by one (as a loader worker does), stack them, move the
    batch to ``device`` and normalise it there, as ``retino train`` does. The old way turns
    each image with the torchvision preset in the worker first; the new one turns the whole
    batch on the device (:class:`retinocli.engine.augment.BatchAugment`). One CPU thread throughout.
    On a GPU a third row times the batched augmentation alone.
    """
    import torch

    from retinocli.engine.augment import BatchAugment
    from retinocli.engine.dataset import augmentation
    from retinocli.imaging.preprocess import IMAGENET_MEAN, IMAGENET_STD
    from retinocli.engine.trainer import to_input

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gpu = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize()) if gpu else (lambda: None)
    prep = Preprocess(size=size, mode="none")
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    files = [paths[i % len(paths)] for i in range(batch)]

    def decode(transform=None) -> torch.Tensor:
        out = []
        for f in files:
            image = torch.from_numpy(load_and_prepare(f, prep)).permute(2, 0, 1).contiguous()
            out.append(transform(image) if transform is not None else image)
        return torch.stack(out)

    rows: list[Row] = []
    step = {"n": 0}
    for augment in augments:
        transform = augmentation(augment)
        aug = BatchAugment(augment, seed=0)

        def old(transform=transform) -> int:
            to_input(decode(transform), device, mean, std, False)
            return batch

        def new(aug=aug) -> int:
            step["n"] += 1
            to_input(decode(), device, mean, std, False, aug, step["n"])
            return batch

        base = augment_old_name(augment, label)
        rows.append(Row("data", base, "cpu", 1, batch, size, timed(old, min_seconds=min_seconds, sync=sync)))
        rows.append(Row("data", augment_new_name(augment, label, device.type), str(device), 1, batch, size,
                        timed(new, min_seconds=min_seconds, sync=sync), baseline=base))
        if gpu and augment != "none":
            on_gpu = decode().to(device)

            def alone(aug=aug) -> int:
                step["n"] += 1
                to_input(on_gpu, device, mean, std, False, aug, step["n"])
                return batch

            rows.append(Row("data", augment_alone_name(augment), str(device), 1, batch, size,
                            timed(alone, min_seconds=min_seconds, sync=sync, warmup=3)))
    torch.set_num_threads(threads)
    return rows


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


def bench_infer(arch: str, size: int, batches: tuple[int, ...], device, tmp: Path, *, min_seconds: float,
                notes: list[str]) -> tuple[list[Row], dict[str, Path]]:
    """PyTorch fp32 (eager) against ONNX Runtime per batch size; returns the rows and the ONNX files made.

    With a GPU, PyTorch runs there in fp32, bf16 autocast and fp16 at every batch; the CPU
    rows (PyTorch and ONNX Runtime CPU fp32) run at batch 1 and 8 only.
    """
    import onnxruntime as ort
    import torch

    from retinocli.models.registry import random_model
    from retinocli.deploy.onnx_model import OnnxGrader

    torch.manual_seed(0)
    model = random_model(arch).eval()
    gpu = device.type == "cuda"
    available = ort.get_available_providers()
    gpu_providers = [p for p, name in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider"))
                     if gpu and name in available]
    if gpu and not gpu_providers:
        notes.append(f"onnxruntime {ort.__version__} here has only {', '.join(available)}: the CUDA and "
                     "TensorRT providers are not measured (install onnxruntime-gpu)")
    precisions = ["fp32"] + (["fp16", "int8"] if not gpu else (["fp16"] if gpu_providers else []))
    paths: dict[str, Path] = {}
    for precision in precisions:
        paths[precision] = onnx_model(arch, size, tmp, precision, model=model, fp32=paths.get("fp32"))
    rng = np.random.default_rng(0)

    rows: list[Row] = []
    providers = [("cpu", p) for p in precisions] + [(g, p) for g in gpu_providers for p in ("fp32", "fp16")]
    graders: dict[tuple[str, str], Any] = {}
    for key in providers:
        try:
            graders[key] = OnnxGrader(paths[key[1]], provider=key[0])
        except RetinoError as exc:
            notes.append(f"onnxruntime {key[0]} {key[1]}: {exc}")
    half = random_model(arch).to(device).eval().half().to(memory_format=torch.channels_last) if gpu else None
    for batch in batches:
        cpu_too = not gpu or batch <= 8
        x = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
        for dev in ([torch.device("cpu")] if cpu_too else []) + ([device] if gpu else []):
            m = model.to(dev)
            xt = torch.from_numpy(x).to(dev)
            sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
            base = torch_infer_name(arch, "fp32", dev.type)
            try:
                rows.append(Row("infer", base, str(dev), torch.get_num_threads(), batch, size,
                                timed(_forward(m, xt), min_seconds=min_seconds, sync=sync, warmup=2)))
                if dev.type != "cuda":
                    continue
                xl = xt.contiguous(memory_format=torch.channels_last)
                m.to(memory_format=torch.channels_last)
                rows.append(Row("infer", torch_infer_name(arch, "bf16 mixed precision, channels-last", "cuda"),
                                str(dev), torch.get_num_threads(), batch, size,
                                timed(_forward(m, xl, autocast=torch.bfloat16), min_seconds=min_seconds, sync=sync,
                                      warmup=2), baseline=base))
                m.to(memory_format=torch.contiguous_format)
                rows.append(Row("infer", torch_infer_name(arch, "fp16, channels-last", "cuda"), str(dev),
                                torch.get_num_threads(), batch, size,
                                timed(_forward(half, xl.half()), min_seconds=min_seconds, sync=sync, warmup=2),
                                baseline=base))
            except torch.OutOfMemoryError:
                notes.append(f"{arch} inference at batch {batch} ran out of memory on {dev}")
                torch.cuda.empty_cache()
        for (provider, precision), grader in graders.items():
            if provider == "cpu" and not cpu_too:
                continue
            # fp32 is compared with PyTorch fp32; fp16 and int8 with fp32 on the same provider
            base = (torch_infer_name(arch, "fp32", "cpu" if provider == "cpu" else "cuda") if precision == "fp32"
                    else onnx_infer_name(arch, "fp32", provider))

            def onnx_run(grader=grader, x=x) -> int:
                grader.run(x)
                return batch

            try:
                rate = timed(onnx_run, min_seconds=min_seconds)
            except RetinoError as exc:
                notes.append(f"onnxruntime {provider} {precision} batch {batch}: {exc}")
                continue
            threads = ort.SessionOptions().intra_op_num_threads or cores()
            rows.append(Row("infer", onnx_infer_name(arch, precision, provider), grader.provider, threads,
                            batch, size, rate, baseline=base))
    model.to("cpu")
    return rows, paths


def onnx_model(arch: str, size: int, tmp: Path, precision: str, *, model=None, fp32: Path | None = None) -> Path:
    """``arch`` (seed-0 weights unless ``model``) as an ONNX file with retino's metadata.

    int8 is quantised from the ``fp32`` file, calibrated on 8 random images.
    """
    import onnx
    import torch

    from retinocli import GRADE_NAMES
    from retinocli.deploy.export import quantize_int8, to_onnx
    from retinocli.models.registry import random_model
    from retinocli.deploy.metadata import set_metadata

    if model is None:
        torch.manual_seed(0)
        model = random_model(arch).eval()
    prep = Preprocess(size=size, mode="none")
    path = tmp / f"{arch}-{size}-{precision}.onnx"
    if precision == "int8":
        if fp32 is None:
            raise ValueError("int8 is quantised from an fp32 file")
        rng = np.random.default_rng(0)
        quantize_int8(fp32, path, [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(8)], prep)
    else:
        to_onnx(model, size, path, half=precision == "fp16")
    proto = onnx.load(path)
    set_metadata(proto, {"grade_names": list(GRADE_NAMES), "preprocess": prep.to_dict(), "arch": arch,
                         "precision": precision})
    onnx.save(proto, path)
    return path


def _forward(model, x, autocast=None) -> Callable[[], int]:
    import torch

    def run() -> int:
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=autocast or torch.float32,
                                                    enabled=autocast is not None):
            model(x)
        return len(x)

    return run


def bench_predict(model_path: Path, folder: Path, batch: int, provider: str, tmp: Path) -> Row:
    """``predict_folder`` end to end: decode threads + inference + CSV."""
    from retinocli.deploy.predict import predict_folder
    from retinocli.machine import decode_threads
    from retinocli.deploy.onnx_model import OnnxGrader

    grader = OnnxGrader(model_path, provider=provider)
    out = tmp / f"pred-{provider}.csv"
    predict_folder(folder, grader, out=out, batch_size=batch, force=True)  # warm-up
    summary = predict_folder(folder, grader, out=out, batch_size=batch, force=True)
    return Row("infer", predict_name(provider, grader.info.precision), grader.provider,
               decode_threads(), batch, grader.info.preprocess.size, summary.images_per_second or 0.0)


# ---------------------------------------------------------------------------- main


def run_bench(plan: Plan, *, command: str = "retino bench", events: EventsLike = None) -> BenchResult:
    """Measure everything ``plan`` asks for; see the module doc. ``events`` hears each stage as it
    starts, as a message of level "stage" (see :mod:`retinocli.events`)."""
    import torch

    from retinocli.machine import loader_workers
    from retinocli.engine.placement import pick_device

    unknown = sorted(set(plan.sections) - set(SECTIONS))
    if unknown or not plan.sections:
        raise RetinoError(f"--only takes {', '.join(SECTIONS)}; got {', '.join(unknown) or 'nothing'}")
    emit = emitter(events)

    def say(stage: str) -> None:
        emit.message(stage, level="stage")

    device = pick_device(plan.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    notes: list[str] = []
    rows: list[Row] = []
    wanted = set(plan.sections)
    min_s = 0.2 if plan.quick else plan.min_seconds
    archs = plan.archs[:1] if plan.quick else plan.archs
    train_size = 32 if plan.quick else (plan.train_size or (512 if gpu else 64))

    def train_batch(arch: str) -> int:
        if plan.quick:
            return 4
        return plan.train_batch or ((128 if arch in ("resnet18", "resnet34") else 64) if gpu else 16)

    with tempfile.TemporaryDirectory(prefix="retino-bench-") as tmp_name:
        tmp = Path(tmp_name)
        jpegs = make_jpegs(tmp / "jpeg", 4 if plan.quick else 24, (plan.data_size, plan.data_size))
        if "data" in wanted:
            say("data pipeline")
            rows += bench_data(jpegs, plan.data_size, f"{plan.data_size} px JPEG", min_s)
            say("training input per augmentation preset")
            rows += bench_augment(jpegs, plan.data_size, f"{plan.data_size} px JPEG", device, min_s,
                                  batch=4 if plan.quick else 32)
            from retinocli.reporting.bench_decode import bench_gpu_decode

            decode_rows, decode_notes = bench_gpu_decode(jpegs, plan.data_size, f"{plan.data_size} px JPEG", device,
                                                         min_s, batch=4 if plan.quick else 32)
            rows += decode_rows
            notes += decode_notes
            photos = plan.full_size_photos
            if photos is not None and photos.is_dir():
                from retinocli.deploy.predict import find_images

                big = find_images(photos)[: 3 if plan.quick else 10]
                label = "full-size photos"
            else:
                big = make_jpegs(tmp / "big", 2 if plan.quick else 6, (3072, 2048) if not plan.quick else (1536, 1024))
                label = "generated 3072x2048 photos" if not plan.quick else "generated 1536x1024 photos"
            if big:
                rows += bench_data(big, plan.data_size, label, min_s)
        if wanted & {"train", "pipeline"}:
            for arch in archs:
                say(f"training step {arch}")
                # the pipeline rows' baseline is the synthetic mixed-precision row, so it runs with them
                variants = None if "train" in wanted else (TRAIN_FAST,)
                rows += bench_train(arch, train_size, train_batch(arch), device, compile_too=plan.compile,
                                    min_seconds=min_s, variants=variants)
        if "pipeline" in wanted:
            workers = plan.workers if plan.workers is not None else (0 if plan.quick else loader_workers(device.type))
            files = pipeline_images(plan.cache, train_size, tmp / "pipeline", 16 if plan.quick else 1024)
            for arch in archs:
                for augment in AUGMENTS:
                    say(f"input pipeline {arch}, {augment} augmentation")
                    rows.append(bench_pipeline(arch, files, train_size, train_batch(arch), device, augment=augment,
                                               workers=workers, min_seconds=min_s,
                                               epoch_batches=2 if plan.quick else 24))
        infer_size = 32 if plan.quick else (plan.infer_size or (512 if gpu else 224))
        models: dict[str, Path] = {}
        if "infer" in wanted:
            batches = (1, 8) if plan.quick else (plan.infer_batches or ((1, 8, 64, 256) if gpu else (1, 8, 64)))
            for arch in archs:
                say(f"inference {arch}")
                infer_rows, models = bench_infer(arch, infer_size, batches, device, tmp, min_seconds=min_s,
                                                 notes=notes)
                rows += infer_rows
        if "predict" in wanted:
            # end to end over a JPEG folder at the model's size, the last arch's models
            say("predict end to end")
            if "fp32" not in models:
                models["fp32"] = onnx_model(archs[-1], infer_size, tmp, "fp32")
            folder = tmp / "predict"
            folder.mkdir()
            for i, src in enumerate(jpegs * (1 if plan.quick else 8)):
                (folder / f"{i:05d}.jpg").write_bytes(src.read_bytes())
            e2e = [("cpu", models["fp32"])]
            if gpu and "fp16" in models:
                e2e += [("cuda", models["fp16"]), ("tensorrt", models["fp16"])]
            for provider, path in e2e:
                try:
                    rows.append(bench_predict(path, folder, 8 if plan.quick else 64, provider, tmp))
                except RetinoError as exc:
                    notes.append(f"predict {provider}: {exc}")
    _ratios(rows)
    return BenchResult(rows=rows, environment=environment(str(device)), command=command, notes=notes)


def _ratios(rows: list[Row]) -> None:
    """Fill ``ratio`` from the baseline row with the same batch and size."""
    for r in rows:
        if r.baseline is None:
            continue
        for b in rows:
            if b.name == r.baseline and b.batch == r.batch and b.size == r.size and b.images_per_second > 0:
                r.ratio = r.images_per_second / b.images_per_second
                break
