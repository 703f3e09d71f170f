"""``retino bench``'s infer and predict sections: a forward pass per batch size, then ``retino predict`` end to end.

Each family of rows is its own function: PyTorch fp32 (CPU, and the GPU when there is one), PyTorch
in half precision on a GPU (bf16 mixed precision, fp16 weights, channels-last) and ONNX Runtime per
provider and precision (CPU fp32, fp16, int8; CUDA and TensorRT fp32, fp16). Every row names its
baseline (see :mod:`retinocli.reporting.bench`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from retinocli.errors import RetinoError
from retinocli.imaging.preprocess import Preprocess
from retinocli.machine import cores
from retinocli.reporting.bench import Context, Row, onnx_infer_name, predict_name, timed, torch_infer_name

GPU_PROVIDERS = (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider"))


def run_infer(ctx: Context) -> dict[str, Path]:
    """The infer section for every arch; returns the last arch's ONNX files per precision."""
    plan = ctx.plan
    batches = (1, 8) if plan.quick else (plan.infer_batches or ((1, 8, 64, 256) if ctx.gpu else (1, 8, 64)))
    models: dict[str, Path] = {}
    for arch in ctx.archs:
        ctx.say(f"inference {arch}")
        rows, models = bench_infer(arch, ctx.infer_size, batches, ctx.device, ctx.tmp, min_seconds=ctx.min_seconds,
                                   notes=ctx.notes)
        ctx.rows += rows
    return models


def run_predict(ctx: Context, models: dict[str, Path]) -> None:
    """The predict section: end to end over a JPEG folder at the model's size, with the last arch's ``models``."""
    ctx.say("predict end to end")
    if "fp32" not in models:
        models["fp32"] = onnx_model(ctx.archs[-1], ctx.infer_size, ctx.tmp, "fp32")
    folder = ctx.tmp / "predict"
    folder.mkdir()
    for i, src in enumerate(ctx.jpegs * (1 if ctx.plan.quick else 8)):
        (folder / f"{i:05d}.jpg").write_bytes(src.read_bytes())
    e2e = [("cpu", models["fp32"])]
    if ctx.gpu and "fp16" in models:
        e2e += [("cuda", models["fp16"]), ("tensorrt", models["fp16"])]
    for provider, path in e2e:
        try:
            ctx.rows.append(bench_predict(path, folder, 8 if ctx.plan.quick else 64, provider, ctx.tmp))
        except RetinoError as exc:
            ctx.notes.append(f"predict {provider}: {exc}")


def bench_infer(arch: str, size: int, batches: tuple[int, ...], device, tmp: Path, *, min_seconds: float,
                notes: list[str]) -> tuple[list[Row], dict[str, Path]]:
    """PyTorch fp32 (eager) against ONNX Runtime per batch size; returns the rows and the ONNX files made.

    With a GPU, PyTorch runs there in fp32, bf16 autocast and fp16 at every batch; the CPU
    rows (PyTorch and ONNX Runtime CPU fp32) run at batch 1 and 8 only.
    """
    import torch

    from retinocli.models.registry import random_model

    torch.manual_seed(0)
    model = random_model(arch).eval()
    gpu = device.type == "cuda"
    gpu_providers = _gpu_providers(notes) if gpu else []
    precisions = ["fp32"] + (["fp16", "int8"] if not gpu else (["fp16"] if gpu_providers else []))
    paths: dict[str, Path] = {}
    for precision in precisions:
        paths[precision] = onnx_model(arch, size, tmp, precision, model=model, fp32=paths.get("fp32"))
    rng = np.random.default_rng(0)

    rows: list[Row] = []
    graders = _graders([("cpu", p) for p in precisions] + [(g, p) for g in gpu_providers for p in ("fp32", "fp16")],
                       paths, notes)
    half = random_model(arch).to(device).eval().half().to(memory_format=torch.channels_last) if gpu else None
    for batch in batches:
        cpu_too = not gpu or batch <= 8
        x = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
        for dev in ([torch.device("cpu")] if cpu_too else []) + ([device] if gpu else []):
            m, xt = model.to(dev), torch.from_numpy(x).to(dev)
            try:
                for row in _pytorch_rows(arch, m, half, xt, dev, min_seconds):
                    rows.append(row)  # one at a time: the rows measured before running out of memory stay
            except torch.OutOfMemoryError:
                notes.append(f"{arch} inference at batch {batch} ran out of memory on {dev}")
                torch.cuda.empty_cache()
        rows += _onnx_rows(arch, {k: g for k, g in graders.items() if cpu_too or k[0] != "cpu"}, x, min_seconds,
                           notes)
    model.to("cpu")
    return rows, paths


