"""An exported ONNX model as a grader: its metadata, its execution provider, its outputs.

No torch: `retino predict` (and `evaluate` on an .onnx file) run where only onnxruntime,
numpy and PIL are installed. onnx and onnxruntime themselves are imported by the
functions that use them, so export.py can build metadata without loading a runtime.

The contract with export.py, all in one place:

    input    ``images``: float32 (float16 for an fp16 model) NCHW [batch, 3, S, S],
             normalised as the model's Preprocess says
    outputs  ``logits`` and ``probs``: [batch, number of grades] (classification head); other
             heads (``retino.grader``: regression, ordinal) output only ``logits``, the raw
             head [batch, 1 or K-1], and `retinocli.models.grading` turns it into probabilities and
             grades with the cut points stored in ``retino.grader``; the temperature, frozen referral
             threshold and fellow-eye fusion stored there (issue #15) apply to every head,
             the classification head's graph ``probs`` included
    metadata string key/values, all under ``retino.``; `metadata_props` writes them and
             `parse_metadata` reads them back, as data only (json.loads, never eval)
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retinocli import __version__
from retinocli.errors import RetinoError
from retinocli.imaging.preprocess import Preprocess, to_batch
from retinocli.models.grading import HEADS, Grader

if TYPE_CHECKING:
    import onnx
    import onnxruntime

META_PREFIX = "retino."
FORMAT = "1"
PRECISIONS = ("fp32", "fp16", "int8")
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probs")

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: --provider values and the onnxruntime execution provider each one asks for.
PROVIDERS: dict[str, str] = {"tensorrt": TENSORRT, "cuda": CUDA, "cpu": CPU}
PROVIDER_CHOICES: tuple[str, ...] = ("auto", *PROVIDERS)
_INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ORT_QUIET = 3  # session log level: errors only; onnxruntime's warnings are not for users


# --------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class ModelInfo:
    """What an exported model says about itself: grades, preprocessing, provenance."""

    path: Path
    grade_names: tuple[str, ...]
    preprocess: Preprocess
    arch: str = ""
    weights: str = "none"
    mode: str = ""
    run: str = ""  # the run folder's name, never a path
    checkpoint: str = ""  # the checkpoint's file name, never a path
    checkpoint_sha256: str = ""
    epoch: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    version: str = ""
    exported: str = ""
    grader: dict[str, Any] = field(default_factory=dict)  # Grader.to_dict(); empty: softmax classifier

    @property
    def num_grades(self) -> int:
        return len(self.grade_names)

    @property
    def grading(self) -> Grader:
        """How this model's outputs become probabilities and grades (retinocli.models.grading)."""
        return Grader.from_dict({"num_grades": self.num_grades, **self.grader})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; ``metadata_props(info.to_dict())`` writes it back."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["path"] = str(self.path)
        d["grade_names"] = list(self.grade_names)
        d["preprocess"] = self.preprocess.to_dict()
        d["metrics"] = dict(self.metrics)
        grader = d.pop("grader")
        if grader:  # only where the head is not a softmax classifier, as in the metadata
            d["grader"] = dict(grader)
        return d


