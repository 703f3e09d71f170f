"""Which onnxruntime execution provider runs a model: TensorRT, CUDA or the CPU, and their options.

No torch. onnxruntime is imported by the functions that use it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from retinocli.deploy.metadata import ModelInfo
from retinocli.errors import RetinoError, first_line

TENSORRT = "TensorrtExecutionProvider"

CUDA = "CUDAExecutionProvider"

CPU = "CPUExecutionProvider"

#: --provider values and the onnxruntime execution provider each one asks for.
PROVIDERS: dict[str, str] = {"tensorrt": TENSORRT, "cuda": CUDA, "cpu": CPU}

PROVIDER_CHOICES: tuple[str, ...] = ("auto", *PROVIDERS)

def nvidia_gpu_present() -> bool:
    """Whether this machine shows an NVIDIA GPU, without loading CUDA.

    Cheap checks first (device files the driver creates); ``nvidia-smi -L`` only where
    those cannot answer (Windows, WSL2). A CPU-only Linux machine answers in microseconds
    and never starts the CUDA provider, which would otherwise print load errors.
    """
    if sys.platform.startswith("linux"):
        gpus = Path("/proc/driver/nvidia/gpus")
        if (gpus.is_dir() and any(gpus.iterdir())) or glob.glob("/dev/nvidia[0-9]*"):
            return True
        if not Path("/dev/dxg").exists():  # WSL2 exposes GPUs through /dev/dxg only
            return False
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        done = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and "GPU" in done.stdout


def resolve_providers(request: str) -> list[str]:
    """onnxruntime execution providers for a ``--provider`` value, best first.

    ``auto``: TensorRT, then CUDA, then CPU, keeping those this onnxruntime build has and
    the GPU ones only when an NVIDIA GPU is present. ``tensorrt`` also lists CUDA, so the
    nodes TensorRT cannot take run on the GPU rather than the CPU. CPU always comes last:
    onnxruntime places there whatever the others cannot run.

    Raises:
        RetinoError: an unknown value, or an explicit provider this build or machine lacks.
    """
    import onnxruntime as ort

    request = request.strip().lower()
    if request not in PROVIDER_CHOICES:
        raise RetinoError(f"unknown provider {request!r}; choose from {', '.join(PROVIDER_CHOICES)}")
    available = ort.get_available_providers()
    if request == "auto":
        gpu = nvidia_gpu_present()
        return [p for p in (TENSORRT, CUDA) if gpu and p in available] + [CPU]
    wanted = PROVIDERS[request]
    if wanted not in available:
        hint = "; install onnxruntime-gpu for GPU providers" if request != "cpu" else ""
        raise RetinoError(f"provider {request} ({wanted}) is not available in onnxruntime "
                          f"{ort.__version__}; available: {', '.join(available)}{hint}")
    if wanted == CPU:
        return [CPU]
    if not nvidia_gpu_present():
        raise RetinoError(f"provider {request} needs an NVIDIA GPU and this machine shows none; "
                          "use --provider cpu or auto")
    chain = [TENSORRT, CUDA] if wanted == TENSORRT else [CUDA]
    return [p for p in chain if p in available] + [CPU]


def provider_options(names: Sequence[str], info: ModelInfo) -> tuple[list, list[str]]:
    """(providers with their options, notes) for an InferenceSession."""
    notes: list[str] = []
    out: list = []
    for name in names:
        if name == TENSORRT:
            opts = {"trt_fp16_enable": str(info.precision == "fp16")}
            # Building an engine takes minutes; cache it next to the model. One folder per
            # export (its timestamp and size), because onnxruntime's cache names do not
            # notice that model.onnx was replaced by a new export.
            stamp = f"{info.exported}|{info.path.stat().st_size}".encode()
            digest = hashlib.sha1(stamp, usedforsecurity=False).hexdigest()[:10]
            cache = info.path.parent / ".trt-cache" / f"{info.path.stem}-{digest}"
            try:
                cache.mkdir(parents=True, exist_ok=True)
                opts.update(trt_engine_cache_enable="True", trt_engine_cache_path=str(cache),
                            trt_timing_cache_enable="True", trt_timing_cache_path=str(cache))
            except OSError as exc:
                notes.append(f"TensorRT engine cache disabled: cannot create {cache} ({exc.strerror})")
            out.append((name, opts))
        elif name == CUDA:
            # cuDNN's default EXHAUSTIVE search benchmarks every convolution algorithm for
            # every new input shape; with a dynamic batch each new batch size (the last,
            # partial batch of every folder) pays seconds again. HEURISTIC asks cuDNN's
            # heuristics instead: no benchmarking, within a few percent of the best.
            out.append((name, {"cudnn_conv_algo_search": "HEURISTIC"}))
        else:
            out.append(name)
    return out, notes


def preload_gpu_libraries() -> str:
    """Load CUDA/cuDNN from the nvidia-* pip packages, if onnxruntime can; returns its chatter.

    onnxruntime >= 1.21 finds the libraries installed as pip packages only when asked to;
    without it the CUDA provider silently falls back to the CPU.
    """
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return ""
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):  # it prints failures; they go into our message
            preload()
    except Exception as exc:  # noqa: BLE001
        # Best effort only: the session creation that follows reports what matters.
        return first_line(exc)
    return " ".join(line.strip() for line in chatter.getvalue().splitlines() if line.strip())


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")

_ORT_SOURCE = re.compile(r"/onnxruntime_src/\S+:\d+ .*?\)\s(?=[A-Z])")

def ort_reason(exc: BaseException) -> str:
    """onnxruntime's error without its C++ source location and signature."""
    text = _ORT_PREFIX.sub("", first_line(exc))
    return _ORT_SOURCE.sub("", text).strip() or text


def cuda_expected() -> str:
    try:
        from onnxruntime.capi import build_and_package_info as build

        return f"CUDA {build.cuda_version.split('.')[0]} and cuDNN 9"
    except Exception:  # noqa: BLE001
        return "CUDA and cuDNN"


def short_name(provider: str) -> str:
    return {TENSORRT: "TensorRT", CUDA: "CUDA", CPU: "CPU"}.get(provider, provider)