def _gpu_providers(notes: list[str]) -> list[str]:
    """The GPU providers this onnxruntime has (cuda, tensorrt); a note when it has none."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    found = [p for p, name in GPU_PROVIDERS if name in available]
    if not found:
        notes.append(f"onnxruntime {ort.__version__} here has only {', '.join(available)}: the CUDA and "
                     "TensorRT providers are not measured (install onnxruntime-gpu)")
    return found


def _graders(keys: list[tuple[str, str]], paths: dict[str, Path], notes: list[str]) -> dict[tuple[str, str], Any]:
    """An ``OnnxGrader`` per (provider, precision); a note for each that does not start."""
    from retinocli.deploy.onnx_model import OnnxGrader

    graders: dict[tuple[str, str], Any] = {}
    for key in keys:
        try:
            graders[key] = OnnxGrader(paths[key[1]], provider=key[0])
        except RetinoError as exc:
            notes.append(f"onnxruntime {key[0]} {key[1]}: {exc}")
    return graders


def _pytorch_rows(arch: str, m, half, xt, dev, min_seconds: float) -> Iterator[Row]:
    """PyTorch fp32: ``m`` on the batch ``xt``, both on ``dev``; on a GPU then the half-precision rows."""
    import torch

    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    base = torch_infer_name(arch, "fp32", dev.type)
    yield Row("infer", base, str(dev), torch.get_num_threads(), len(xt), xt.shape[-1],
              timed(_forward(m, xt), min_seconds=min_seconds, sync=sync, warmup=2))
    if dev.type == "cuda":
        yield from _pytorch_half_rows(arch, m, half, xt, str(dev), base, sync, min_seconds)


def _pytorch_half_rows(arch: str, m, half, xt, dev: str, base: str, sync: Callable[[], None],
                       min_seconds: float) -> Iterator[Row]:
    """On a GPU, channels-last: ``m`` under bf16 autocast, then ``half`` (fp16 weights); both against fp32 ``base``."""
    import torch

    batch, size = len(xt), xt.shape[-1]
    xl = xt.contiguous(memory_format=torch.channels_last)
    m.to(memory_format=torch.channels_last)
    yield Row("infer", torch_infer_name(arch, "bf16 mixed precision, channels-last", "cuda"), dev,
              torch.get_num_threads(), batch, size,
              timed(_forward(m, xl, autocast=torch.bfloat16), min_seconds=min_seconds, sync=sync, warmup=2),
              baseline=base)
    m.to(memory_format=torch.contiguous_format)
    yield Row("infer", torch_infer_name(arch, "fp16, channels-last", "cuda"), dev, torch.get_num_threads(), batch,
              size, timed(_forward(half, xl.half()), min_seconds=min_seconds, sync=sync, warmup=2), baseline=base)


def _onnx_rows(arch: str, graders: dict[tuple[str, str], Any], x: np.ndarray, min_seconds: float,
               notes: list[str]) -> list[Row]:
    """ONNX Runtime per (provider, precision) at the batch ``x``.

    fp32 is compared with PyTorch fp32 on the same kind of device; fp16 and int8 with fp32 on the
    same provider.
    """
    import onnxruntime as ort

    batch, size = x.shape[0], x.shape[-1]
    rows: list[Row] = []
    for (provider, precision), grader in graders.items():
        base = (torch_infer_name(arch, "fp32", "cpu" if provider == "cpu" else "cuda") if precision == "fp32"
                else onnx_infer_name(arch, "fp32", provider))

        def onnx_run(grader=grader) -> int:
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
    return rows


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
