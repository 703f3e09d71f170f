"""Grade a folder of fundus photographs with an exported ONNX model; no torch.

    find_images      the image files under a folder (symlinks followed, loops not)
    decode_batches   decode in a thread pool, in order, a few batches ahead of the model
    predict_folder   one row per image to CSV or JSON lines, flushed batch by batch, so an
                     interrupted run resumes where it stopped and never repeats an image

An unreadable file is a row with status "error" and the reason, never a stopped run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retinocli import NUM_GRADES
from retinocli.errors import RetinoError
from retinocli.layouts import IMAGE_EXTENSIONS
from retinocli.metrics import REFERABLE_GRADE
from retinocli.preprocess import Preprocess, load_and_prepare

if TYPE_CHECKING:
    from rich.progress import Progress

    from retinocli.runtime import OnnxGrader

_ERROR_EXAMPLES = 5


def default_threads() -> int:
    """Decode threads when not given: one per core, at most 8 (PIL releases the GIL)."""
    return min(8, os.cpu_count() or 1)


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
    pool = ThreadPoolExecutor(max_workers=threads or default_threads(),
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


# --------------------------------------------------------------------------- rows


def prediction_fields(num_grades: int = NUM_GRADES) -> list[str]:
    """Columns of a predictions file for a model with ``num_grades`` grades."""
    return (["path", "grade", "grade_name", "confidence"]
            + [f"prob_{g}" for g in range(num_grades)]
            + ["referable_prob", "status", "error"])


PREDICTION_FIELDS: tuple[str, ...] = tuple(prediction_fields())


def _number(x: np.floating) -> float:
    # The shortest decimal that reads back as the same float32: 0.2, not 0.20000000298.
    return float(str(np.float32(x)))


def _ok_row(path: str, probs: np.ndarray, grade_names: Sequence[str]) -> dict[str, Any]:
    grade = int(np.argmax(probs))
    row: dict[str, Any] = {"path": path, "grade": grade, "grade_name": grade_names[grade],
                           "confidence": _number(probs[grade])}
    row.update({f"prob_{g}": _number(p) for g, p in enumerate(probs)})
    row.update(referable_prob=_number(probs[REFERABLE_GRADE:].sum(dtype=np.float32)),
               status="ok", error="")
    return row


def _error_row(path: str, reason: str, num_grades: int) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(prediction_fields(num_grades))
    row.update(path=path, grade_name="", status="error", error=reason)
    return row


class _RowWriter:
    """Appends rows as CSV or JSON lines, one write and one flush per batch."""

    def __init__(self, fh, fieldnames: list[str], json_lines: bool):
        self.fh, self.fieldnames, self.json_lines = fh, fieldnames, json_lines

    def header(self) -> None:
        if not self.json_lines:
            self.write([dict(zip(self.fieldnames, self.fieldnames))])

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.json_lines:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        else:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, self.fieldnames, lineterminator="\n")
            writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
            text = buf.getvalue()
        self.fh.write(text)
        self.fh.flush()


# --------------------------------------------------------------------------- resume


def _read_finished(out: Path, fieldnames: list[str], json_lines: bool) -> dict[str, tuple[str, int | None, str]]:
    """Rows already in ``out``: path -> (status, grade, error).

    A last line without its newline is what a kill leaves mid-write: it is cut off, and
    the file truncated to the last complete row, so the resumed run rewrites that image.
    """
    data = out.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(out, "r+b") as fh:
            fh.truncate(len(complete))
    text = complete.decode("utf-8", errors="surrogateescape")
    if not text:
        return {}
    looks_json = text.lstrip().startswith("{")
    if looks_json != json_lines:
        kind, flag = ("JSON lines", "with --json-lines") if looks_json else ("CSV", "without --json-lines")
        raise RetinoError(f"{out} holds {kind}; resume it {flag}")
    done: dict[str, tuple[str, int | None, str]] = {}
    if json_lines:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                done[row["path"]] = (row["status"], row["grade"], row.get("error") or "")
            except (json.JSONDecodeError, KeyError, TypeError):
                raise RetinoError(f"{out}: line {n} is not a predictions row; cannot resume "
                                  "(pass --force to start over)") from None
        return done
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, None)
    if header != fieldnames:
        raise RetinoError(f"{out}: its columns are not this model's predictions; cannot resume "
                          "(pass --force to start over)")
    col = {name: i for i, name in enumerate(fieldnames)}
    for n, row in enumerate(rows, 2):
        if len(row) != len(fieldnames):
            raise RetinoError(f"{out}: row {n} has {len(row)} columns, expected "
                              f"{len(fieldnames)}; cannot resume (pass --force to start over)")
        grade = row[col["grade"]]
        done[row[col["path"]]] = (row[col["status"]], int(grade) if grade else None,
                                  row[col["error"]])
    return done


# --------------------------------------------------------------------------- predict


@dataclass
class PredictSummary:
    """What ``predict_folder`` did. Counts cover every image of the folder, resumed or not.

    Attributes:
        out: the predictions file.
        total: images found.
        done_now: images graded (or found unreadable) by this run.
        skipped: images already in ``out`` from an earlier run (``--resume``).
        errors: unreadable images.
        counts: readable images per predicted grade.
        referable: images predicted grade >= 2 (referable DR).
        provider: the onnxruntime execution provider that ran.
        seconds: wall time of this run's decoding, inference and writing.
        images_per_second: ``done_now / seconds``.
        notes: what this run wants the user to know (what was resumed); the provider's
            notes are the grader's own (``OnnxGrader.notes``).
        error_examples: the first few ``(path, reason)`` of unreadable images.
    """

    out: Path
    total: int
    done_now: int
    skipped: int
    errors: int
    counts: list[int]
    referable: int
    provider: str
    seconds: float
    images_per_second: float
    notes: list[str] = field(default_factory=list)
    error_examples: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        d["error_examples"] = [list(e) for e in self.error_examples]
        return d


def predict_folder(folder: str | Path, model: OnnxGrader, *, out: str | Path, batch_size: int = 32,
                   threads: int | None = None, resume: bool = False, force: bool = False,
                   json_lines: bool = False, progress: Progress | None = None) -> PredictSummary:
    """Grade every image under ``folder`` and write one row per image to ``out``.

    Rows (``prediction_fields``) are written in image order and flushed after each batch;
    the path column is the path as found under ``folder`` as given, and is what
    ``resume`` matches on, so resume with the same folder argument.

    Args:
        folder: a folder of images (searched recursively) or one image file.
        model: the loaded model.
        out: the CSV (or JSON lines) file to write.
        batch_size: images per inference call.
        threads: decode threads; default one per core, at most 8.
        resume: keep the rows already in ``out`` and grade only the images it lacks.
        force: overwrite an existing ``out``.
        json_lines: write one JSON object per line instead of CSV.
        progress: a rich Progress (``display.progress_bar``) to advance per batch.

    Raises:
        RetinoError: no images, ``out`` exists without resume or force, or it cannot be
            resumed (another format or model).
    """
    out = Path(out)
    if batch_size < 1:
        raise RetinoError(f"batch size must be >= 1, got {batch_size}")
    if resume and force:
        raise RetinoError("--resume keeps the rows in the output and --force overwrites them; pass one")
    if out.is_dir():
        raise RetinoError(f"{out} is a folder; give a file name for the predictions")
    if out.exists() and not (resume or force):
        raise RetinoError(f"{out} exists; pass --resume to continue it or --force to overwrite")
    images = find_images(folder)
    if not images:
        raise RetinoError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    names = model.info.grade_names
    k = len(names)
    fieldnames = prediction_fields(k)
    notes: list[str] = []  # the model's own notes (provider fallback) stay in model.notes

    finished: dict[str, tuple[str, int | None, str]] = {}
    if resume and out.exists():
        finished = _read_finished(out, fieldnames, json_lines)
    elif resume:
        notes.append(f"nothing to resume: {out} does not exist yet")
    keys = [str(p) for p in images]
    todo = [p for p, key in zip(images, keys) if key not in finished]
    skipped = len(images) - len(todo)
    if skipped:
        notes.append(f"resumed {out}: {skipped:,} image(s) already graded")

    results: dict[str, tuple[str, int | None, str]] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    append = resume and out.exists() and out.stat().st_size > 0
    task = progress.add_task("predict", total=len(todo), postfix="") if progress is not None else None
    bad_now = 0
    start = time.perf_counter()
    with open(out, "a" if append else "w", encoding="utf-8", errors="surrogateescape",
              newline="") as fh:
        writer = _RowWriter(fh, fieldnames, json_lines)
        if not append:
            writer.header()
        for batch in decode_batches(todo, model.info.preprocess, batch_size=batch_size,
                                    threads=threads):
            probs = model.predict(batch.images)
            reasons = {str(p): reason for p, reason in batch.errors}
            rows, good = [], iter(probs)
            for path in batch.paths:
                key = str(path)
                if key in reasons:
                    rows.append(_error_row(key, reasons[key], k))
                else:
                    rows.append(_ok_row(key, next(good), names))
                row = rows[-1]
                results[key] = (row["status"], row["grade"], row["error"])
            writer.write(rows)
            bad_now += len(batch.errors)
            if progress is not None:
                progress.update(task, advance=len(batch.paths),
                                postfix=f"{bad_now} unreadable" if bad_now else "")
    seconds = time.perf_counter() - start

    counts = [0] * k
    errors, examples = 0, []
    for key in keys:
        status, grade, reason = results.get(key) or finished[key]
        if status == "ok" and grade is not None and 0 <= grade < k:
            counts[grade] += 1
        elif status != "ok":
            errors += 1
            if len(examples) < _ERROR_EXAMPLES:
                examples.append((key, reason))
    return PredictSummary(
        out=out, total=len(images), done_now=len(todo), skipped=skipped, errors=errors,
        counts=counts, referable=sum(counts[REFERABLE_GRADE:]), provider=model.provider,
        seconds=seconds, images_per_second=len(todo) / seconds if seconds > 0 else 0.0,
        notes=notes, error_examples=examples,
    )
