"""Preprocess a dataset once into a cache of small images, so training stops decoding photos.

A 2-5k px Kaggle JPEG decodes at about 25 images/s per core, draft mode included, while a
GPU trains a ResNet18 at 512 px on thousands per second. :func:`prepare` writes every image
found on disk as exactly the uint8 pixels ``load_and_prepare(path, Preprocess(size, mode))``
gives for it, into a folder that :func:`retinocli.data.layouts.load_dataset` reads back as the
``cache`` layout::

    OUT/retino-cache.json       settings (size, mode, fmt, quality, source), count, failed images
    OUT/labels.csv              image, file, grade, split, patient, eye, source: one row per record
    OUT/images/<split>/<name>.png|jpg

Training on a png cache with ``--preprocess none --img-size SIZE`` sees bit-identical pixels
to training on the originals with ``--preprocess MODE --img-size SIZE`` (``prepare`` with
mode "none" leaves a SIZE x SIZE image untouched). jpeg (quality 95, chroma kept at full
resolution) is about one grey level off on average and four times smaller.

Every mode may be cached, graham included: the filter is a function of the cropped, resized
pixels alone, so a graham cache is as exact as a crop cache. A cache serves one mode; train a
crop cache with ``--preprocess graham`` and the fundus is cropped again, which is close to
but not exactly the pixels a graham cache holds.

Each image is written under a temporary name in its folder and renamed, so a file present
under its final name is complete: rerunning an interrupted command skips what is there.
numpy and PIL only (through preprocess); no torch.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from retinocli import __version__
from retinocli.config import CACHE_FORMATS, PrepareConfig, config_of
from retinocli.errors import RetinoError
from retinocli.data.files import IMAGE_EXTENSIONS
from retinocli.data.layouts import (CACHE_FORMAT, CACHE_LABELS, CACHE_MANIFEST, Dataset,
                                    load_dataset, read_cache_manifest)
from retinocli.events import Emitter, EventsLike, emitter
from retinocli.machine import process_workers
from retinocli.imaging.preprocess import Preprocess, load_and_prepare

TASK = "prepare"  # the progress task of prepare
FORMATS = CACHE_FORMATS
LABEL_COLUMNS = ("image", "file", "grade", "split", "patient", "eye", "source")
IMAGES_DIR = "images"
TMP_SUFFIX = ".tmp"
# Level 6 (PIL's default) takes longer than decoding a 4k photo; level 1 is 4x faster and
# only about 15 % larger on fundus images.
PNG_COMPRESS_LEVEL = 1
# Settings that must match for a run to add to an existing cache.
_SAME = ("size", "mode", "fmt", "quality", "source")
# Images submitted per worker ahead of the results: keeps every core busy, memory bounded.
_AHEAD = 4


@dataclass
class PrepareResult:
    """What one ``prepare`` run did.

    Attributes:
        out: the cache folder.
        count: records in the cache's labels.csv.
        written: image files written by this run.
        skipped: image files already complete from an earlier run.
        failed: source images that could not be read: image, split, path, reason.
        missing: records whose image the source lists but does not have on disk.
        seconds: wall time of the run, start-up included.
        work_seconds: from the first image handed to a worker to the last one finished.
        images_per_second: images this run decoded (written or found unreadable) per
            work second; skipped images and start-up are not in it. The progress bar shows
            this same number (:class:`Rate`).
        bytes: size on disk of the cache's images and its two files.
        notes: the source dataset's notes.
    """

    out: Path
    count: int
    written: int
    skipped: int
    failed: list[dict]
    missing: int
    seconds: float
    work_seconds: float
    images_per_second: float
    bytes: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def prepare(data: str | Path, config: PrepareConfig | None = None, *, events: EventsLike = None,
            **options) -> PrepareResult:
    """Write ``data``'s images, preprocessed, into the cache folder ``config.out``.

    Args:
        data: the dataset folder, in any layout :func:`load_dataset` reads.
        config: a :class:`retinocli.config.PrepareConfig` (the cache folder ``out``, size, mode,
            layout and images for :func:`load_dataset`, fmt, quality, workers, force), or
            ``options``, its fields as keywords. ``force`` rebuilds ``out`` from scratch (a cache
            of other settings, or a non-empty folder: only its images/, labels.csv and
            retino-cache.json are replaced).
        events: a listener for progress: task "prepare", started with the images already in
            the cache as done, advanced per image with the running ``rate`` in its fields
            (see :mod:`retinocli.events`).

    Raises:
        RetinoError: bad settings, an unreadable dataset, or ``out`` holds something else.
        KeyboardInterrupt: passed on after the workers stop; run again to resume.
    """
    start = time.perf_counter()
    cfg = config_of(PrepareConfig, config, options)
    size, mode, fmt, quality, force = cfg.size, cfg.mode, cfg.fmt, cfg.quality, cfg.force
    prep = Preprocess(size=size, mode=mode)  # checks size and mode
    workers = process_workers() if cfg.workers is None else cfg.workers

    ds = load_dataset(data, layout=cfg.layout, images=cfg.images)
    if not ds.records["found"].any():
        raise RetinoError(f"{ds.root}: none of the {len(ds.records)} listed images is on disk; nothing to prepare")
    out = Path(os.path.abspath(Path(cfg.out).expanduser()))
    _refuse_overlap(out, ds)
    settings = {"format": CACHE_FORMAT, "complete": False, "size": size, "mode": mode, "fmt": fmt,
                "quality": quality if fmt == "jpeg" else None, "interpolation": prep.interpolation,
                "source": str(ds.root), "layout": ds.layout, "retino": __version__}
    _claim(out, settings, force)

    planned, jobs, missing = plan_files(ds, fmt)
    _remove_temporaries(out / IMAGES_DIR)
    todo = [(file, src) for file, src in jobs.items() if not (out / file).is_file()]
    skipped = len(jobs) - len(todo)
    rate = Rate()
    reasons = _write_all(todo, out, prep, fmt, quality, workers, _ticker(emitter(events), len(jobs), skipped, rate))
    emitter(events).finished(TASK, rate=rate.per_second)

    failed, rows, reported = [], [], set()
    for rec, file in planned:
        reason = reasons.get(file)
        if reason is None:
            rows.append(_label_row(rec, file))
        elif file not in reported:  # once per file, whatever rows share it
            reported.add(file)
            failed.append({"image": rec["image"], "split": rec["split"], "path": rec["path"], "reason": reason})
    written = len(todo) - len(failed)
    _write_labels(out / CACHE_LABELS, rows)
    files = {r["file"] for r in rows}
    manifest = {**settings, "complete": True, "count": len(rows), "images": len(files),
                "missing": missing, "failed": failed}
    _write_json(out / CACHE_MANIFEST, manifest)

    on_disk = sum((out / f).stat().st_size for f in files)
    on_disk += (out / CACHE_LABELS).stat().st_size + (out / CACHE_MANIFEST).stat().st_size
    seconds = time.perf_counter() - start
    return PrepareResult(out=out, count=len(rows), written=written, skipped=skipped, failed=failed,
                         missing=missing, seconds=round(seconds, 3), work_seconds=round(rate.seconds, 6),
                         images_per_second=rate.per_second, bytes=on_disk, notes=list(ds.notes))


# ---------------------------------------------------------------------------- the folder


def _refuse_overlap(out: Path, ds: Dataset) -> None:
    """A cache must not be written over, or around, the dataset it is made from."""
    root = Path(ds.root)
    for o in {out, out.resolve()}:
        if root == o or root.resolve() == o or root.is_relative_to(o) or root.resolve().is_relative_to(o):
            raise RetinoError(f"--out {out} is or contains the dataset folder {root}; choose a folder outside it")
        inside = str(o) + os.sep
        hit = next((p for p in ds.records["path"] if p.startswith(inside)), None)
        if hit is not None:
            raise RetinoError(f"--out {out} holds the dataset's image {hit}; choose another folder")


def _claim(out: Path, settings: dict, force: bool) -> None:
    """Make ``out`` a cache of ``settings`` marked unfinished: new, resumed, or rebuilt."""
    if out.exists() and not out.is_dir():
        raise RetinoError(f"--out {out} is a file, not a folder")
    if (out / CACHE_MANIFEST).is_file():
        try:
            old = read_cache_manifest(out)
        except RetinoError as exc:
            if not force:
                raise RetinoError(f"{exc}; use --force to rebuild the cache") from None
            old = settings
        differ = [k for k in _SAME if old.get(k) != settings[k]]
        if "fmt" in differ:  # png has no quality: saying so would only add noise
            differ.remove("quality")
        if differ and not force:
            have = ", ".join(f"{k} {old.get(k)}" for k in differ)
            want = ", ".join(f"{k} {settings[k]}" for k in differ)
            raise RetinoError(f"{out} is a cache with {have}, not {want}; choose another --out, "
                              "or --force to rebuild it")
        if force:
            _wipe(out)
    elif out.is_dir() and any(out.iterdir()):
        if not force:
            raise RetinoError(f"--out {out} is not empty and not a retino cache; choose a new folder, "
                              f"or --force to write into it (replacing its {IMAGES_DIR}/, {CACHE_LABELS} "
                              f"and {CACHE_MANIFEST})")
        _wipe(out)
    out.mkdir(parents=True, exist_ok=True)
    # Written first, so a killed run leaves a folder that says what it is and how to finish.
    _write_json(out / CACHE_MANIFEST, settings)


def _wipe(out: Path) -> None:
    images = out / IMAGES_DIR
    if images.is_symlink() or images.is_file():
        images.unlink()
    elif images.is_dir():
        shutil.rmtree(images)
    for name in (CACHE_LABELS, CACHE_MANIFEST):
        (out / name).unlink(missing_ok=True)


def _remove_temporaries(images: Path) -> None:
    """Half-written files of a killed run; their final names were never created."""
    if images.is_dir():
        for dirpath, _, filenames in os.walk(images):
            for name in filenames:
                if name.endswith(TMP_SUFFIX):
                    os.unlink(os.path.join(dirpath, name))


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_labels(path: Path, rows: list[dict]) -> None:
    import csv

    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=LABEL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _label_row(rec: dict, file: str) -> dict:
    def text(v) -> str:
        return "" if v is None else str(v)

    return {"image": rec["image"], "file": file, "grade": text(rec["grade"]), "split": rec["split"],
            "patient": text(rec["patient"]), "eye": text(rec["eye"]), "source": rec["path"]}


# ---------------------------------------------------------------------------- names


def cache_name(image: str) -> str:
    """A record's image name as a relative path for the cache, without its image extension.

    ``10_left`` -> ``10_left``; ``2/a b.PNG`` (folders layout) -> ``2/a b``; nothing can
    climb out: ``../x`` -> ``x``.
    """
    parts = [p for p in re.split(r"[\\/]", image) if p not in ("", ".", "..")] or ["image"]
    stem, ext = os.path.splitext(parts[-1])
    if ext.lower() in IMAGE_EXTENSIONS:
        parts[-1] = stem or "image"
    return "/".join(parts)


def plan_files(ds: Dataset, fmt: str) -> tuple[list[tuple[dict, str]], dict[str, str], int]:
    """Where each record found on disk goes in the cache, in record order.

    Returns (record, file) pairs, the files to write with their source paths, and how many
    records were not on disk. Records of one split naming one source share a file; two
    sources that would take one name (``a.png`` and ``a.jpeg``, or names differing only in
    case, which collide on macOS and Windows) are told apart by a ``~2`` suffix.
    """
    import pandas as pd

    ext = FORMATS[fmt]
    planned: list[tuple[dict, str]] = []
    jobs: dict[str, str] = {}
    taken: dict[str, str] = {}  # casefolded file -> source path
    missing = 0
    for rec in ds.records.to_dict("records"):
        rec = {k: None if v is pd.NA else v for k, v in rec.items()}
        if not rec["found"]:
            missing += 1
            continue
        base = f"{IMAGES_DIR}/{rec['split']}/{cache_name(rec['image'])}"
        file = base + ext
        for k in itertools.count(2):
            owner = taken.setdefault(file.casefold(), rec["path"])
            if owner == rec["path"]:
                break
            file = f"{base}~{k}{ext}"
        jobs.setdefault(file, rec["path"])
        planned.append((rec, file))
    return planned, jobs, missing


# ---------------------------------------------------------------------------- the work


class Rate:
    """The one rate ``prepare`` reports, in its progress bar and in its result.

    Images this run decoded (written, or found unreadable) per second, from the moment the
    first is handed to a worker (the clock starts when the Rate is made) to the last one
    finished. Images already in the cache and the start-up before (reading the dataset,
    checking the folder) are left out, so a resumed run's rate is the speed of its work.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.done = 0
        self.seconds = 0.0

    def tick(self) -> None:
        self.done += 1
        self.seconds = time.perf_counter() - self.start

    @property
    def per_second(self) -> float:
        return round(self.done / self.seconds, 2) if self.done and self.seconds > 0 else 0.0