def _json_default(obj: Any) -> Any:
    # Metrics arrive from numpy code: np.int64 counts, arrays of per-class scores.
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def metadata_props(info_fields: Mapping[str, Any]) -> dict[str, str]:
    """The ``retino.*`` string properties for an ONNX file, from plain values.

    Args:
        info_fields: ModelInfo's fields as plain values (``path`` is ignored):
            ``grade_names`` (list of str) and ``preprocess`` (dict or Preprocess) are
            required; ``arch``, ``weights``, ``mode``, ``run`` (the run's name),
            ``checkpoint`` (its file name), ``checkpoint_sha256``, ``epoch`` (int or
            None), ``metrics`` (dict), ``precision`` (fp32, fp16 or int8), ``version``
            (default: this retino) and ``exported`` (ISO time, default: now) are optional.
            ``run`` and ``checkpoint`` are names, not paths: a shared model must not carry
            its author's folders.

    Raises:
        ValueError: an unknown field, a missing required one, or a value of the wrong kind
            (a bug in the caller, not a user error).
    """
    known = {f.name for f in fields(ModelInfo)}
    unknown = sorted(set(info_fields) - known)
    if unknown:
        raise ValueError(f"metadata_props: unknown field(s) {', '.join(unknown)}")
    for required in ("grade_names", "preprocess"):
        if required not in info_fields:
            raise ValueError(f"metadata_props: {required} is required")
    names = info_fields["grade_names"]
    if isinstance(names, str) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"metadata_props: grade_names must be a list of strings, got {names!r}")
    prep = info_fields["preprocess"]
    prep = prep if isinstance(prep, Preprocess) else Preprocess.from_dict(prep)
    metrics = info_fields.get("metrics") or {}
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metadata_props: metrics must be a mapping, got {type(metrics).__name__}")
    precision = info_fields.get("precision") or "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"metadata_props: precision must be one of {', '.join(PRECISIONS)}")
    for key in ("run", "checkpoint"):
        value = str(info_fields.get(key) or "")
        if "/" in value or "\\" in value:
            raise ValueError(f"metadata_props: {key} must be a name, not a path, got {value!r}")
    digest = str(info_fields.get("checkpoint_sha256") or "")
    if digest and not _SHA256.fullmatch(digest):
        raise ValueError(f"metadata_props: checkpoint_sha256 must be 64 hex digits, got {digest!r}")
    epoch = info_fields.get("epoch")
    exported = info_fields.get("exported") or datetime.now(timezone.utc).isoformat(timespec="seconds")

    def text(key: str, default: str = "") -> str:
        value = info_fields.get(key)
        return default if value is None else str(value)

    props = {
        "format": FORMAT,
        "version": text("version") or __version__,
        "grade_names": json.dumps(list(names), ensure_ascii=False),
        "preprocess": json.dumps(prep.to_dict()),
        "arch": text("arch"),
        "weights": text("weights", "none"),
        "mode": text("mode"),
        "run": text("run"),
        "checkpoint": text("checkpoint"),
        "checkpoint_sha256": digest,
        "epoch": "" if epoch is None else str(int(epoch)),
        "metrics": json.dumps(dict(metrics), ensure_ascii=False, default=_json_default),
        "precision": precision,
        "exported": str(exported),
    }
    if info_fields.get("grader"):  # absent: a softmax classifier, as every export before issue #14
        props["grader"] = json.dumps(dict(info_fields["grader"]))
    return {META_PREFIX + k: v for k, v in props.items()}


