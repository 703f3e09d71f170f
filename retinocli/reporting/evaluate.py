"""Score a trained grader on a labelled split: a checkpoint through PyTorch, an ONNX file through
onnxruntime, the same images, the same numbers.

Both back ends see identical inputs: images are decoded and prepared with numpy/PIL in threads
(:func:`retinocli.deploy.predict.decode_batches`, the predictor's own pipeline) and normalised by
:func:`retinocli.imaging.preprocess.to_batch`; only the forward pass differs. ``evaluate`` writes
``metrics.json`` (:func:`retinocli.reporting.metrics.summarize` plus where the numbers came from) and
``predictions.csv`` (one row per image, :mod:`retinocli.deploy.schema` with ``true_grade``) and,
where the image names carry patients (``10_left``), ``patients.csv`` (the worse eye decides), and
returns them. Every headline metric gets a seeded bootstrap 95 % interval
(:func:`retinocli.reporting.bootstrap.bootstrap_ci`), resampling patients where they are known.

torch is imported only when a checkpoint is evaluated; an ONNX model evaluates without it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retinocli import GRADE_NAMES
from retinocli.deploy import schema
from retinocli.reporting import metrics
from retinocli.config import EvaluateConfig, config_of
from retinocli.errors import RetinoError, atomic_write
from retinocli.events import EventsLike, emitter
from retinocli.imaging.preprocess import Preprocess, to_batch
from retinocli.models.grading import Grader

SPLITS = ("train", "val", "test")


@dataclass
class Backend:
    """A model that maps a normalised float32 NCHW batch to grade probabilities."""

    kind: str  # "checkpoint" or "onnx"
    path: Path
    preprocess: Preprocess
    grade_names: tuple[str, ...]
    forward: Callable[[np.ndarray], np.ndarray]
    runtime: str  # torch device or onnxruntime provider that runs it
    run_dir: Path | None
    info: dict[str, Any] = field(default_factory=dict)  # arch, weights, mode, epoch
    notes: list[str] = field(default_factory=list)
    grader: Grader = field(default_factory=Grader)  # probabilities -> grades (cut points of #14)


def is_onnx(path: str | Path) -> bool:
    return str(path).lower().endswith(".onnx")


def open_model(target: str | Path | None, *, device: str = "auto", provider: str = "auto",
               threads: int | None = None) -> Backend:
    """A run folder, checkpoint or ``.onnx`` file (None: the newest run) as a :class:`Backend`."""
    if target is not None and is_onnx(target):
        return _onnx_backend(Path(target), provider, threads)
    return _torch_backend(target, device)


def _onnx_backend(path: Path, provider: str, threads: int | None) -> Backend:
    from retinocli.deploy.onnx_model import OnnxGrader

    grader = OnnxGrader(path, provider=provider, threads=threads)
    info = grader.info
    run_dir = _run_dir_of(path, info)
    return Backend(kind="onnx", path=path, preprocess=info.preprocess, grade_names=tuple(info.grade_names),
                   forward=lambda x: grader.run(x)[1], runtime=grader.provider, run_dir=run_dir,
                   info={"arch": info.arch, "weights": info.weights, "mode": info.mode, "epoch": info.epoch,
                         "precision": info.precision},
                   notes=list(grader.notes), grader=info.grading)


def _run_dir_of(path: Path, info) -> Path | None:
    """The training run an exported model sits in, or None.

    The metadata names the checkpoint and its SHA-256, never a path (a model travels); the
    model's own folder is its run when it holds that checkpoint, byte for byte.
    """
    from retinocli.deploy.metadata import file_sha256

    folder = path.parent
    ckpt = folder / info.checkpoint if info.checkpoint else None
    if ckpt is None or not info.checkpoint_sha256 or not ckpt.is_file():
        return None
    return folder if file_sha256(ckpt) == info.checkpoint_sha256 else None


def _torch_backend(target: str | Path | None, device_spec: str) -> Backend:
    import torch

    from retinocli.engine.checkpoints import load_trained
    from retinocli.rundir import RunDir
    from retinocli.engine.placement import Placement

    ckpt = RunDir.resolve_checkpoint(target)
    model, state = load_trained(ckpt)
    # fp32: the numbers must match the exported ONNX model's, image for image
    place = Placement.choose(device_spec, amp=False)
    place.place(model)
    device, channels_last = place.device, place.channels_last
    cfg = state["config"]
    names = tuple(state.get("class_names") or GRADE_NAMES)
    grading = Grader.from_dict({"num_grades": len(names), **(state.get("grader") or {})})

    @torch.inference_mode()
    def forward(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).to(device, non_blocking=True)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        return grading.probabilities(model(t).float().cpu().numpy())

    return Backend(kind="checkpoint", path=ckpt, preprocess=Preprocess.from_dict(state["preprocess"]),
                   grade_names=names, forward=forward, runtime=str(device), run_dir=ckpt.parent,
                   info={"arch": cfg.get("arch"), "weights": cfg.get("weights"), "mode": cfg.get("mode"),
                         "epoch": state.get("epoch"), "precision": "fp32"}, grader=grading)


# ------------------------------------------------------------------------- inference


def tta_views(x: np.ndarray) -> Iterator[np.ndarray]:
    """The 8 flips and quarter turns of a square NCHW batch (a fundus has no up or left)."""
    for k in range(4):
        turned = np.rot90(x, k, axes=(2, 3))
        yield np.ascontiguousarray(turned)
        yield np.ascontiguousarray(turned[..., ::-1])


def predict_probs(backend: Backend, x: np.ndarray, *, tta: bool = False) -> np.ndarray:
    """Grade probabilities for a normalised batch, averaged over :func:`tta_views` with ``tta``."""
    if not tta:
        return np.asarray(backend.forward(x), np.float32)
    total = None
    for n, view in enumerate(tta_views(x), 1):
        p = np.asarray(backend.forward(view), np.float64)
        total = p if total is None else total + p
    return (total / n).astype(np.float32)


@dataclass
class Scored:
    """Per-image results in input order; ``probs`` rows of unreadable images are NaN."""

    paths: list[str]
    probs: np.ndarray
    errors: dict[str, str]
    seconds: float


def score_paths(backend: Backend, paths: list[str], *, tta: bool = False, batch_size: int = 64,
                threads: int | None = None, events: EventsLike = None, description: str = "evaluate") -> Scored:
    """Decode (threaded, overlapped with inference) and score every path; broken files are recorded.

    A path listed twice (a duplicated label row) is decoded once and scored on both rows.
    ``events`` hears a task named ``description``, advanced per decoded batch.
    """
    from retinocli.deploy.predict import decode_batches

    k = len(backend.grade_names)
    unique = list(dict.fromkeys(paths))
    where = {p: i for i, p in enumerate(unique)}
    scores = np.full((len(unique), k), np.nan, np.float32)
    errors: dict[str, str] = {}
    say = emitter(events)
    say.started(description, total=len(unique))
    start = time.perf_counter()
    for batch in decode_batches(unique, backend.preprocess, batch_size=batch_size, threads=threads):
        for path, reason in batch.errors:
            errors[str(path)] = reason
        if len(batch.good):
            out = predict_probs(backend, to_batch(batch.images, backend.preprocess), tta=tta)
            scores[[where[str(p)] for p in batch.good]] = out
        say.advanced(description, len(batch.paths))
    say.finished(description)
    probs = scores[[where[p] for p in paths]] if paths else scores
    return Scored(paths=list(paths), probs=probs, errors=errors, seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------- the split


def split_records(backend: Backend, *, data: str | Path | None, split: str, layout: str | None = None,
                  images: str | Path | None = None):
    """Image names, paths and true grades of ``split``, where they came from, and how many listed
    images are missing on disk: from ``data`` when given, else the run's split.csv.

    The run's own split.csv is the only place its carved-out validation split exists, and it
    records the test split the run was trained beside.
    """
    from retinocli.data.layouts import load_dataset
    from retinocli.rundir import RunDir

    if split not in SPLITS:
        raise RetinoError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if data is not None:
        records = load_dataset(data, layout=layout, images=images).records
        source = str(data)
    elif backend.run_dir is not None and (records := RunDir(backend.run_dir).read_split()) is not None:
        source = str(RunDir(backend.run_dir).split)
    else:
        raise RetinoError(f"{backend.path}: its training run is not here to say which images are "
                          f"{split}; pass --data DATA")
    rows = records[records["split"] == split]
    rows = rows[rows["grade"].notna()]
    missing = 0
    if "found" in rows:
        missing = int((~rows["found"].astype(bool)).sum())
        rows = rows[rows["found"].astype(bool)]
    if rows.empty:
        have = sorted(set(records["split"].dropna()))
        hint = " (the validation split is carved by training: omit --data to use the run's)" if split == "val" else ""
        raise RetinoError(f"{source} has no labelled {split} images (splits there: "
                          f"{', '.join(have) or 'none'}){hint}")
    return rows["image"].astype(str).tolist(), rows["path"].astype(str).tolist(), \
        rows["grade"].astype(int).to_numpy(), source, missing


# ------------------------------------------------------------------------- evaluate


@dataclass
class EvalResult:
    out_dir: Path
    metrics_path: Path
    predictions_path: Path
    report: dict[str, Any]  # what metrics.json holds
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**self.report, "metrics_path": str(self.metrics_path),
                "predictions_path": str(self.predictions_path), "notes": self.notes}


def default_out_dir(backend: Backend) -> Path:
    """A checkpoint reports into its run folder; an ONNX file into ``<stem>-eval`` beside it."""
    if backend.kind == "onnx":
        return backend.path.parent / f"{backend.path.stem}-eval"
    return backend.path.parent


def evaluate(target: str | Path | None = None, config: EvaluateConfig | None = None, *,
             events: EventsLike = None, **options) -> EvalResult:
    """Score a run, checkpoint or ONNX model on a labelled split and write metrics.json + predictions.csv.

    ``config`` holds the settings, or ``options`` make one (:class:`retinocli.config.EvaluateConfig`'s
    fields). The referral threshold and temperature frozen on validation at training are applied,
    never re-tuned (``report["operating_point"]``, ``report["calibration"]``); ``fuse_eyes`` refines
    each eye with its fellow's probabilities (:func:`retinocli.reporting.referral.fusion_for`).
    """
    from retinocli.reporting import referral

    cfg = config_of(EvaluateConfig, config, options)
    backend = open_model(target, device=cfg.device, provider=cfg.provider, threads=cfg.threads)
    fusion = None
    if cfg.fuse_eyes:  # before the split is read: a refusal costs no inference
        backend.grader, fusion = referral.fusion_for(backend, split=cfg.split, tta=cfg.tta,
                                                     batch_size=cfg.batch_size, threads=cfg.threads)
    out_dir = Path(cfg.out) if cfg.out is not None else default_out_dir(backend)
    paths_out = _outputs(out_dir, cfg.force)
    names, paths, grades, source, missing = split_records(backend, data=cfg.data, split=cfg.split,
                                                          layout=cfg.layout, images=cfg.images)
    scored = score_paths(backend, paths, tta=cfg.tta, batch_size=cfg.batch_size, threads=cfg.threads,
                         events=events)
    ok = ~np.isnan(scored.probs).any(axis=1)
    if not ok.any():
        raise RetinoError(f"none of the {len(paths)} {cfg.split} images could be read "
                          f"(e.g. {next(iter(scored.errors.items()), ('', ''))[1]})")
    single = scored.probs
    if fusion is not None:  # fellows among the readable images of this split
        scored.probs = np.full_like(single, np.nan)
        scored.probs[ok] = referral.fuse_probs([n for n, g in zip(names, ok) if g], single[ok],
                                               backend.grader)
    report, frame = _report(backend, cfg, scored, names, grades, ok, source=source, missing=missing,
                            fused=fusion is not None)
    patients = _clinical_sections(report, frame, len(backend.grade_names), cfg.bootstrap, cfg.seed)
    referral.add_sections(report, frame, backend.grader, y=grades[ok], probs=scored.probs[ok], single=single[ok],
                          fusion=fusion, n_boot=cfg.bootstrap, seed=cfg.seed, num_classes=len(backend.grade_names))
    if patients is not None:
        patients = referral.referral_table(frame)
    _write_outputs(paths_out, report, patients, names, scored, grades, backend, fused=fusion is not None)
    return EvalResult(out_dir, paths_out[0], paths_out[1], report,
                      _notes(backend, scored, missing, cfg.split))


def _outputs(out_dir: Path, force: bool) -> tuple[Path, Path, Path]:
    """metrics.json, predictions.csv and patients.csv of ``out_dir``; refused if there without --force."""
    from retinocli.rundir import RunDir

    run = RunDir(out_dir)
    paths = run.metrics(), run.predictions(), run.patients()
    for p in paths:
        if p.exists() and not force:
            raise RetinoError(f"{p} already exists; pass --force to replace it or --out to write elsewhere")
    return paths


def _report(backend: Backend, cfg: EvaluateConfig, scored, names: list[str], grades: np.ndarray,
            ok: np.ndarray, *, source: str, missing: int, fused: bool) -> tuple[dict[str, Any], Any]:
    """metrics.json's content before the clinical sections, and the per-image frame they are drawn from."""
    probs, y = scored.probs[ok].astype(np.float64), grades[ok]
    probs /= probs.sum(1, keepdims=True)  # fp16 models: exact normalisation for the AUC ranks
    pred = _grades(backend.grader, scored.probs[ok], fused=fused)  # as predictions.csv does
    summary = metrics.summarize(y, pred, probs, num_classes=len(backend.grade_names))
    fpr, tpr, _ = metrics.roc_curve(y >= metrics.REFERABLE_GRADE, probs[:, metrics.REFERABLE_GRADE:].sum(1))
    n = len(names)
    report = {
        "model": str(backend.path), "kind": backend.kind,
        "run": str(backend.run_dir) if backend.run_dir else None, **backend.info,
        "data": source, "split": cfg.split, "tta": cfg.tta, "runtime": backend.runtime,
        "n_images": n, "n_unreadable": int((~ok).sum()), "n_missing": missing,
        "seconds": round(scored.seconds, 3),
        "images_per_second": round(n / max(scored.seconds, 1e-9), 1),
        "grade_names": list(backend.grade_names), "metrics": summary,
        "referable_roc": {"fpr": _rounded(fpr), "tpr": _rounded(tpr)},
    }
    frame = _frame([name for name, good in zip(names, ok) if good], y, pred, probs)
    frame[schema.REFERABLE] = np.where(backend.grader.referable(scored.probs[ok], fused=fused),
                                       schema.YES, schema.NO)
    return report, frame


