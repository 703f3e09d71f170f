"""``retino bench``: the speed of every stage on this machine, each beside the way it is usually done.

Five sections, one table. This module holds data (and ``bench_decode`` its GPU-decoding row),
``bench_train`` train and pipeline, ``bench_infer`` infer and predict; :func:`run_bench` runs
them in that order.

- data: images/s of one worker process turning a file into a training tensor. Baseline: "PIL +
  torchvision transforms, one image at a time" (``PIL.Image.open().convert("RGB")``,
  ``transforms.Resize``, ``ToTensor``, ``Normalize`` per image, as the course reports do).
  retino's loader: ``preprocess.load_and_prepare`` (JPEG decoded at reduced size in draft mode,
  uint8 out; normalisation happens later, batched on the device) on the same files. Then the
  whole training input per augmentation preset (none, light, strong), per core, batches of 32:
  "... per image in the worker (torchvision)" (the old way) against "... (OpenCV)" (the CPU
  default) and "... batched on the CPU|GPU, transfer included" (workers decode only;
  ``augment.BatchAugment`` turns the batch on the device); on a GPU also the batched
  augmentation alone.
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
  present. With a GPU the CPU rows run at batch 1 and 8 only, as the baseline a CPU-only machine
  would give.
- predict: ``retino predict`` end to end over a folder of JPEGs (decode threads overlapped with
  inference): ONNX Runtime fp32 on CPU, and fp16 through CUDA and TensorRT with a GPU. Its rows
  sit in the table's infer section.

Row names say what runs in the user's words; the functions below build them, so each row's
``baseline`` is exactly another row's name.

Speeds are measured after warm-up over at least ``min_seconds``; a GPU is synchronised before a
clock is read. Nothing here is asserted: targets live in BENCHMARKS.md.
"""

from __future__ import annotations

import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from retinocli.errors import RetinoError
from retinocli.events import EventsLike, emitter
from retinocli.imaging.preprocess import Preprocess, load_and_prepare
from retinocli.machine import cores


@dataclass
class Row:
    section: str  # data, train, pipeline, infer (predict's rows too)
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


