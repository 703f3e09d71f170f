"""What an exported ONNX file carries besides its graph, and reading it back.

No torch, and no onnxruntime: ``export`` writes the metadata with :func:`set_metadata`, and
``predict``/``evaluate`` read it with :func:`read_model_info` before choosing a provider.

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

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retinocli import __version__
from retinocli.errors import RetinoError, first_line
from retinocli.imaging.preprocess import Preprocess
from retinocli.models.grading import HEADS, Grader

if TYPE_CHECKING:
    import onnx

META_PREFIX = "retino."

FORMAT = "1"

PRECISIONS = ("fp32", "fp16", "int8")

INPUT_NAME = "images"

OUTPUT_NAMES = ("logits", "probs")

_SHA256 = re.compile(r"[0-9a-f]{64}")

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
        raise RetinoError(f"{path} is not an ONNX model file ({first_line(exc)})") from None
    except OSError as exc:
        raise RetinoError(f"{path}: cannot read it ({exc.strerror or first_line(exc)})") from None
    try:
        # The path, not the proto: the checker then reads external data itself, so a
        # model over protobuf's 2 GB limit can be checked.
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001
        # onnx raises ValidationError, InferenceError, or plain C++ exceptions surfaced as
        # RuntimeError/ValueError depending on what is wrong; all mean a broken file.
        raise RetinoError(f"{path} is not a valid ONNX model ({first_line(exc)})") from None
    return model


def read_model_info(path: str | Path) -> ModelInfo:
    """Load and check ``path`` and parse its retino metadata."""
    model = load_model_file(path)
    return parse_metadata({p.key: p.value for p in model.metadata_props}, path)
