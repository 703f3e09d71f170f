"""An exported ONNX model as a grader: images in, logits, probabilities and grades out.

No torch: `retino predict` (and `evaluate` on an .onnx file) run where only onnxruntime,
numpy and PIL are installed. The file's metadata is read by :mod:`retinocli.deploy.metadata`
(which also states the input/output contract with export), and the execution provider chosen by
:mod:`retinocli.deploy.providers`.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from retinocli.deploy.metadata import INPUT_NAME, OUTPUT_NAMES, read_model_info
from retinocli.deploy.providers import (CPU, cuda_expected, ort_reason, preload_gpu_libraries, provider_options,
                                        resolve_providers, short_name)
from retinocli.errors import RetinoError
from retinocli.imaging.preprocess import to_batch

if TYPE_CHECKING:
    import onnxruntime

_INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_ORT_QUIET = 3  # session log level: errors only; onnxruntime's warnings are not for users


# --------------------------------------------------------------------------- metadata


# --------------------------------------------------------------------------- the file


# --------------------------------------------------------------------------- providers


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
            chatter = preload_gpu_libraries() if wanted != CPU else ""
            session, failure = self._try_session(chain, options)
            if session is not None and session.get_providers()[0] == wanted:
                self.session = session
                break
            if failure is None:
                failure = (f"onnxruntime could not start it (needs {cuda_expected()} libraries"
                           f"{'; ' + chatter if chatter else ''})")
            if wanted == CPU or request != "auto":
                if wanted == CPU:
                    raise RetinoError(f"{self.path}: onnxruntime cannot run this model: {failure}")
                raise RetinoError(f"provider {request} was requested but {failure}; "
                                  "use --provider auto or cpu")
            nxt = attempts[i + 1][0]
            self.notes.append(f"{short_name(wanted)} did not start ({failure}); using {short_name(nxt)}")
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

        providers, notes = provider_options(chain, self.info)
        try:
            # enable_fallback=0: onnxruntime's own fallback prints to stdout and retries
            # on the CPU behind our back; we decide, and say so in a note.
            session = ort.InferenceSession(str(self.path), sess_options=options,
                                           providers=providers, enable_fallback=0)
        except Exception as exc:  # noqa: BLE001
            # onnxruntime raises its own Fail/InvalidGraph/RuntimeError types for a model or
            # provider it cannot load; which one depends on the build.
            return None, ort_reason(exc)
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
                              f"{self.provider}: {ort_reason(exc)}; a smaller --batch-size "
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


