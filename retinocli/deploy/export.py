"""Checkpoint -> a self-describing ONNX file that ``retino predict`` can use without torch.

The file holds the eval-mode network (dynamic batch axis, outputs ``logits`` and ``probs``) and,
in ``metadata_props``, everything prediction needs: grade names, preprocessing, architecture,
weights, metrics at export, and where it came from by name and hash (the run's name, the
checkpoint's file name and SHA-256; never a path of the exporting machine)
(:func:`retinocli.deploy.metadata.metadata_props`). Before it is put in
place it passes ``onnx.checker``'s full check and a parity check against PyTorch on real images
from the run. ``--fp16`` halves the weights for GPUs; ``--int8`` quantises statically (QDQ,
per-channel) with calibration images from the training split, and measures the accuracy it costs
on the validation split.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retinocli import __version__
from retinocli.config import ExportConfig, config_of
from retinocli.errors import RetinoError
from retinocli.events import EventsLike, emitter
from retinocli.imaging.preprocess import Preprocess, load_and_prepare, to_batch
from retinocli.models.grading import Grader

OPSET = ExportConfig.opset
PARITY_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}  # largest |probability difference| allowed
PARITY_BATCHES = (1, 7)  # the batch axis is dynamic: both must run
CALIBRATION_IMAGES = ExportConfig.calibration_images


@dataclass
class ExportResult:
    path: Path
    checkpoint: Path
    precision: str
    opset: int
    size_bytes: int
    seconds: float
    parity: dict[str, Any]  # max_abs_diff_probs, max_abs_diff_logits, batches, images, checked
    quantization: dict[str, Any] | None = None  # int8: val accuracy before and after
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"], d["checkpoint"] = str(self.path), str(self.checkpoint)
        return d


def export(target: str | Path | None = None, config: ExportConfig | None = None, *, events: EventsLike = None,
           **options) -> ExportResult:
    """Export a run (its best.pt), a checkpoint, or the newest run to ONNX; see the module doc.

    ``config`` holds the settings, or ``options`` make one (:class:`retinocli.config.ExportConfig`'s
    fields). ``events`` hears what is being done, as messages (see :mod:`retinocli.events`).
    """
    from retinocli.engine.checkpoints import load_trained
    from retinocli.rundir import RunDir

    cfg = config_of(ExportConfig, config, options)
    import onnx

    if cfg.opset > onnx.defs.onnx_opset_version():
        raise RetinoError(f"--opset {cfg.opset} is newer than onnx {onnx.__version__} knows "
                          f"(up to {onnx.defs.onnx_opset_version()})")
    precision, opset, force, calibration_images = cfg.precision, cfg.opset, cfg.force, cfg.calibration_images
    say = emitter(events).message
    start = time.perf_counter()
    ckpt = RunDir.resolve_checkpoint(target)
    out = Path(cfg.out) if cfg.out is not None else RunDir.of(ckpt).model(precision)
    if out.suffix.lower() != ".onnx":
        raise RetinoError(f"--out must end in .onnx, got {out}")
    if out.exists() and not force:
        raise RetinoError(f"{out} already exists; pass --force to overwrite it")
    model, state = load_trained(ckpt)
    prep = Preprocess.from_dict(state["preprocess"])
    say(f"Exporting {ckpt} (epoch {state.get('epoch')}, {state['config'].get('arch')}) -> {out} [{precision}]")

    grading = Grader.from_dict({"num_grades": len(state.get("class_names") or []) or 5,
                                **(state.get("grader") or {})})
    wrapped = _with_probs(model, head=grading.head).eval()
    rows = RunDir.of(ckpt).read_split()
    sample = _sample_images(rows, prep, 8)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        exported = Path(tmp) / "exported.onnx"
        final = Path(tmp) / "final.onnx"
        import onnx

        notes: list[str] = []
        quantization = None
        # fp16: half weights and activations inside, float32 in and out, so callers never cast
        to_onnx(model, prep.size, exported, opset=opset, half=precision == "fp16", head=grading.head)
        proto = _at_opset(onnx.load(exported), opset)
        _set_metadata(proto, state, ckpt, precision)
        if precision == "int8":
            onnx.save(proto, exported)
            quantization = _quantize(exported, final, rows, RunDir.of(ckpt).split, prep, calibration_images, say)
        else:
            onnx.save(proto, final)
        try:
            onnx.checker.check_model(str(final), full_check=True)
        except Exception as exc:
            raise RetinoError(f"exported model failed onnx.checker: {str(exc).splitlines()[0]}") from None
        parity = _parity(wrapped, final, to_batch(list(sample), prep), precision, notes, grading)
        os.replace(final, out)
    if quantization is not None:
        notes.append(f"int8 val accuracy {quantization['accuracy_int8']:.1%} vs fp32 "
                     f"{quantization['accuracy_fp32']:.1%} on {quantization['images']} val images")
    return ExportResult(path=out, checkpoint=ckpt, precision=precision, opset=opset,
                        size_bytes=out.stat().st_size, seconds=round(time.perf_counter() - start, 2),
                        parity=parity, quantization=quantization, notes=notes)


def to_onnx(model, size: int, path: Path, *, opset: int = OPSET, half: bool = False,
            head: str = "classification") -> None:
    """Write ``model`` (a grading network) with ``logits`` and ``probs`` outputs to ``path``
    (other heads than classification: ``logits`` only, the raw head; see retinocli.deploy.onnx_model).

    ``half`` exports a float16 copy; ``model`` itself is left as it is.
    """
    net = copy.deepcopy(model) if half else model
    _torch_export(_with_probs(net, half=half, head=head).eval(), size, path, opset)


def _with_probs(net, *, half: bool = False, head: str = "classification"):
    """The grading network with a softmax output beside its logits (torch imported on use).

    ``half`` runs the network in float16 between a cast of the float32 input and of its logits.
    Regression and ordinal heads keep their raw output only: their probabilities and grades
    need the fitted cut points, which retinocli.models.grading applies in numpy on both sides, so
    the graph and the checkpoint share one post-processing.
    """
    import torch
    from torch import nn

    class WithProbs(nn.Module):
        """The grading network with a softmax head beside its logits."""

        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net.half() if half else net
            self.head = head

        def forward(self, images: torch.Tensor):
            logits = self.net(images.half()).float() if half else self.net(images)
            if self.head != "classification":
                return logits
            return logits, torch.softmax(logits, dim=1)

    return WithProbs(net)


def _torch_export(wrapped, size: int, path: Path, opset: int) -> None:
    import torch

    outputs = ("logits", "probs") if wrapped.head == "classification" else ("logits",)

    x = torch.randn(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if opset < 18:  # the torch.export exporter writes opset 18 and up only
            torch.onnx.export(wrapped, (x,), str(path), input_names=["images"], output_names=list(outputs),
                              opset_version=opset, dynamo=False,
                              dynamic_axes={n: {0: "batch"} for n in ("images", *outputs)})
            return
        try:
            torch.onnx.export(wrapped, (x,), str(path), input_names=["images"], output_names=list(outputs),
                              dynamic_shapes={"images": {0: batch}}, opset_version=opset, dynamo=True,
                              external_data=False, verbose=False)
        except Exception as exc:  # the torch.export path refuses some graphs: the TorchScript one remains
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            try:
                torch.onnx.export(wrapped, (x,), str(path), input_names=["images"],
                                  output_names=list(outputs), opset_version=opset, dynamo=False,
                                  dynamic_axes={n: {0: "batch"} for n in ("images", *outputs)})
            except Exception as exc2:
                raise RetinoError(f"ONNX export failed: {first}; TorchScript exporter: "
                                  f"{str(exc2).splitlines()[0][:160]}") from None


def _at_opset(proto, opset: int):
    """Check the model is at exactly the ``--opset`` asked for."""
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise RetinoError(f"the exporter wrote opset {written}, not the --opset {opset} asked for")
    return proto


def _set_metadata(proto, state: dict, ckpt: Path, precision: str) -> None:
    """The retino metadata; the run and checkpoint by name and hash, never by path."""
    from retinocli.deploy.metadata import file_sha256, set_metadata

    cfg = state["config"]
    scalars = {k: v for k, v in (state.get("metrics") or {}).items() if isinstance(v, (int, float))}
    set_metadata(proto, {
        "grade_names": list(state.get("class_names") or []),
        "preprocess": state["preprocess"],
        "arch": cfg.get("arch"), "weights": cfg.get("weights") or "none", "mode": cfg.get("mode"),
        "run": ckpt.absolute().parent.name, "checkpoint": ckpt.name, "checkpoint_sha256": file_sha256(ckpt),
        "epoch": state.get("epoch"),
        "metrics": {"val": scalars}, "precision": precision, "version": __version__,
        # absent for a plain softmax classifier with nothing fitted, as every export before #14
        **({"grader": state["grader"]} if not Grader.from_dict(
            {"num_grades": len(state.get("class_names") or []) or 5, **(state.get("grader") or {})}).is_default
           else {}),
    })
    proto.producer_name, proto.producer_version = "retino", __version__
    proto.doc_string = f"retino diabetic-retinopathy grader ({cfg.get('arch')}, {precision})"


def _readable(paths, prep: Preprocess, n: int) -> list[np.ndarray]:
    """The first ``n`` of ``paths`` that decode, prepared as uint8 HWC."""
    out: list[np.ndarray] = []
    for path in paths:
        if len(out) == n:
            break
        try:
            out.append(load_and_prepare(path, prep))
        except (RetinoError, OSError):
            continue
    return out


def _sample_images(rows, prep: Preprocess, n: int) -> np.ndarray:
    """Up to ``n`` real images of the run (val first, then train), prepared as uint8 NHWC.

    Parity on real fundus pixels exercises the value ranges a model meets; random noise is the
    fallback when the run's images are gone.
    """
    out: list[np.ndarray] = []
    if rows is not None:
        paths = list(rows.loc[rows["split"] == "val", "path"]) + list(rows.loc[rows["split"] == "train", "path"])
        out = _readable(paths[: 4 * n], prep, n)
    rng = np.random.default_rng(0)
    while len(out) < n:
        out.append(rng.integers(0, 256, (prep.size, prep.size, 3), dtype=np.uint8))
    return np.stack(out)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _parity(wrapped, path: Path, x: np.ndarray, precision: str, notes: list[str],
            grading: Grader | None = None) -> dict[str, Any]:
    """Largest |difference| of PyTorch and onnxruntime (CPU) outputs at batch 1 and 7 of ``x``;
    the probabilities of both come from their logits through ``grading`` where the graph has none."""
    import torch

    try:
        session = _session(path)
    except Exception as exc:
        if precision == "fp16":  # the CPU provider lacks fp16 kernels for some ops
            notes.append(f"fp16 parity not checked on CPU ({str(exc).splitlines()[0][:100]}); "
                         "it runs on the CUDA and TensorRT providers")
            return {"checked": False, "batches": [], "max_abs_diff_probs": None, "max_abs_diff_logits": None}
        raise RetinoError(f"onnxruntime cannot load the exported model: {str(exc).splitlines()[0]}") from None
    d_probs = d_logits = 0.0
    for b in PARITY_BATCHES:
        xb = x[:b]
        with torch.no_grad():
            out_t = wrapped(torch.from_numpy(xb))
        if grading is None or grading.head == "classification":
            logits_t, probs_t = (t.numpy() for t in out_t)
            logits_o, probs_o = session.run(["logits", "probs"], {"images": xb})
        else:
            logits_t, (logits_o,) = out_t.numpy(), session.run(["logits"], {"images": xb})
            probs_t, probs_o = grading.probabilities(logits_t), grading.probabilities(logits_o)
        if logits_o.shape != logits_t.shape:
            raise RetinoError(f"ONNX output shape {logits_o.shape} != PyTorch {logits_t.shape} at batch {b}")
        d_probs = max(d_probs, float(np.abs(probs_o.astype(np.float32) - probs_t).max()))
        d_logits = max(d_logits, float(np.abs(logits_o.astype(np.float32) - logits_t).max()))
    result = {"checked": True, "batches": list(PARITY_BATCHES), "images": max(PARITY_BATCHES),
              "max_abs_diff_probs": d_probs, "max_abs_diff_logits": d_logits}
    limit = PARITY_TOLERANCE.get(precision)
    if limit is not None and d_probs > limit:
        raise RetinoError(f"parity check failed: onnxruntime and PyTorch probabilities differ by "
                          f"{d_probs:.2e} (> {limit:.0e}); the model was not written")
    return result


def _quantize(fp32_path: Path, out: Path, rows, split_csv: Path, prep: Preprocess, n_calib: int,
              say) -> dict[str, Any]:
    """Static QDQ int8, per-channel weights, calibrated on training images; val accuracy before/after."""
    from retinocli.reporting.evaluate import open_model, score_paths

    if rows is None:
        raise RetinoError(f"--int8 calibrates on the run's training images, but {split_csv} is missing")
    train = rows[rows["split"] == "train"].sample(frac=1.0, random_state=0)
    calib = _readable(train["path"], prep, n_calib)
    if not calib:
        raise RetinoError(f"--int8: none of the training images listed in {split_csv} could be read for calibration")

    say(f"Calibrating int8 on {len(calib)} training images")
    quantize_int8(fp32_path, out, calib, prep)

    val = rows[(rows["split"] == "val") & rows["grade"].notna()]
    acc, images = {}, 0
    for name, path in (("fp32", fp32_path), ("int8", out)):
        backend = open_model(path, provider="cpu")
        scored = score_paths(backend, val["path"].tolist())
        ok = ~np.isnan(scored.probs).any(axis=1)
        images = int(ok.sum())
        right = backend.grader.grades(scored.probs[ok]) == val["grade"].to_numpy()[ok].astype(int)
        acc[name] = float(right.mean()) if images else float("nan")
    return {"images": images, "accuracy_fp32": acc["fp32"], "accuracy_int8": acc["int8"],
            "calibration_images": len(calib)}


def quantize_int8(fp32_path: Path, out: Path, images: list[np.ndarray], prep: Preprocess) -> None:
    """Static int8 (QDQ, per-channel weights, MinMax ranges) calibrated on uint8 HWC ``images``.

    QDQ keeps the graph valid for every provider (TensorRT reads the scales from it). Activations
    are uint8 and weights int8 (U8S8): onnxruntime's CPU provider fuses that pair into its
    integer convolution kernels, while S8S8 convolutions ran slower than fp32 (ResNet50, 224 px,
    batch 8 on a 2-core Xeon with VNNI: U8S8 121 img/s, S8S8 33, fp32 41). The retino metadata
    is carried over.
    """
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, batch: int = 16):
            self.batches = iter([to_batch(images[i:i + batch], prep) for i in range(0, len(images), batch)])

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {"images": x}

    prepped = out.with_name(f".{out.stem}-prepped.onnx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
            quantize_static(str(prepped), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
    finally:
        prepped.unlink(missing_ok=True)
    # quantize_static does not promise to carry metadata_props over: copy them explicitly
    proto = onnx.load(out)
    del proto.metadata_props[:]
    proto.metadata_props.extend(onnx.load(fp32_path, load_external_data=False).metadata_props)
    onnx.save(proto, out)
