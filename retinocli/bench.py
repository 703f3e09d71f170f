"""``retino bench``: the speed of every stage on this machine, each beside the way it is usually done.

Three sections, one table:

- data: images/s of one worker process turning a file into a training tensor. Baseline: the
  reports' way (``PIL.Image.open().convert("RGB")``, ``transforms.Resize``, ``ToTensor``,
  ``Normalize`` per image). retino: ``preprocess.load_and_prepare`` (JPEG draft decoding, uint8
  out; normalisation happens later, batched on the device) on the same files.
- train: images/s of a full training step (forward, backward, AdamW) on synthetic batches
  already on the device. Baseline: fp32 NCHW. retino: bf16 autocast + channels_last, and
  torch.compile with ``--compile``.
- infer: images/s of a forward pass at batch 1, 8 and 64. Baseline: PyTorch eager fp32.
  retino: onnxruntime on CPU (fp32, fp16, int8) and CUDA / TensorRT (fp32, fp16) when present,
  and ``predict`` end to end over a folder of JPEGs (decode threads overlapped with inference).

Speeds are measured after warm-up over at least ``min_seconds``; a GPU is synchronised before a
clock is read. Nothing here is asserted: targets live in BENCHMARKS.md.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retinocli.errors import RetinoError
from retinocli.preprocess import Preprocess, load_and_prepare


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


@dataclass(frozen=True)
class Plan:
    """What to measure; ``quick`` is the seconds-long version the tests run."""

    quick: bool = False
    data_size: int = 512
    full_size_photos: Path | None = None
    archs: tuple[str, ...] = ("resnet18", "resnet50")
    train_size: int | None = None  # None: 512 on a GPU, 64 on CPU
    train_batch: int | None = None  # None: 128/64 on a GPU, 16 on CPU
    infer_size: int | None = None  # None: 512 on a GPU, 224 on CPU
    infer_batches: tuple[int, ...] = (1, 8, 64)
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
           platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__, "onnxruntime": ort.__version__,
           "torch_threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
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

    from retinocli.synth import generate

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
    """One process, one thread: the reports' per-image pipeline against retino's."""
    import torch
    from PIL import Image
    from torchvision import transforms

    torch.set_num_threads(1)
    reports = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                  transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    prep = Preprocess(size=size, mode="none")
    crop = Preprocess(size=size, mode="crop")
    it = {"i": 0}

    def next_path() -> Path:
        it["i"] = (it["i"] + 1) % len(paths)
        return paths[it["i"]]

    def the_reports_way() -> int:
        with Image.open(next_path()) as im:
            reports(im.convert("RGB"))
        return 1

    def retino(p: Preprocess) -> Callable[[], int]:
        def f() -> int:
            torch.from_numpy(load_and_prepare(next_path(), p)).permute(2, 0, 1)  # what a worker hands over
            return 1
        return f

    base = f"reports' way, {label}"
    rows = [Row("data", base, "cpu", 1, 1, size, timed(the_reports_way, min_seconds=min_seconds))]
    for name, p in ((f"retino, {label}", prep), (f"retino crop, {label}", crop)):
        rows.append(Row("data", name, "cpu", 1, 1, size, timed(retino(p), min_seconds=min_seconds), baseline=base))
    torch.set_num_threads(os.cpu_count() or 1)
    return rows


def bench_train(arch: str, size: int, batch: int, device, *, compile_too: bool, min_seconds: float) -> list[Row]:
    import torch
    from torch import nn

    from retinocli.models import build_model

    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 5, (batch,), device=device)
    amp_dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    rows: list[Row] = []
    variants = [("fp32 NCHW", False, False, False), ("bf16 autocast + channels_last", True, True, False)]
    if compile_too:
        variants.append(("bf16 + channels_last + torch.compile", True, True, True))
    base = f"{arch} fp32 NCHW"
    for label, amp, channels_last, compiled in variants:
        torch.manual_seed(0)
        model = build_model(arch).to(device)
        xin = x
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            xin = x.contiguous(memory_format=torch.channels_last)
        step_model = torch.compile(model) if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss_fn = nn.CrossEntropyLoss()
        model.train()

        def step() -> int:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                loss = loss_fn(step_model(xin), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return batch

        try:
            rate = timed(step, min_seconds=min_seconds, warmup=3 if compiled else 1, sync=sync)
        except torch.OutOfMemoryError:
            rows.append(Row("train", f"{arch} {label}", str(device), torch.get_num_threads(), batch, size, 0.0,
                            note="out of memory"))
            continue
        name = f"{arch} {label}"
        rows.append(Row("train", name, str(device), torch.get_num_threads(), batch, size, rate,
                        baseline=None if name == base else base))
        del model, opt, step_model
    return rows


def bench_infer(arch: str, size: int, batches: tuple[int, ...], device, tmp: Path, *, min_seconds: float,
                notes: list[str]) -> tuple[list[Row], dict[str, Path]]:
    """PyTorch eager against onnxruntime per batch size; returns the rows and the ONNX files made."""
    import onnx
    import onnxruntime as ort
    import torch

    from retinocli import GRADE_NAMES
    from retinocli.export import quantize_int8, to_onnx
    from retinocli.models import build_model
    from retinocli.runtime import OnnxGrader, set_metadata

    torch.manual_seed(0)
    model = build_model(arch).eval()
    prep = Preprocess(size=size, mode="none")
    paths: dict[str, Path] = {}
    meta = {"grade_names": list(GRADE_NAMES), "preprocess": prep.to_dict(),
            "arch": arch}
    for precision in ("fp32", "fp16"):
        path = tmp / f"{arch}-{size}-{precision}.onnx"
        to_onnx(model, size, path, half=precision == "fp16")
        proto = onnx.load(path)
        set_metadata(proto, {**meta, "precision": precision})
        onnx.save(proto, path)
        paths[precision] = path
    rng = np.random.default_rng(0)
    calib = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(8)]
    paths["int8"] = tmp / f"{arch}-{size}-int8.onnx"
    quantize_int8(paths["fp32"], paths["int8"], calib, prep)
    proto = onnx.load(paths["int8"])
    set_metadata(proto, {**meta, "precision": "int8"})
    onnx.save(proto, paths["int8"])

    rows: list[Row] = []
    gpu = device.type == "cuda"
    torch_devices = [torch.device("cpu")] + ([device] if gpu else [])
    providers = [("cpu", p) for p in ("fp32", "fp16", "int8")]
    if gpu:
        available = ort.get_available_providers()
        providers += [("cuda", p) for p in ("fp32", "fp16")] if "CUDAExecutionProvider" in available else []
        providers += [("tensorrt", p) for p in ("fp32", "fp16")] if "TensorrtExecutionProvider" in available else []
    graders: dict[tuple[str, str], Any] = {}
    for key in providers:
        try:
            graders[key] = OnnxGrader(paths[key[1]], provider=key[0])
        except RetinoError as exc:
            notes.append(f"onnxruntime {key[0]} {key[1]}: {exc}")
    for batch in batches:
        x = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
        for dev in torch_devices:
            m = model.to(dev)
            xt = torch.from_numpy(x).to(dev)
            sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)

            def eager(m=m, xt=xt) -> int:
                with torch.inference_mode():
                    m(xt)
                return batch

            base = f"{arch} PyTorch eager fp32 ({dev.type})"
            rows.append(Row("infer", base, str(dev), torch.get_num_threads(), batch, size,
                            timed(eager, min_seconds=min_seconds, sync=sync)))
            if dev.type == "cuda":
                half = build_model(arch).to(dev).eval().half().to(memory_format=torch.channels_last)
                xh = xt.half().contiguous(memory_format=torch.channels_last)

                def eager_half(xh=xh) -> int:
                    with torch.inference_mode():
                        half(xh)
                    return batch

                rows.append(Row("infer", f"{arch} PyTorch eager fp16 channels_last (cuda)", str(dev),
                                torch.get_num_threads(), batch, size,
                                timed(eager_half, min_seconds=min_seconds, sync=sync), baseline=base))
        for (provider, precision), grader in graders.items():
            # fp32 is compared with PyTorch eager; fp16 and int8 with fp32 on the same provider
            base = (f"{arch} PyTorch eager fp32 ({'cpu' if provider == 'cpu' else 'cuda'})" if precision == "fp32"
                    else f"{arch} onnxruntime fp32 ({provider})")

            def onnx_run(grader=grader, x=x) -> int:
                grader.run(x)
                return batch

            try:
                rate = timed(onnx_run, min_seconds=min_seconds)
            except RetinoError as exc:
                notes.append(f"onnxruntime {provider} {precision} batch {batch}: {exc}")
                continue
            threads = ort.SessionOptions().intra_op_num_threads or (os.cpu_count() or 1)
            rows.append(Row("infer", f"{arch} onnxruntime {precision} ({provider})", grader.provider, threads,
                            batch, size, rate, baseline=base))
    model.to("cpu")
    return rows, paths


def bench_predict(model_path: Path, folder: Path, batch: int, provider: str, tmp: Path) -> Row:
    """``predict_folder`` end to end: decode threads + inference + CSV."""
    from retinocli.predict import default_threads, predict_folder
    from retinocli.runtime import OnnxGrader

    grader = OnnxGrader(model_path, provider=provider)
    out = tmp / f"pred-{provider}.csv"
    predict_folder(folder, grader, out=out, batch_size=batch, force=True)  # warm-up
    summary = predict_folder(folder, grader, out=out, batch_size=batch, force=True)
    return Row("infer", f"predict end to end, JPEG folder ({provider}, {grader.info.precision})", grader.provider,
               default_threads(), batch, grader.info.preprocess.size, summary.images_per_second)


# ---------------------------------------------------------------------------- main


def run_bench(plan: Plan, *, command: str = "retino bench", progress: Callable[[str], None] | None = None) -> BenchResult:
    """Measure everything ``plan`` asks for; see the module doc."""
    import torch

    from retinocli.train import pick_device

    say = progress or (lambda msg: None)
    device = pick_device(plan.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    notes: list[str] = []
    rows: list[Row] = []
    min_s = 0.2 if plan.quick else plan.min_seconds
    with tempfile.TemporaryDirectory(prefix="retino-bench-") as tmp_name:
        tmp = Path(tmp_name)
        # 1. data
        say("data pipeline")
        n = 4 if plan.quick else 24
        jpegs = make_jpegs(tmp / "jpeg", n, (plan.data_size, plan.data_size))
        rows += bench_data(jpegs, plan.data_size, f"{plan.data_size} px JPEG", min_s)
        photos = plan.full_size_photos
        if photos is not None and photos.is_dir():
            from retinocli.predict import find_images

            big = find_images(photos)[: 3 if plan.quick else 10]
            label = "full-size photos"
        else:
            big = make_jpegs(tmp / "big", 2 if plan.quick else 6, (3072, 2048) if not plan.quick else (1536, 1024))
            label = "generated 3072x2048 photos" if not plan.quick else "generated 1536x1024 photos"
        if big:
            rows += bench_data(big, plan.data_size, label, min_s)
        # 2. train
        train_size = plan.train_size or (512 if gpu else 64)
        archs = plan.archs[:1] if plan.quick else plan.archs
        for arch in archs:
            say(f"training step {arch}")
            batch = plan.train_batch or ((128 if arch in ("resnet18", "resnet34") else 64) if gpu else 16)
            rows += bench_train(arch, 32 if plan.quick else train_size, 4 if plan.quick else batch, device,
                                compile_too=plan.compile, min_seconds=min_s)
        # 3. inference
        infer_size = plan.infer_size or (512 if gpu else 224)
        infer_size = 32 if plan.quick else infer_size
        batches = (1, 8) if plan.quick else plan.infer_batches
        models: dict[str, Path] = {}
        for arch in archs:
            say(f"inference {arch}")
            infer_rows, models = bench_infer(arch, infer_size, batches, device, tmp, min_seconds=min_s, notes=notes)
            rows += infer_rows
        # end to end over a JPEG folder at the model's size, last arch's models
        say("predict end to end")
        folder = tmp / "predict"
        folder.mkdir()
        for i, src in enumerate(jpegs * (1 if plan.quick else 8)):
            (folder / f"{i:05d}.jpg").write_bytes(src.read_bytes())
        e2e = [("cpu", models["fp32"])]
        if gpu:
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
