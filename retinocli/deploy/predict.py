"""Grade a folder of fundus photographs with an exported ONNX model; no torch.

    find_images      the image files under a folder (symlinks followed, loops not)
    decode_batches   decode in a thread pool, in order, a few batches ahead of the model
    predict_folder   one row per image (retinocli.deploy.schema) to CSV or JSON lines, flushed
                     batch by batch, so an interrupted run resumes where it stopped and
                     never repeats an image (reading the earlier rows: retinocli.deploy.resume)

An unreadable file is a row with status "error" and the reason, never a stopped run; a
resumed run reads it again.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from retinocli.config import PredictConfig, config_of
from retinocli.deploy import schema
from retinocli.deploy.patients import patients_target, read_output, write_patients
from retinocli.deploy.resume import Earlier, read_earlier
from retinocli.errors import RetinoError
from retinocli.events import Emitter, EventsLike, emitter
from retinocli.data.files import IMAGE_EXTENSIONS
from retinocli.machine import decode_threads
from retinocli.reporting.metrics import REFERABLE_GRADE
from retinocli.imaging.preprocess import Preprocess, load_and_prepare

if TYPE_CHECKING:
    from retinocli.deploy.onnx_model import OnnxGrader

TASK = "predict"  # the progress task of predict_folder
_ERROR_EXAMPLES = 5


# --------------------------------------------------------------------------- finding


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def find_images(folder: str | Path, *, include_hidden: bool = False) -> list[Path]:
    """Image files (``IMAGE_EXTENSIONS``, any case) under ``folder``, sorted by path parts.

    Paths are ``folder / relative path``, spelled as the caller spelled ``folder``.
    Symbolic links to folders are followed, but every real folder is listed once: the
    tree's own folders first, then links leading outside it, so a link to an ancestor (a
    loop) or to a sibling adds nothing. Names starting with a dot are skipped unless
    ``include_hidden``: macOS leaves ``._photo.jpg`` resource forks that are not images.
    A single image file is accepted and returned as a one-image list.

    Raises:
        RetinoError: ``folder`` does not exist, is another kind of file, or a folder in it
            cannot be read.
    """
    root = Path(folder)
    if not root.exists():
        raise RetinoError(f"no such folder: {root}")
    if not root.is_dir():
        if root.is_file() and _is_image_name(root.name):
            return [root]
        exts = ", ".join(IMAGE_EXTENSIONS)
        raise RetinoError(f"{root} is neither a folder nor an image file ({exts})")
    seen: set[str] = set()
    found: list[Path] = []
    links: deque[Path] = deque([root])
    while links:
        _scan(links.popleft(), seen, found, links, include_hidden)
    return sorted(found, key=lambda p: p.parts)


def _scan(start: Path, seen: set[str], found: list[Path], links: deque[Path],
          include_hidden: bool) -> None:
    """Walk ``start`` without following links; queue the linked folders met on the way."""
    stack = [start]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise RetinoError(f"cannot read folder {folder}: {exc.strerror or exc}") from None
        for entry in entries:
            if entry.name.startswith(".") and not include_hidden:
                continue
            path = folder / entry.name
            if entry.is_dir(follow_symlinks=False):
                stack.append(path)
            elif entry.is_symlink() and entry.is_dir():
                links.append(path)
            elif _is_image_name(entry.name):
                # Files, links to files, and broken links: the last are reported as
                # unreadable rows rather than silently dropped.
                found.append(path)


# --------------------------------------------------------------------------- decoding


@dataclass
class Batch:
    """One batch of decoded images, in input order.

    Attributes:
        paths: every path of the batch, as given.
        images: uint8 NHWC pixels of the readable ones, ``(0, S, S, 3)`` when none is.
        good: the paths of ``images``, in the same order.
        errors: ``(path, reason)`` for the unreadable ones; the reason is one line.
    """

    paths: list
    images: np.ndarray
    good: list = field(default_factory=list)
    errors: list[tuple[Any, str]] = field(default_factory=list)


def _decode(path: Any, p: Preprocess) -> tuple[np.ndarray | None, str]:
    try:
        return load_and_prepare(path, p), ""
    except RetinoError as exc:
        reason = str(exc)
    except OSError as exc:  # permission denied, a file vanishing mid-run, I/O errors
        reason = exc.strerror or str(exc)
    except ValueError as exc:
        reason = str(exc)
    except Exception as exc:  # noqa: BLE001
        # A decoder bug on one odd file must not end a run over 100,000 photos.
        reason = f"unexpected {type(exc).__name__}: {exc}"
    # load_image names the file first; the row names it already.
    prefix = f"{Path(path)}: "
    reason = reason[len(prefix):] if reason.startswith(prefix) else reason
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return None, lines[0] if lines else "unreadable"


def decode_batches(paths: Iterable, preprocess: Preprocess, *, batch_size: int = 32,
                   threads: int | None = None, prefetch: int = 2) -> Iterator[Batch]:
    """Decode ``paths`` with ``preprocess.load_and_prepare`` in a thread pool, batch by batch.

    Batches come in input order. Up to ``prefetch`` batches beyond the one being consumed
    are decoding meanwhile, so decoding overlaps the model and memory stays bounded.

    Args:
        paths: image files (anything ``load_and_prepare`` accepts).
        preprocess: the model's preprocessing.
        batch_size: images per batch, >= 1.
        threads: decode threads; default one per core, at most 8.
        prefetch: batches decoded ahead of the consumer.
    """
    if batch_size < 1:
        raise RetinoError(f"batch size must be >= 1, got {batch_size}")
    todo = iter(paths)
    window = batch_size * (max(0, prefetch) + 1)
    pending: deque[tuple[Any, Future]] = deque()
    size = preprocess.size
    pool = ThreadPoolExecutor(max_workers=threads or decode_threads(),
                              thread_name_prefix="retino-decode")
    try:
        def top_up() -> None:
            while len(pending) < window:
                path = next(todo, _END)
                if path is _END:
                    return
                pending.append((path, pool.submit(_decode, path, preprocess)))

        top_up()
        while pending:
            chunk = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
            top_up()  # keep the workers busy while this batch is waited on and consumed
            batch = Batch(paths=[], images=np.zeros((0, size, size, 3), np.uint8))
            arrays = []
            for path, future in chunk:
                arr, reason = future.result()
                batch.paths.append(path)
                if arr is None:
                    batch.errors.append((path, reason))
                else:
                    batch.good.append(path)
                    arrays.append(arr)
            if arrays:
                batch.images = np.stack(arrays)
            yield batch
    finally:
        # Also runs when the consumer stops early: drop the decodes nobody will read.
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()


# --------------------------------------------------------------------------- predict

#: A run shorter than this has no meaningful rate (the clock measures set-up, not images).
MIN_TIMED_SECONDS = 1e-3


@dataclass
class PredictSummary:
    """What ``predict_folder`` did: one set of counts over every image of the folder.

    ``total == graded + errors`` (what the output says about the folder) and
    ``total == done_now + kept`` (what this run did and what an earlier one left).

    Attributes:
        out: the predictions file, or ``-`` for a stream such as stdout.
        total: images found.
        graded: images with a predicted grade (this run or kept from an earlier one).
        errors: images that could not be read.
        counts: ``graded`` per predicted grade.
        referable: images predicted grade >= 2 (referable DR).
        referred: images whose ``referable`` is yes (at the model's frozen threshold).
        threshold: that threshold on P(grade >= 2); frozen: whether training froze it
            (False: the 0.5 of a model exported before issue #15).
        patients: the per-patient file's path, patient count, referable patients and
            whether eyes were fused (:func:`retinocli.deploy.patients.write_patients`);
            None when none was written.
        done_now: images this run read (graded or found unreadable).
        kept: graded rows kept from an earlier run (``--resume``).
        retried: images unreadable in the earlier run and read again now (in ``done_now``).
        provider: the onnxruntime execution provider that ran.
        seconds: wall time of this run's decoding, inference and writing.
        images_per_second: ``done_now / seconds``; None unless this run graded at least
            one image and took a measurable time.
        notes: what this run wants the user to know; the provider's notes are the
            grader's own (``OnnxGrader.notes``).
        error_examples: the first few ``(path, reason)`` of unreadable images.
    """

    out: str
    total: int
    graded: int
    errors: int
    counts: list[int]
    referable: int
    done_now: int
    kept: int
    retried: int
    provider: str
    seconds: float
    images_per_second: float | None
    notes: list[str] = field(default_factory=list)
    error_examples: list[tuple[str, str]] = field(default_factory=list)
    referred: int = 0
    threshold: float = 0.5
    frozen: bool = False
    patients: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["error_examples"] = [list(e) for e in self.error_examples]
        return d


def check_output(out: str | Path | TextIO, *, resume: bool = False, force: bool = False) -> None:
    """Refuse an output ``predict_folder`` must not write: the checks that need no model.

    Raises:
        RetinoError: resume with force; resume of a stream; a folder; an existing file
            without resume or force.
    """
    if resume and force:
        raise RetinoError("--resume keeps the rows in the output and --force overwrites them; pass one")
    if hasattr(out, "write"):
        if resume:
            raise RetinoError("--resume continues an output file, not stdout; name the file with --out")
        return
    path = Path(out)
    if path.is_dir():
        raise RetinoError(f"{path} is a folder; give a file name for the predictions")
    if path.exists() and not (resume or force):
        raise RetinoError(f"{path} exists; pass --resume to continue it or --force to overwrite")


def _grade_into(target, todo: list[Path], model: OnnxGrader, root: Path, *, fieldnames: list[str], header: bool,
                json_lines: bool, batch_size: int, threads: int | None, keep_rows: bool,
                say: Emitter) -> tuple[dict[str, tuple], list[dict[str, Any]], int]:
    """Decode, grade and write ``todo`` batch by batch (each batch flushed): returns path -> (grade,
    error, referable) of this run, the rows themselves when ``keep_rows``, and how many were unreadable."""
    names, grading = model.info.grade_names, model.info.grading
    results: dict[str, tuple] = {}
    kept: list[dict[str, Any]] = []
    bad = 0
    with target as fh:
        writer = schema.RowWriter(fh, fieldnames, json_lines=json_lines)
        if header:
            writer.header()
        for batch in decode_batches(todo, model.info.preprocess, batch_size=batch_size, threads=threads):
            probs = iter(model.predict(batch.images))
            reasons = {str(p): reason for p, reason in batch.errors}
            rows = []
            for image in batch.paths:
                key = str(image)
                p = None if key in reasons else next(probs)
                row = schema.make_row(_image_name(image, root), key, p, names, labelled=False,
                                      error=reasons.get(key, ""),
                                      grade=None if p is None else int(grading.grades(p[None])[0]),
                                      referable=None if p is None else bool(grading.referable(p[None])[0]))
                rows.append(row)
                results[key] = (row[schema.PREDICTED_GRADE], row[schema.ERROR], row[schema.REFERABLE])
            writer.write(rows)
            kept += rows if keep_rows else []
            bad += len(batch.errors)
            say.advanced(TASK, len(batch.paths), postfix=f"{bad} unreadable" if bad else "")
    return results, kept, bad


def _tally(keys: list[str], results: dict[str, tuple], earlier: Earlier,
           k: int) -> tuple[list[int], int, list[tuple[str, str]], int]:
    """Per-grade counts, unreadable count and examples, and images referred, over this run's rows
    and those kept from an earlier run."""
    counts = [0] * k
    errors, examples, referred = 0, [], 0
    for key in keys:
        grade, reason, refer = results[key] if key in results else (
            earlier.graded[key], "", schema.YES if key in earlier.referred else schema.NO)
        referred += refer == schema.YES
        if grade is not None and 0 <= grade < k:
            counts[grade] += 1
        else:
            errors += 1
            if len(examples) < _ERROR_EXAMPLES:
                examples.append((key, reason))
    return counts, errors, examples, referred


def _open_output(path: Path | None, stream: TextIO | None, *, resume: bool, fieldnames: list[str],
                 json_lines: bool, notes: list[str]) -> tuple[Earlier, Any, bool]:
    """What an earlier run left in ``path`` (read with ``resume``; a note when there is none yet),
    the output to write (``path`` opened, or ``stream``) and whether it is appended to (no header)."""
    earlier = Earlier()
    if resume and path is not None and path.exists():
        earlier = read_earlier(path, fieldnames, json_lines)
    elif resume:
        notes.append(f"nothing to resume: {path} does not exist yet")
    append = resume and path is not None and path.exists() and path.stat().st_size > 0
    if path is None:
        return earlier, contextlib.nullcontext(stream), append
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a" if append else "w", encoding="utf-8", errors="surrogateescape", newline="")
    return earlier, fh, append


def _image_name(path: Path, root: Path) -> str:
    """The ``image`` column: the path relative to the folder predicted (the file's name for
    a single image)."""
    try:
        return path.relative_to(root).as_posix() if root != path else path.name
    except ValueError:
        return path.name


def predict_folder(folder: str | Path, model: OnnxGrader, config: PredictConfig | None = None, *,
                   events: EventsLike = None, **options) -> PredictSummary:
    """Grade every image under ``folder`` and write one row per image to ``config.out``.

    Rows (:func:`retinocli.deploy.schema.columns`, unlabelled) are written in image order and
    flushed after each batch; the path column is the path as found under ``folder`` as
    given, and is what ``resume`` matches on, so resume with the same folder argument.

    Args:
        folder: a folder of images (searched recursively) or one image file.
        model: the loaded model.
        config: a :class:`retinocli.config.PredictConfig`, or ``options``, its fields as keywords:
            ``out`` (a file or an open text stream), batch size, decode threads, ``resume`` (keep
            the graded rows already in ``out``, read the images it lacks and those it says were
            unreadable: they may have been fixed since), ``force``, ``json_lines``, ``patients``
            (the per-patient file; default: patients.csv beside a file ``out`` when the names give
            patients and eyes, :mod:`retinocli.deploy.patients`) and ``fuse_eyes`` (each eye fused
            with its fellow in that file).
        events: a listener for progress (task "predict", advanced per batch with the unreadable
            count in ``postfix``; see :mod:`retinocli.events`).

    Raises:
        RetinoError: no images, ``out`` exists without resume or force, or it cannot be
            resumed (another format, model or command wrote it).
    """
    cfg = config_of(PredictConfig, config, options)
    out, resume, force, json_lines, fuse_eyes = cfg.out, cfg.resume, cfg.force, cfg.json_lines, cfg.fuse_eyes
    stream = out if hasattr(out, "write") else None
    out_name = "-" if stream is not None else str(out)
    check_output(out, resume=resume, force=force)
    path = Path(out) if stream is None else None
    root = Path(folder)
    images = find_images(root)
    if not images:
        raise RetinoError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    names = model.info.grade_names
    k = len(names)
    fieldnames = schema.columns(k, labelled=False)
    notes: list[str] = []  # the model's own notes (provider fallback) stay in model.notes
    grading = model.info.grading
    patients_path, note = patients_target(out, cfg.patients, [_image_name(p, root) for p in images], grading,
                                          force=force, resume=resume, fuse_eyes=fuse_eyes)
    notes += [note] if note else []

    earlier, target, append = _open_output(path, stream, resume=resume, fieldnames=fieldnames,
                                           json_lines=json_lines, notes=notes)
    keys = [str(p) for p in images]
    todo = [p for p, key in zip(images, keys) if key not in earlier.graded]
    retried = sum(str(p) in earlier.retry for p in todo)
    say = emitter(events)
    say.started(TASK, total=len(todo))
    start = time.perf_counter()
    results, streamed, bad_now = _grade_into(
        target, todo, model, root, fieldnames=fieldnames, header=not append, json_lines=json_lines,
        batch_size=cfg.batch_size, threads=cfg.threads, keep_rows=stream is not None and patients_path is not None, say=say)
    seconds = time.perf_counter() - start
    say.finished(TASK)
    counts, errors, examples, referred = _tally(keys, results, earlier, k)
    graded_now = len(todo) - bad_now
    timed = graded_now > 0 and seconds >= MIN_TIMED_SECONDS
    return PredictSummary(
        out=out_name, total=len(images), graded=sum(counts), errors=errors, counts=counts,
        referable=sum(counts[REFERABLE_GRADE:]), done_now=len(todo), kept=len(images) - len(todo),
        retried=retried, provider=model.provider, seconds=seconds,
        images_per_second=len(todo) / seconds if timed else None, notes=notes, error_examples=examples,
        referred=referred, threshold=grading.threshold(), frozen=grading.frozen,
        patients=None if patients_path is None else write_patients(  # from the complete output
            patients_path, streamed if stream is not None else read_output(path, json_lines), grading, k,
            fuse_eyes=fuse_eyes),
    )