def augment_cv_name(augment: str, label: str) -> str:
    return f"retino loader + {AUGMENT_WORDS[augment]} per image in the worker (OpenCV), {label}"


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
    each image with the torchvision preset in the worker first; ``--augment-on opencv`` does
    that with OpenCV (:class:`retinocli.engine.cv_augment.CvAugment`, the CPU default); the
    batched way turns the whole batch on the device (:class:`retinocli.engine.augment.BatchAugment`).
    One CPU thread throughout.
    On a GPU a third row times the batched augmentation alone.
    """
    import torch

    from retinocli.engine.augment import BatchAugment
    from retinocli.engine.cv_augment import CvAugment, available as cv_available
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

    def decode(transform=None, cv=None) -> torch.Tensor:
        out = []
        for i, f in enumerate(files):
            arr = load_and_prepare(f, prep)
            arr = cv(arr, i) if cv is not None else arr
            image = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
            out.append(transform(image) if transform is not None else image)
        return torch.stack(out)

    rows: list[Row] = []
    step = {"n": 0}
    for augment in augments:
        transform = augmentation(augment)
        aug = BatchAugment(augment, seed=0)

        def old(transform=transform, cv=None) -> int:
            to_input(decode(transform, cv), device, mean, std, False)
            return batch

        def new(aug=aug) -> int:
            step["n"] += 1
            to_input(decode(), device, mean, std, False, aug, step["n"])
            return batch

        base = augment_old_name(augment, label)
        rows.append(Row("data", base, "cpu", 1, batch, size, timed(old, min_seconds=min_seconds, sync=sync)))
        if augment != "none" and cv_available():
            rows.append(Row("data", augment_cv_name(augment, label), "cpu", 1, batch, size,
                            timed(partial(old, None, CvAugment(augment)), min_seconds=min_seconds, sync=sync),
                            baseline=base))
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


# ---------------------------------------------------------------------------- main


@dataclass
class Context:
    """What the sections share while :func:`run_bench` runs; each section adds its rows and notes here."""

    plan: Plan
    device: Any  # a torch.device
    tmp: Path  # removed when the bench ends
    jpegs: list[Path]  # generated fundus JPEGs of ``plan.data_size`` px
    say: Callable[[str], None]  # a stage as it starts
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def min_seconds(self) -> float:
        return 0.2 if self.plan.quick else self.plan.min_seconds

    @property
    def archs(self) -> tuple[str, ...]:
        return self.plan.archs[:1] if self.plan.quick else self.plan.archs

    @property
    def train_size(self) -> int:
        return 32 if self.plan.quick else (self.plan.train_size or (512 if self.gpu else 64))

    @property
    def infer_size(self) -> int:
        return 32 if self.plan.quick else (self.plan.infer_size or (512 if self.gpu else 224))

    def train_batch(self, arch: str) -> int:
        if self.plan.quick:
            return 4
        return self.plan.train_batch or ((128 if arch in ("resnet18", "resnet34") else 64) if self.gpu else 16)


def run_bench(plan: Plan, *, command: str = "retino bench", events: EventsLike = None) -> BenchResult:
    """Measure everything ``plan`` asks for; see the module doc. ``events`` hears each stage as it
    starts, as a message of level "stage" (see :mod:`retinocli.events`)."""
    import torch

    from retinocli.engine.placement import pick_device
    from retinocli.reporting.bench_infer import run_infer, run_predict
    from retinocli.reporting.bench_train import run_pipeline, run_train

    unknown = sorted(set(plan.sections) - set(SECTIONS))
    if unknown or not plan.sections:
        raise RetinoError(f"--only takes {', '.join(SECTIONS)}; got {', '.join(unknown) or 'nothing'}")
    emit = emitter(events)
    device = pick_device(plan.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    wanted = set(plan.sections)
    with tempfile.TemporaryDirectory(prefix="retino-bench-") as tmp_name:
        tmp = Path(tmp_name)
        jpegs = make_jpegs(tmp / "jpeg", 4 if plan.quick else 24, (plan.data_size, plan.data_size))
        ctx = Context(plan, device, tmp, jpegs, lambda stage: emit.message(stage, level="stage"))
        if "data" in wanted:
            run_data(ctx)
        if wanted & {"train", "pipeline"}:  # the pipeline rows' baseline is a train row, so it runs with them
            run_train(ctx)
        if "pipeline" in wanted:
            run_pipeline(ctx)
        models = run_infer(ctx) if "infer" in wanted else {}
        if "predict" in wanted:
            run_predict(ctx, models)
    _ratios(ctx.rows)
    return BenchResult(rows=ctx.rows, environment=environment(str(device)), command=command, notes=ctx.notes)


def run_data(ctx: Context) -> None:
    """The data section: the loader, the training input per preset, GPU decoding, then full-size photos."""
    from retinocli.reporting.bench_decode import bench_gpu_decode

    plan, quick, size = ctx.plan, ctx.plan.quick, ctx.plan.data_size
    label = f"{size} px JPEG"
    ctx.say("data pipeline")
    ctx.rows += bench_data(ctx.jpegs, size, label, ctx.min_seconds)
    ctx.say("training input per augmentation preset")
    ctx.rows += bench_augment(ctx.jpegs, size, label, ctx.device, ctx.min_seconds, batch=4 if quick else 32)
    decode_rows, decode_notes = bench_gpu_decode(ctx.jpegs, size, label, ctx.device, ctx.min_seconds,
                                                 batch=4 if quick else 32)
    ctx.rows += decode_rows
    ctx.notes += decode_notes
    photos = plan.full_size_photos
    if photos is not None and photos.is_dir():
        from retinocli.deploy.predict import find_images

        big = find_images(photos)[: 3 if quick else 10]
        label = "full-size photos"
    else:
        big = make_jpegs(ctx.tmp / "big", 2 if quick else 6, (3072, 2048) if not quick else (1536, 1024))
        label = "generated 3072x2048 photos" if not quick else "generated 1536x1024 photos"
    if big:
        ctx.rows += bench_data(big, size, label, ctx.min_seconds)


def _ratios(rows: list[Row]) -> None:
    """Fill ``ratio`` from the baseline row with the same batch and size."""
    for r in rows:
        if r.baseline is None:
            continue
        for b in rows:
            if b.name == r.baseline and b.batch == r.batch and b.size == r.size and b.images_per_second > 0:
                r.ratio = r.images_per_second / b.images_per_second
                break