def _write_outputs(paths: tuple[Path, Path, Path], report: dict[str, Any], patients, names: list[str], scored,
                   grades: np.ndarray, backend: Backend, *, fused: bool) -> None:
    """predictions.csv, patients.csv (or its removal, under --force) and metrics.json, each atomically."""
    metrics_path, predictions_path, patients_path = paths
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    _write_predictions(predictions_path, names, scored, grades, backend.grade_names, backend.grader, fused=fused)
    if patients is not None:
        atomic_write(patients_path, patients.to_csv(index=False))
        report["patients"]["path"] = str(patients_path)
    elif patients_path.exists():  # --force over an evaluation of images that had patients
        patients_path.unlink()
    atomic_write(metrics_path, json.dumps(report, indent=2))


def _notes(backend: Backend, scored, missing: int, split: str) -> list[str]:
    notes = list(backend.notes)
    if missing:
        notes.append(f"{missing} listed {split} image(s) are missing on disk and are left out of the metrics")
    if scored.errors:
        first = next(iter(scored.errors.items()))
        notes.append(f"{len(scored.errors)} image(s) could not be read and are left out of the metrics, "
                     f"e.g. {first[1]}")
    return notes


def _grades(grader: Grader, probs: np.ndarray, *, fused: bool) -> np.ndarray:
    """Grades of (readable) probabilities: fused ones by argmax, the fusion's own rule."""
    return np.asarray(probs, np.float64).argmax(1) if fused else grader.grades(probs)


