"""What label tables and image folders say, read the same way by every layout.

Names (splits, grade folders, ``10_left`` patients and eyes), label tables and their grades,
and the images on disk (extensions, one listing per folder, links that arrived as text files).
Plain Python and pandas; no torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from retinocli import NUM_GRADES
from retinocli.errors import RetinoError

if TYPE_CHECKING:
    import pandas as pd

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "dev": "val", "test": "test", "testing": "test"}
GRADE_FOLDER_NAMES = {"0": 0, "1": 1, "2": 2, "3": 3, "4": 4,
                      "nodr": 0, "no": 0, "normal": 0, "none": 0,
                      "mild": 1, "mildnpdr": 1,
                      "moderate": 2, "moderatenpdr": 2,
                      "severe": 3, "severenpdr": 3,
                      "proliferative": 4, "proliferativedr": 4, "proliferatedr": 4, "pdr": 4}

_PATIENT_EYE = re.compile(r"^(?P<patient>\d+)_(?P<eye>left|right)$", re.IGNORECASE)


def split_name(name: str) -> str | None:
    """Canonical split for a folder or file prefix (``valid`` -> ``val``), else None."""
    return SPLIT_ALIASES.get(name.strip().lower())


def grade_from_folder(name: str) -> int | None:
    """Grade a class folder stands for (``2``, ``Moderate``, ``No_DR``), else None."""
    return GRADE_FOLDER_NAMES.get(re.sub(r"[^a-z0-9]", "", name.lower()))


def parse_patient_eye(name: str) -> tuple[str | None, str | None]:
    """``10_left`` -> (``10``, ``left``); names that carry neither give (None, None)."""
    m = _PATIENT_EYE.match(Path(name).stem if Path(name).suffix.lower() in IMAGE_EXTENSIONS else name)
    if not m:
        return None, None
    return m.group("patient"), m.group("eye").lower()


def read_table(path: Path, *, header: bool = True) -> pd.DataFrame:
    """Read a label CSV the way real ones arrive: BOM, padded headers, empty extra columns.

    Every cell is a stripped string; columns with no name and no values are dropped.
    """
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, header=0 if header else None, encoding="utf-8-sig",
                         skip_blank_lines=True, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise RetinoError(f"{path}: not a readable CSV file ({str(exc).splitlines()[0]})") from None
    if header:
        df.columns = [str(c).strip().lstrip("\ufeff") for c in df.columns]
    df = df.apply(lambda col: col.str.strip())
    empty_cols = [c for c in df.columns if (not header or str(c).startswith("Unnamed:") or str(c) == "")
                  and (df[c] == "").all()]
    df = df.drop(columns=empty_cols)
    df = df[(df != "").any(axis=1)] if len(df.columns) else df
    return df.reset_index(drop=True)


def parse_grades(values: Iterable[str], where: str, *, first_line: int,
                 allow_missing: bool = False) -> list[int | None]:
    """Turn label strings into grades 0-4; anything else is one clear error naming lines."""
    grades: list[int | None] = []
    bad: list[str] = []
    missing: list[int] = []
    for i, raw in enumerate(values):
        line = first_line + i
        text = str(raw).strip()
        if text == "" or text.lower() in ("nan", "na", "none"):
            if not allow_missing:
                missing.append(line)
            grades.append(None)
            continue
        try:
            number = float(text)
        except ValueError:
            number = float("nan")
        if number != number or number != int(number) or not 0 <= number < NUM_GRADES:
            bad.append(f"line {line}: {text!r}")
            grades.append(None)
            continue
        grades.append(int(number))
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise RetinoError(f"{where}: {len(bad)} grade(s) are not 0-{NUM_GRADES - 1} "
                          f"({', '.join(bad[:3])}{more})")
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        lines = ", ".join(str(n) for n in missing[:3])
        raise RetinoError(f"{where}: {len(missing)} row(s) have no grade (line {lines}{more})")
    return grades


def require_columns(df: pd.DataFrame, wanted: Iterable[str], where: Path) -> None:
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        found = ",".join(map(str, df.columns)) or "nothing"
        raise RetinoError(f"{where}: expected columns {','.join(wanted)}; found {found}")


def follow_link_file(path: Path, notes: list[str]) -> Path:
    """Follow a symbolic link that arrived as a small text file holding its target.

    Git on a system without symlink support, and many zip tools, check a link out as a
    regular file whose content is the target path; the course layout's ``data`` link is
    the usual victim.
    """
    if path.is_file() and path.stat().st_size < 1024:
        try:
            target = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return path
        if target and "\n" not in target:
            candidate = (path.parent / target).resolve()
            if candidate.is_dir():
                notes.append(f"{path.name} is a text file holding the link target {target!r}; "
                             f"reading images from {candidate}")
                return candidate
    return path


class ImageIndex:
    """Files in one images folder, looked up by name with or without extension.

    One directory listing serves every lookup, so 35,000 label rows cost one scan.
    """

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._by_name: dict[str, str] = {}
        self._by_stem: dict[str, str] = {}
        if folder is not None and folder.is_dir():
            rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
            with os.scandir(folder) as entries:
                names = sorted(e.name for e in entries if e.is_file())
            for name in names:
                self._by_name[name] = name
                stem, ext = os.path.splitext(name)
                ext = ext.lower()
                if ext in rank:
                    best = self._by_stem.get(stem)
                    if best is None or rank[ext] < rank[os.path.splitext(best)[1].lower()]:
                        self._by_stem[stem] = name

    def resolve(self, name: str) -> tuple[str, bool]:
        """Absolute path for a label-file name and whether it exists.

        Raises:
            RetinoError: the name climbs out of the images folder (``../../etc/passwd``).
        """
        base = self.folder if self.folder is not None else Path(".")
        if "/" in name or "\\" in name or name in ("..", "."):
            rel = Path(name.replace("\\", "/"))
            target = (base / rel).resolve()
            if not target.is_relative_to(base.resolve()):
                raise RetinoError(f"image name {name!r} points outside the images folder {base}")
            if target.is_file():
                return str(target), True
            for ext in IMAGE_EXTENSIONS:
                cand = target.with_name(target.name + ext)
                if cand.is_file():
                    return str(cand), True
            return str(target), False
        hit = self._by_name.get(name) or self._by_stem.get(name)
        if hit is not None:
            return str((base / hit).absolute()), True
        return str((base / name).absolute()), False


def _reraise(exc: OSError) -> None:
    raise exc  # os.walk would skip a folder it cannot list, and its images with it


def walk_images(folder: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_reraise, followlinks=False):
        dirnames.sort()
        found += [Path(dirpath) / f for f in sorted(filenames)
                  if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return found
