"""Find a diabetic-retinopathy dataset on disk and turn it into one table of records.

Every layout ends in the same :class:`Dataset`: a pandas table with one row per labelled
(or unlabelled) image and the columns

    image    the name the label file uses (the key within a split)
    path     where the image is (or would be) on disk, absolute
    found    whether that file exists
    grade    0-4, or <NA> for unlabelled images (nullable Int64)
    split    train, val or test
    patient  patient id when the file name carries it (``10_left`` -> ``10``), else <NA>
    eye      left or right when the file name carries it, else <NA>

Plain Python and pandas; no torch. Layouts, auto-detected unless forced with ``layout=``:

    course   header-less train_img.csv / train_label.csv (+ test_, val_), images in data/
    kaggle   Kaggle 2015 EyePACS: trainLabels.csv (image,level) + train/ (+ testLabels.csv, test/)
    aptos    APTOS 2019: train.csv (id_code,diagnosis) + train_images/ (+ test.csv, test_images/)
    idrid    IDRiD 'B. Disease Grading' tree
    folders  one subfolder per grade, optionally under train/ val/ test/
    cache    a preprocessed copy written by ``retino prepare``: retino-cache.json, labels.csv
             and images/<split>/; recognised before every other layout
    csv      any CSV: csv=FILE, image_col=, label_col= (images= for the folder)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from retinocli.data.files import (ImageIndex, follow_link_file, grade_from_folder, parse_grades, parse_patient_eye,
                                  read_table, require_columns, split_name, walk_images)
from retinocli.errors import RetinoError

if TYPE_CHECKING:
    import pandas as pd

LAYOUTS = ("course", "kaggle", "aptos", "idrid", "folders", "cache", "csv")
COLUMNS = ("image", "path", "found", "grade", "split", "patient", "eye")
# The two files `retino prepare` writes at the root of a cache (see retinocli.imaging.cache).
CACHE_MANIFEST = "retino-cache.json"
CACHE_LABELS = "labels.csv"
CACHE_FORMAT = 1


@dataclass
class Dataset:
    """A dataset found on disk: where, which layout, its records, and what was noticed."""

    root: Path
    layout: str
    records: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    @property
    def splits(self) -> list[str]:
        order = {"train": 0, "val": 1, "test": 2}
        return sorted(self.records["split"].unique(), key=lambda s: (order.get(s, 9), s))


# ---------------------------------------------------------------------------- helpers


def _records(rows: list[dict]) -> pd.DataFrame:
    import pandas as pd

    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df["grade"] = df["grade"].astype("Int64")
    df["found"] = df["found"].astype(bool)
    for col in ("patient", "eye"):
        df[col] = df[col].astype("string")
    return df


def _rows(names: Iterable[str], grades: Iterable[int | None], split: str, index: ImageIndex,
          *, patients: bool = True) -> list[dict]:
    rows = []
    for name, grade in zip(names, grades):
        path, found = index.resolve(name)
        patient, eye = parse_patient_eye(name) if patients else (None, None)
        rows.append({"image": name, "path": path, "found": found, "grade": grade,
                     "split": split, "patient": patient, "eye": eye})
    return rows


# ---------------------------------------------------------------------------- layouts


def _detect_course(root: Path) -> bool:
    return (root / "train_img.csv").is_file() or (root / "test_img.csv").is_file()


def _load_course(root: Path, images: Path | None, notes: list[str]) -> list[dict]:
    folder = images if images is not None else follow_link_file(root / "data", notes)
    if images is None and not folder.is_dir():
        notes.append(f"no images folder at {root / 'data'}: counting every image as missing "
                     "(point --images at the folder that holds them)")
    index = ImageIndex(folder)
    rows: list[dict] = []
    for prefix in ("train", "val", "valid", "test"):
        img_csv, label_csv = root / f"{prefix}_img.csv", root / f"{prefix}_label.csv"
        if not img_csv.is_file() and not label_csv.is_file():
            continue
        if not (img_csv.is_file() and label_csv.is_file()):
            have, lack = (img_csv, label_csv) if img_csv.is_file() else (label_csv, img_csv)
            raise RetinoError(f"{have} has no partner: {lack.name} is missing")
        names_df = read_table(img_csv, header=False)
        labels_df = read_table(label_csv, header=False)
        names = list(names_df.iloc[:, 0]) if len(names_df.columns) else []
        labels = list(labels_df.iloc[:, 0]) if len(labels_df.columns) else []
        first = 1
        # The course files have no header; the course's own loader reads them with one and
        # silently loses the first image. Only a non-numeric first label is a real header.
        if labels and not re.fullmatch(r"-?\d+(\.0*)?", labels[0]):
            notes.append(f"{label_csv.name} starts with a header row {labels[0]!r}; skipped it")
            labels, names, first = labels[1:], names[1:], 2
        if len(names) != len(labels):
            raise RetinoError(f"{img_csv.name} lists {len(names)} images but {label_csv.name} "
                              f"has {len(labels)} labels")
        grades = parse_grades(labels, str(label_csv), first_line=first)
        rows += _rows(names, grades, split_name(prefix) or prefix, index)
    return rows


def _detect_kaggle(root: Path) -> bool:
    return (root / "trainLabels.csv").is_file() or (root / "testLabels.csv").is_file()


def _load_labelled_csv(csv: Path, image_col: str, label_col: str | None, split: str,
                       index: ImageIndex, *, patients: bool = True) -> list[dict]:
    df = read_table(csv)
    require_columns(df, [image_col] + ([label_col] if label_col else []), csv)
    names = list(df[image_col])
    if label_col is None:
        grades: list[int | None] = [None] * len(names)
    else:
        grades = parse_grades(df[label_col], str(csv), first_line=2)
    return _rows(names, grades, split, index, patients=patients)


def _load_kaggle(root: Path, images: Path | None, notes: list[str]) -> list[dict]:
    rows: list[dict] = []
    for split in ("train", "test"):
        csv = root / f"{split}Labels.csv"
        if not csv.is_file():
            continue
        folder = root / split
        if images is not None:
            folder = images
        elif not folder.is_dir():
            folder = follow_link_file(folder, notes)
            if not folder.is_dir():
                notes.append(f"no images folder at {root / split}: counting its images as missing")
        rows += _load_labelled_csv(csv, "image", "level", split, ImageIndex(folder))
    return rows


def _detect_aptos(root: Path) -> bool:
    return (root / "train.csv").is_file() and (root / "train_images").is_dir()


def _load_aptos(root: Path, images: Path | None, notes: list[str]) -> list[dict]:
    rows = _load_labelled_csv(root / "train.csv", "id_code", "diagnosis", "train",
                              ImageIndex(images or root / "train_images"), patients=False)
    for split in ("val", "valid", "test"):
        csv = root / f"{split}.csv"
        if csv.is_file():
            df = read_table(csv)
            label = "diagnosis" if "diagnosis" in df.columns else None
            if label is None:
                notes.append(f"{csv.name} has no diagnosis column: its images are unlabelled")
            rows += _load_labelled_csv(csv, "id_code", label, split_name(split) or split,
                                       ImageIndex(root / f"{split}_images"), patients=False)
    return rows


def _find_idrid(root: Path) -> Path | None:
    """The 'B. Disease Grading' folder: root itself, or up to two levels below it."""
    candidates = [root] + [p for p in sorted(root.iterdir()) if p.is_dir()] if root.is_dir() else []
    for depth_two in list(candidates[1:]):
        candidates += [p for p in sorted(depth_two.iterdir()) if p.is_dir()]
    for cand in candidates:
        subs = {p.name.lower(): p for p in cand.iterdir() if p.is_dir()}
        if any("original images" in s for s in subs) and any("groundtruth" in s for s in subs):
            return cand
    return None


def _detect_idrid(root: Path) -> bool:
    return _find_idrid(root) is not None


def _load_idrid(root: Path, images: Path | None, notes: list[str]) -> list[dict]:
    base = _find_idrid(root)
    if base is None:
        raise RetinoError(f"{root}: no IDRiD 'B. Disease Grading' folder (with '1. Original Images' "
                          "and '2. Groundtruths') found")
    subs = {p.name.lower(): p for p in base.iterdir() if p.is_dir()}
    originals = next(p for s, p in subs.items() if "original images" in s)
    truths = next(p for s, p in subs.items() if "groundtruth" in s)
    rows: list[dict] = []
    for split, word in (("train", "training"), ("test", "testing")):
        csvs = [p for p in truths.iterdir() if p.suffix.lower() == ".csv" and word in p.name.lower()]
        folders = [p for p in originals.iterdir() if p.is_dir() and word in p.name.lower()]
        if not csvs:
            continue
        df = read_table(csvs[0])
        image_col = next((c for c in df.columns if c.lower().startswith("image")), "Image name")
        label_col = next((c for c in df.columns if "retinopathy" in c.lower()), "Retinopathy grade")
        folder = images if images is not None else (folders[0] if folders else None)
        if folder is None:
            notes.append(f"no '{word.title()} Set' images folder under {originals}: "
                         "counting its images as missing")
        # IDRiD numbers images, not patients, and restarts the numbers in the test set:
        # the split is part of the key, and the name says nothing about the patient.
        rows += _load_labelled_csv(csvs[0], image_col, label_col, split, ImageIndex(folder),
                                   patients=False)
    if not rows:
        raise RetinoError(f"{truths}: no training or testing grade CSV found")
    return rows


def _grade_folders(folder: Path) -> dict[Path, int]:
    if not folder.is_dir():
        return {}
    out = {}
    for p in sorted(folder.iterdir()):
        grade = grade_from_folder(p.name) if p.is_dir() else None
        if grade is not None:
            out[p] = grade
    return out


def _split_folders(root: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    if root.is_dir():
        for p in sorted(root.iterdir()):
            split = split_name(p.name) if p.is_dir() else None
            if split and split not in out and _grade_folders(p):
                out[split] = p
    return out


def _detect_folders(root: Path) -> bool:
    return len(_grade_folders(root)) >= 2 or bool(_split_folders(root))


def _load_folders(root: Path, images: Path | None, notes: list[str]) -> list[dict]:
    splits = _split_folders(root) or {"train": root}
    rows: list[dict] = []
    for split, folder in splits.items():
        for grade_dir, grade in _grade_folders(folder).items():
            for path in walk_images(grade_dir):
                patient, eye = parse_patient_eye(path.stem)
                rows.append({"image": str(path.relative_to(folder)), "path": str(path.absolute()),
                             "found": True, "grade": grade, "split": split,
                             "patient": patient, "eye": eye})
        ignored = [p.name for p in sorted(folder.iterdir())
                   if p.is_dir() and grade_from_folder(p.name) is None]
        if ignored:
            notes.append(f"{folder}: ignored folders that name no grade: {', '.join(ignored[:5])}")
    return rows


def _detect_cache(root: Path) -> bool:
    return (root / CACHE_MANIFEST).is_file()


def read_cache_manifest(root: Path) -> dict:
    """The settings a ``retino prepare`` cache was written with (its retino-cache.json).

    Raises:
        RetinoError: the file is not JSON, not a mapping, of another format, or lacks a setting.
    """
    path = root / CACHE_MANIFEST
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RetinoError(f"{path}: not a readable retino cache manifest ({reason})") from None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise RetinoError(f"{path}: not a retino cache manifest of format {CACHE_FORMAT}")
    size = meta.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not isinstance(meta.get("mode"), str):
        raise RetinoError(f"{path}: the manifest has no valid size and mode")
    return meta


def _read_cache_labels(path: Path) -> list[dict]:
    # The csv module, not read_table: names are kept exactly, spaces included.
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = [{k: (v or "") for k, v in row.items() if k is not None} for row in reader]
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RetinoError(f"{path}: not a readable CSV file ({reason})") from None
    missing = [c for c in ("image", "file", "grade", "split") if c not in columns]
    if missing:
        raise RetinoError(f"{path}: expected columns image,file,grade,split; "
                          f"found {','.join(columns) or 'nothing'}")
    return rows


def _load_cache(root: Path, images: Path | None, notes: list[str]) -> list[dict]:
    if images is not None:
        raise RetinoError(f"{root} is a retino cache with its images inside it; drop --images")
    meta = read_cache_manifest(root)
    labels = root / CACHE_LABELS
    if meta.get("complete") is not True or not labels.is_file():
        raise RetinoError(f"{root}: an unfinished retino cache (prepare was interrupted); "
                          "run the same retino prepare command again to finish it")
    table = _read_cache_labels(labels)
    grades = parse_grades([r["grade"] for r in table], str(labels), first_line=2, allow_missing=True)
    rows = []
    for line, (r, grade) in enumerate(zip(table, grades), 2):
        file = r["file"]
        parts = file.replace("\\", "/").split("/")
        if not file or file.startswith(("/", "\\")) or ":" in parts[0] or ".." in parts:
            raise RetinoError(f"{labels}: line {line}: file {file!r} is not a path inside the cache")
        split = split_name(r["split"])
        if split is None:
            raise RetinoError(f"{labels}: line {line}: unknown split {r['split']!r}; use train, val or test")
        path = root.joinpath(*parts)
        rows.append({"image": r["image"], "path": str(path), "found": path.is_file(), "grade": grade,
                     "split": split, "patient": r.get("patient") or None, "eye": r.get("eye") or None})
    notes.append(f"cache of {meta.get('source', '?')} preprocessed with {meta['mode']} at {meta['size']} px: "
                 f"train with --preprocess none --img-size {meta['size']} for the same pixels")
    failed = meta.get("failed") or []
    if failed:
        notes.append(f"{len(failed)} source image(s) could not be read and are not in the cache "
                     f"(listed in {CACHE_MANIFEST})")
    return rows


DETECTORS: dict[str, Callable[[Path], bool]] = {
    "course": _detect_course, "kaggle": _detect_kaggle, "aptos": _detect_aptos,
    "idrid": _detect_idrid, "folders": _detect_folders, "cache": _detect_cache,
}
LOADERS = {"course": _load_course, "kaggle": _load_kaggle, "aptos": _load_aptos,
           "idrid": _load_idrid, "folders": _load_folders, "cache": _load_cache}
LOOKED_FOR = ("course (train_img.csv + train_label.csv), kaggle (trainLabels.csv + train/), "
              "aptos (train.csv + train_images/), idrid ('B. Disease Grading' tree), "
              "folders (grade subfolders 0-4, optionally under train/ val/ test/), "
              "cache (retino-cache.json from retino prepare)")


def detect_layout(root: Path) -> str:
    """Name the one layout ``root`` is in.

    A ``retino prepare`` cache is recognised first: its labels must never be read as the
    layout it was made from.

    Raises:
        RetinoError: no layout, or more than one, matches.
    """
    if _detect_cache(root):
        return "cache"
    hits = [name for name, detect in DETECTORS.items() if detect(root)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
        shown = ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
        raise RetinoError(f"{root}: no dataset layout recognised; looked for {LOOKED_FOR}; "
                          f"found {shown or 'an empty folder'}")
    raise RetinoError(f"{root}: ambiguous layout, it looks like {' and '.join(hits)}; "
                      "choose one with --layout")


def load_dataset(root: str | Path | None = None, *, layout: str | None = None,
                 images: str | Path | None = None, csv: str | Path | None = None,
                 image_col: str | None = None, label_col: str | None = None,
                 split: str = "train") -> Dataset:
    """Discover a dataset and return its records.

    Args:
        root: the dataset folder (for ``csv``, defaults to the CSV's folder).
        layout: force one of :data:`LAYOUTS`; auto-detected when None.
        images: the folder holding the images, when not where the layout expects it.
        csv, image_col, label_col: the ``csv`` layout's label file and column names.
        split: the split the ``csv`` layout's rows belong to.

    Raises:
        RetinoError: missing folder, unknown or ambiguous layout, bad label files, no images.
    """
    if csv is not None or layout == "csv":
        with _readable():
            return _load_csv_layout(root, csv, image_col, label_col, images, split)
    if root is None:
        raise RetinoError("no dataset folder given")
    root = Path(root).expanduser()
    if not root.exists():
        raise RetinoError(f"no such folder: {root}")
    if not root.is_dir():
        raise RetinoError(f"{root} is a file, not a dataset folder (for a label CSV use --csv)")
    if layout is not None and layout not in LAYOUTS:
        raise RetinoError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    images_dir = Path(images).expanduser().absolute() if images is not None else None
    if images_dir is not None and not images_dir.is_dir():
        raise RetinoError(f"--images: no such folder: {images_dir}")
    root = Path(os.path.abspath(root))
    notes: list[str] = []
    with _readable():
        name = layout or detect_layout(root)
        rows = LOADERS[name](root, images_dir, notes)
    if not rows:
        raise RetinoError(f"{root}: the {name} layout was found but lists no images")
    return Dataset(root=root, layout=name, records=_records(rows), notes=notes)


@contextmanager
def _readable():
    """A folder or label file this user may not read is one clear error, not a traceback."""
    try:
        yield
    except OSError as exc:
        raise RetinoError(f"cannot read {exc.filename or 'the dataset'}: {exc.strerror or exc}") from None


def _load_csv_layout(root, csv, image_col, label_col, images, split) -> Dataset:
    if csv is None:
        raise RetinoError("the csv layout needs --csv FILE")
    csv = Path(csv).expanduser().absolute()
    if not csv.is_file():
        raise RetinoError(f"no such CSV file: {csv}")
    if not image_col or not label_col:
        raise RetinoError("--csv needs --image-col and --label-col naming its columns")
    if split_name(split) is None:
        raise RetinoError(f"unknown split {split!r}; use train, val or test")
    folder = Path(images).expanduser().absolute() if images else Path(root or csv.parent).absolute()
    if not folder.is_dir():
        raise RetinoError(f"no such images folder: {folder}")
    rows = _load_labelled_csv(csv, image_col, label_col, split_name(split), ImageIndex(folder))
    if not rows:
        raise RetinoError(f"{csv}: lists no images")
    return Dataset(root=folder, layout="csv", records=_records(rows))