def _frame(names: list[str], y: np.ndarray, pred: np.ndarray, probs: np.ndarray):
    """The readable images as a labelled predictions frame (the columns clinical reads)."""
    import pandas as pd

    frame = pd.DataFrame({"image": names, schema.TRUE_GRADE: y, schema.PREDICTED_GRADE: pred})
    for j in range(probs.shape[1]):
        frame[schema.prob_column(j)] = probs[:, j]
    frame[schema.REFERABLE_PROB] = probs[:, metrics.REFERABLE_GRADE:].sum(1)
    return frame


def _clinical_sections(report: dict[str, Any], frame, k: int, n_boot: int, seed: int):
    """Add the bootstrap intervals and, where names carry patients, the patient-level section.

    ``report["intervals"]``: per-image metrics with 95 % intervals, patients resampled as
    clusters when known. ``report["patients"]``: the worse eye's grade per patient, scored
    with its own intervals. Returns the patient table (None when no name carries a patient).
    """
    from retinocli.reporting import clinical
    from retinocli.reporting.bootstrap import bootstrap_ci

    has_patients = bool(clinical.patient_ids(frame["image"].tolist())[1].astype(bool).any())
    if n_boot:
        report["intervals"] = bootstrap_ci(**clinical.prediction_arrays(frame, by_patient=has_patients),
                                           n_boot=n_boot, seed=seed, num_classes=k)
    if not has_patients:
        return None
    table = clinical.patient_table(frame)
    y, pred = table["true_grade"].to_numpy(np.int64), table["predicted_grade"].to_numpy(np.int64)
    score = table["referable_prob"].to_numpy(np.float64)
    section: dict[str, Any] = {"n": int(len(table)), "rule": "a patient's grade is the worse eye's",
                               "with_both_eyes": int((table["eyes"] == "left,right").sum()),
                               "metrics": metrics.summarize(y, pred, None, num_classes=k)}
    if n_boot:
        section["intervals"] = bootstrap_ci(y, pred, None, referable_score=score, n_boot=n_boot,
                                            seed=seed, num_classes=k)
    report["patients"] = section
    return table


def _rounded(a: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in a]


def _write_predictions(path: Path, names: list[str], scored: Scored, grades: np.ndarray,
                       grade_names: tuple[str, ...], grader: Grader, *, fused: bool = False) -> None:
    """predictions.csv (:mod:`retinocli.deploy.schema`, labelled), written whole and then renamed."""
    def row_of(name: str, p: str, g: int, row: np.ndarray) -> dict[str, Any]:
        bad = p in scored.errors
        return schema.make_row(name, p, None if bad else row, grade_names, labelled=True, true_grade=int(g),
                               error=scored.errors.get(p, ""),
                               grade=None if bad else int(_grades(grader, row[None], fused=fused)[0]),
                               referable=None if bad else bool(grader.referable(row[None], fused=fused)[0]))

    def write(fh) -> None:
        writer = schema.RowWriter(fh, schema.columns(len(grade_names), labelled=True))
        writer.header()
        writer.write([row_of(name, p, g, row) for name, p, g, row in zip(names, scored.paths, grades, scored.probs)])

    atomic_write(path, write=write)