def _last_part(value: str) -> str:
    """A name from what may be a path: models exported before names replaced paths stored
    absolute ones, and only their last part means anything on another machine."""
    return value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as 64 hex digits (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def set_metadata(model: onnx.ModelProto, info_fields: Mapping[str, Any]) -> None:
    """Replace the ``retino.*`` entries of ``model.metadata_props``; other entries stay."""
    keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    for key, value in [*keep, *metadata_props(info_fields).items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def _json_value(ours: dict[str, str], key: str, name: str) -> Any:
    try:
        return json.loads(ours[key])
    except json.JSONDecodeError as exc:
        raise RetinoError(f"{name}: {META_PREFIX}{key} is not valid JSON ({exc.msg} at "
                          f"position {exc.pos}); re-export it with `retino export`") from None


def parse_metadata(props: Mapping[str, str], path: str | Path) -> ModelInfo:
    """The ModelInfo that ``props`` (an ONNX file's metadata_props) describe.

    The inverse of `metadata_props`: ``parse_metadata(metadata_props(d), p).to_dict()``
    equals ``d`` with ``path`` set to ``p``. Keys outside ``retino.`` are ignored.

    Raises:
        RetinoError: no retino metadata, an unknown format, a required key missing, or a
            value that is not what export writes; one line naming the file.
    """
    name = str(path)
    ours = {k[len(META_PREFIX):]: v for k, v in props.items() if k.startswith(META_PREFIX)}
    if "format" not in ours:
        raise RetinoError(f"{name} has no retino metadata; export it with `retino export`")
    if ours["format"] != FORMAT:
        raise RetinoError(f"{name}: retino metadata format {ours['format']!r} is not supported "
                          f"(retino {__version__} reads format {FORMAT}); re-export it with "
                          "this version of retino")
    for key in ("grade_names", "preprocess"):
        if key not in ours:
            raise RetinoError(f"{name}: the retino metadata lacks {META_PREFIX}{key}; "
                              "re-export it with `retino export`")

    names = _json_value(ours, "grade_names", name)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise RetinoError(f"{name}: {META_PREFIX}grade_names must be a non-empty JSON list of "
                          f"strings, got {ours['grade_names']!r}")
    try:
        prep = Preprocess.from_dict(_json_value(ours, "preprocess", name))
    except RetinoError as exc:
        if str(exc).startswith(name):
            raise
        raise RetinoError(f"{name}: {META_PREFIX}preprocess: {exc}") from None
    metrics = _json_value(ours, "metrics", name) if ours.get("metrics") else {}
    if not isinstance(metrics, dict):
        raise RetinoError(f"{name}: {META_PREFIX}metrics must be a JSON object, "
                          f"got {ours['metrics']!r}")
    epoch_text = ours.get("epoch", "").strip()
    if epoch_text and not re.fullmatch(r"-?\d+", epoch_text):
        raise RetinoError(f"{name}: {META_PREFIX}epoch must be an integer, got {epoch_text!r}")
    precision = ours.get("precision") or "fp32"
    if precision not in PRECISIONS:
        raise RetinoError(f"{name}: {META_PREFIX}precision must be one of "
                          f"{', '.join(PRECISIONS)}, got {precision!r}")
    digest = ours.get("checkpoint_sha256", "").strip().lower()
    if digest and not _SHA256.fullmatch(digest):
        raise RetinoError(f"{name}: {META_PREFIX}checkpoint_sha256 must be 64 hex digits, got {digest!r}")
    return ModelInfo(
        path=Path(path), grade_names=tuple(names), preprocess=prep,
        arch=ours.get("arch", ""), weights=ours.get("weights", "none"),
        mode=ours.get("mode", ""), run=_last_part(ours.get("run", "")),
        checkpoint=_last_part(ours.get("checkpoint", "")), checkpoint_sha256=digest,
        epoch=int(epoch_text) if epoch_text else None, metrics=metrics,
        precision=precision, version=ours.get("version", ""), exported=ours.get("exported", ""),
        grader=_grader_value(ours, name),
    )


def _grader_value(ours: dict[str, str], name: str) -> dict[str, Any]:
    if not ours.get("grader"):
        return {}
    value = _json_value(ours, "grader", name)
    try:
        Grader.from_dict(value).cuts  # noqa: B018 - parses head, cut points and scale
        if not isinstance(value, dict) or value.get("head", "classification") not in HEADS:
            raise ValueError(value)
    except (TypeError, ValueError, AttributeError, KeyError):
        raise RetinoError(f"{name}: {META_PREFIX}grader is not what export writes: {ours['grader']!r}") from None
    return value


# --------------------------------------------------------------------------- the file


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def load_model_file(path: str | Path) -> onnx.ModelProto:
    """Read and check an ONNX file; the weights of an external-data model stay on disk.

    Raises:
        RetinoError: missing, empty or not an ONNX protobuf, or failing
            ``onnx.checker.check_model(path, full_check=True)``; one line.
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.exists():
        raise RetinoError(f"{path}: file not found")
    if not path.is_file():
        raise RetinoError(f"{path} is a folder, not an ONNX model file")
    if path.stat().st_size == 0:
        raise RetinoError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeWarning, UnicodeDecodeError) as exc:
        raise RetinoError(f"{path} is not an ONNX model file ({_first_line(exc)})") from None
    except OSError as exc:
        raise RetinoError(f"{path}: cannot read it ({exc.strerror or _first_line(exc)})") from None
    try:
        # The path, not the proto: the checker then reads external data itself, so a
        # model over protobuf's 2 GB limit can be checked.
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001
        # onnx raises ValidationError, InferenceError, or plain C++ exceptions surfaced as
        # RuntimeError/ValueError depending on what is wrong; all mean a broken file.
        raise RetinoError(f"{path} is not a valid ONNX model ({_first_line(exc)})") from None
    return model


def read_model_info(path: str | Path) -> ModelInfo:
    """Load and check ``path`` and parse its retino metadata."""
    model = load_model_file(path)
    return parse_metadata({p.key: p.value for p in model.metadata_props}, path)


# --------------------------------------------------------------------------- providers


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


def _provider_options(names: Sequence[str], info: ModelInfo) -> tuple[list, list[str]]:
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


def _preload_gpu_libraries() -> str:
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
        return _first_line(exc)
    return " ".join(line.strip() for line in chatter.getvalue().splitlines() if line.strip())


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_SOURCE = re.compile(r"/onnxruntime_src/\S+:\d+ .*?\)\s(?=[A-Z])")


def _ort_reason(exc: BaseException) -> str:
    """onnxruntime's error without its C++ source location and signature."""
    text = _ORT_PREFIX.sub("", _first_line(exc))
    return _ORT_SOURCE.sub("", text).strip() or text


def _cuda_expected() -> str:
    try:
        from onnxruntime.capi import build_and_package_info as build

        return f"CUDA {build.cuda_version.split('.')[0]} and cuDNN 9"
    except Exception:  # noqa: BLE001
        return "CUDA and cuDNN"


# --------------------------------------------------------------------------- the grader


class OnnxGrader:
    """An exported retino model, ready to grade images on the best provider there is.

    Attributes:
        path: the ONNX file.
        info: its ModelInfo (grade names, preprocessing, provenance).
        session: the onnxruntime InferenceSession.
        provider: the execution provider actually running it, e.g. "CPUExecutionProvider".
        notes: what a user should know, e.g. that auto fell back to the CPU and why.
    """

    def __init__(self, path: str | Path, provider: str = "auto", threads: int | None = None):
        self.path = Path(path)
        self.info = read_model_info(self.path)
        self.notes: list[str] = []
        request = provider.strip().lower()
        names = resolve_providers(request)
        options = self._session_options(threads)

        # auto tries each GPU provider in turn, then the CPU; an explicit one must take.
        attempts = [names[i:] for i in range(len(names) - 1)] + [[CPU]] if request == "auto" else [names]
        for i, chain in enumerate(attempts):
            wanted = chain[0]
            chatter = _preload_gpu_libraries() if wanted != CPU else ""
            session, failure = self._try_session(chain, options)
            if session is not None and session.get_providers()[0] == wanted:
                self.session = session
                break
            if failure is None:
                failure = (f"onnxruntime could not start it (needs {_cuda_expected()} libraries"
                           f"{'; ' + chatter if chatter else ''})")
            if wanted == CPU or request != "auto":
                if wanted == CPU:
                    raise RetinoError(f"{self.path}: onnxruntime cannot run this model: {failure}")
                raise RetinoError(f"provider {request} was requested but {failure}; "
                                  "use --provider auto or cpu")
            nxt = attempts[i + 1][0]
            self.notes.append(f"{_short(wanted)} did not start ({failure}); using {_short(nxt)}")
        self.provider: str = self.session.get_providers()[0]
        self._check_signature()

    def _session_options(self, threads: int | None) -> onnxruntime.SessionOptions:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = _ORT_QUIET
        if threads is not None:
            if threads < 1:
                raise RetinoError(f"threads must be >= 1, got {threads}")
            options.intra_op_num_threads = threads
        return options

    def _try_session(self, chain: list[str], options) -> tuple[Any, str | None]:
        import onnxruntime as ort

        providers, notes = _provider_options(chain, self.info)
        try:
            # enable_fallback=0: onnxruntime's own fallback prints to stdout and retries
            # on the CPU behind our back; we decide, and say so in a note.
            session = ort.InferenceSession(str(self.path), sess_options=options,
                                           providers=providers, enable_fallback=0)
        except Exception as exc:  # noqa: BLE001
            # onnxruntime raises its own Fail/InvalidGraph/RuntimeError types for a model or
            # provider it cannot load; which one depends on the build.
            return None, _ort_reason(exc)
        self.notes += notes
        return session, None

    def _check_signature(self) -> None:
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        needed = OUTPUT_NAMES if self.info.grading.head == "classification" else OUTPUT_NAMES[:1]
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME or any(n not in outputs for n in needed):
            found = f"inputs {[i.name for i in inputs]}, outputs {outputs}"
            raise RetinoError(f"{self.path}: expected one input 'images' and outputs 'logits' and "
                              f"'probs'; found {found}")
        kind = inputs[0].type
        if kind not in _INPUT_TYPES:
            raise RetinoError(f"{self.path}: input 'images' is {kind}; expected tensor(float) or "
                              "tensor(float16)")
        self.input_dtype = _INPUT_TYPES[kind]
        shape = inputs[0].shape
        size = self.info.preprocess.size
        static = [d if isinstance(d, int) else None for d in shape]
        if len(shape) != 4 or static[1] not in (3, None) or any(
                d not in (size, None) for d in static[2:]):
            raise RetinoError(f"{self.path}: input 'images' has shape {shape}, but its metadata "
                              f"asks for [batch, 3, {size}, {size}]")
        k = self.info.num_grades
        for out in self.session.get_outputs():
            width = out.shape[-1] if out.name in OUTPUT_NAMES and out.shape else None
            want = self.info.grading.width if out.name == "logits" else k
            if isinstance(width, int) and width != want:
                raise RetinoError(f"{self.path}: output '{out.name}' has {width} values, but its metadata "
                                  f"asks for {want} ({self.info.grading.head} head, {k} grades: "
                                  f"{', '.join(self.info.grade_names)})")

    @property
    def grade_names(self) -> tuple[str, ...]:
        return self.info.grade_names

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised NCHW input -> (raw head outputs, probs), float32; probs ``[batch, grades]``.

        The input is cast to the model's own dtype (float16 for an fp16 export).
        """
        x = np.asarray(x)
        size = self.info.preprocess.size
        if x.ndim != 4 or x.shape[1:] != (3, size, size):
            raise ValueError(f"expected NCHW input of shape (n, 3, {size}, {size}), got {x.shape}")
        grading = self.info.grading
        if x.shape[0] == 0:
            return np.zeros((0, grading.width), np.float32), np.zeros((0, self.info.num_grades), np.float32)
        feed = {INPUT_NAME: np.ascontiguousarray(x, dtype=self.input_dtype)}
        try:
            if grading.head == "classification":
                logits, probs = self.session.run(list(OUTPUT_NAMES), feed)
                probs = grading.calibrate(probs)  # the stored temperature (identity at T = 1)
            else:
                (logits,) = self.session.run(["logits"], feed)
                probs = grading.probabilities(logits)
        except Exception as exc:
            # onnxruntime's own errors (out of GPU memory, a provider failing mid-run) are
            # the user's to act on; anything else is a bug and keeps its traceback.
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            raise RetinoError(f"{self.path}: onnxruntime failed on a batch of {len(x)} on "
                              f"{self.provider}: {_ort_reason(exc)}; a smaller --batch-size "
                              "may help") from None
        if probs.ndim != 2 or probs.shape[1] != self.info.num_grades:  # a dynamic output axis
            raise RetinoError(f"{self.path}: the model gave outputs of shape {list(probs.shape)}, but its "
                              f"metadata names {self.info.num_grades} grades")
        return np.asarray(logits, np.float32), np.asarray(probs, np.float32)

    def predict(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """uint8 HWC images (the output of ``preprocess.load_and_prepare``) -> probs."""
        if len(images) == 0:
            return np.zeros((0, self.info.num_grades), np.float32)
        return self.run(to_batch(images, self.info.preprocess))[1]


def _short(provider: str) -> str:
    return {TENSORRT: "TensorRT", CUDA: "CUDA", CPU: "CPU"}.get(provider, provider)