def _ticker(say: Emitter, total: int, done: int, rate: Rate) -> Callable[[], None]:
    """One call per image finished; images already in the cache count as done from the start.

    Each step carries ``rate``, which the CLI's bar shows instead of its own estimate, so the bar
    ends on the number the summary prints.
    """
    say.started(TASK, total=total, completed=done, rate=None)

    def tick() -> None:
        rate.tick()
        say.advanced(TASK, 1, rate=rate.per_second)

    return tick


def write_image(src: str, dst: str, size: int, mode: str, fmt: str, quality: int) -> str | None:
    """Preprocess one image into ``dst``; returns why the source cannot be read, or None.

    The file appears under its final name only when complete (temporary name, then rename).
    Runs in the worker processes, so it takes and returns only plain values.
    """
    try:
        arr = load_and_prepare(src, Preprocess(size=size, mode=mode))
    except RetinoError as exc:
        return str(exc).removeprefix(f"{src}: ").splitlines()[0]
    target = Path(dst)
    tmp = target.with_name(target.name + TMP_SUFFIX)
    options = ({"format": "PNG", "compress_level": PNG_COMPRESS_LEVEL} if fmt == "png" else
               {"format": "JPEG", "quality": quality, "subsampling": 0})  # 4:4:4: lesions are tiny and red
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            Image.fromarray(arr).save(fh, **options)
        os.replace(tmp, target)
    except OSError as exc:
        raise RetinoError(f"cannot write {target}: {exc.strerror or exc}") from None
    return None


def _quiet_worker() -> None:
    # Ctrl-C reaches the whole process group: the parent alone stops the run, cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _write_all(todo: list[tuple[str, str]], out: Path, prep: Preprocess, fmt: str, quality: int,
               workers: int, tick: Callable[[], None]) -> dict[str, str | None]:
    """Write every (file, source) pair; returns each file's failure reason (None: written)."""
    args = (prep.size, prep.mode, fmt, quality)
    results: dict[str, str | None] = {}
    if workers <= 1 or len(todo) <= 1:
        for file, src in todo:
            results[file] = write_image(src, str(out / file), *args)
            tick()
        return results
    # fork on Linux, as torch's DataLoader: workers start at once and do not re-import the
    # caller's __main__ (spawn and forkserver do). They only decode and write files, so the
    # caller's threads (a rich progress bar) hold no lock a worker needs.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    queue = iter(todo)
    pending: dict[Future, str] = {}
    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context,
                             initializer=_quiet_worker) as pool:
        try:
            while True:
                for file, src in itertools.islice(queue, _AHEAD * workers - len(pending)):
                    pending[pool.submit(write_image, src, str(out / file), *args)] = file
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    results[pending.pop(future)] = future.result()
                    tick()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results
