"""The predictions schema: the one definition of the rows evaluate and predict write.

``retino evaluate`` writes ``predictions.csv`` with the true grade of every image;
``retino predict`` writes the same columns without it, as CSV or JSON lines (the same keys).
Columns, in order::

    image            the image's name: the dataset's name for it (evaluate), its path
                     relative to the folder predicted (predict)
    path             the file that was read
    true_grade       the label (evaluate only)
    predicted_grade  argmax of the probabilities (ordinal head: its expected grade cut at the
                     fitted cut points, retinocli.models.grading); empty for an unreadable image
    grade_name       the model's name for predicted_grade
    confidence       the probability of predicted_grade
    prob_0..prob_K-1 one probability per grade of the model
    referable_prob   probability of referable DR (grade >= 2), the sum of those grades'
    referable       yes or no: referable_prob at or over the model's referral threshold,
                     frozen on validation at training (issue #15; 0.5 for older models)
    status           ok or error
    error            why an unreadable image could not be read; empty when ok

Every writer builds its rows with :func:`make_row` and its header with :func:`columns`;
every reader calls :func:`check_header` (or :func:`read_rows`), which refuses a file from
another command, another model or an older retino with one line naming what differs.
No torch, no pandas.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retinocli import NUM_GRADES
from retinocli.errors import RetinoError
from retinocli.reporting.metrics import REFERABLE_GRADE

IMAGE = "image"
PATH = "path"
TRUE_GRADE = "true_grade"
PREDICTED_GRADE = "predicted_grade"
GRADE_NAME = "grade_name"
CONFIDENCE = "confidence"
REFERABLE_PROB = "referable_prob"
REFERABLE = "referable"
YES, NO = "yes", "no"  # the values of REFERABLE
STATUS = "status"
ERROR = "error"
OK, FAILED = "ok", "error"  # the values of STATUS


def prob_column(grade: int) -> str:
    """``prob_<grade>``: the column of one grade's probability."""
    return f"prob_{grade}"


def columns(num_grades: int = NUM_GRADES, *, labelled: bool) -> tuple[str, ...]:
    """The columns of a predictions file, in order; ``labelled`` adds ``true_grade`` (evaluate)."""
    return (IMAGE, PATH, *((TRUE_GRADE,) if labelled else ()), PREDICTED_GRADE, GRADE_NAME, CONFIDENCE,
            *(prob_column(g) for g in range(num_grades)), REFERABLE_PROB, REFERABLE, STATUS, ERROR)


def older_columns(num_grades: int = NUM_GRADES, *, labelled: bool) -> tuple[str, ...]:
    """The columns files had before ``referable`` (retino before issue #15): still read by
    ``report`` and the gallery, never written, never resumed."""
    return tuple(c for c in columns(num_grades, labelled=labelled) if c != REFERABLE)


EVALUATE_COLUMNS: tuple[str, ...] = columns(labelled=True)
PREDICT_COLUMNS: tuple[str, ...] = columns(labelled=False)


def number(x: float) -> float:
    """The shortest decimal that reads back as the same float32: 0.2, not 0.20000000298.

    Every probability in a predictions file is written through this, whichever command
    wrote it, so the same model gives the same text in both.
    """
    return float(str(np.float32(x)))


def make_row(image: str, path: str, probs: Sequence[float] | None, grade_names: Sequence[str], *,
             labelled: bool, true_grade: int | None = None, error: str = "",
             grade: int | None = None, referable: bool | None = None) -> dict[str, Any]:
    """One row: ``probs`` for a readable image, None (and the ``error``) for an unreadable one.

    Values are typed (int, float, str, None); a CSV writer writes None as an empty cell, JSON
    lines as null. ``grade``: the model's grade when its head does not grade by argmax
    (ordinal cut points, retinocli.models.grading); None: the argmax. ``referable``: the
    model's referral at its frozen threshold (``Grader.referable``); None: referable_prob >= 0.5.
    """
    row: dict[str, Any] = dict.fromkeys(columns(len(grade_names), labelled=labelled))
    row.update({IMAGE: image, PATH: path})
    if labelled:
        row[TRUE_GRADE] = None if true_grade is None else int(true_grade)
    if probs is None:
        row.update({GRADE_NAME: "", STATUS: FAILED, ERROR: error or "unreadable"})
        return row
    values = [number(p) for p in probs]
    if len(values) != len(grade_names):
        raise ValueError(f"{len(values)} probabilities for {len(grade_names)} grades")
    grade = int(np.argmax(probs)) if grade is None else int(grade)
    row.update({PREDICTED_GRADE: grade, GRADE_NAME: grade_names[grade], CONFIDENCE: values[grade]})
    row.update({prob_column(g): v for g, v in enumerate(values)})
    score = math.fsum(probs[REFERABLE_GRADE:])
    refer = score >= 0.5 if referable is None else bool(referable)
    row.update({REFERABLE_PROB: number(score), REFERABLE: YES if refer else NO, STATUS: OK, ERROR: ""})
    return row


class RowWriter:
    """Writes rows to an open text file as CSV or JSON lines, one write and one flush per call."""

    def __init__(self, fh, fieldnames: Sequence[str], *, json_lines: bool = False):
        self.fh, self.fieldnames, self.json_lines = fh, list(fieldnames), json_lines

    def header(self) -> None:
        if not self.json_lines:
            self.write([dict(zip(self.fieldnames, self.fieldnames))])

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        for row in rows:
            if list(row) != self.fieldnames:  # a writer drifting from the schema is a bug
                raise ValueError(f"row keys {list(row)} are not the schema's {self.fieldnames}")
        if self.json_lines:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        else:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, self.fieldnames, lineterminator="\n")
            writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
            text = buf.getvalue()
        self.fh.write(text)
        self.fh.flush()


# --------------------------------------------------------------------------- reading


def _origin(found: Sequence[str]) -> str:
    """Which writer a set of columns most likely came from, for the refusal."""
    have = set(found)
    if PREDICTED_GRADE in have:
        return ("`retino evaluate` wrote it (it has true_grade)" if TRUE_GRADE in have
                else "`retino predict` wrote it (it has no true_grade)")
    if "grade" in have or "predicted" in have:
        return "an older retino wrote it (column grade)"
    return "retino did not write it"


def refusal(path: str | Path, found: Sequence[str], expected: Sequence[str], *, what: str,
            remedy: str = "") -> str | None:
    """The one-line reason ``found`` is not ``expected``, or None when it is."""
    found, expected = list(found), list(expected)
    if found == expected:
        return None
    missing = [c for c in expected if c not in found]
    extra = [c for c in found if c not in expected]
    parts = []
    if missing:
        parts.append("missing " + ", ".join(missing))
    if extra:
        parts.append("unexpected " + ", ".join(extra))
    if not parts:
        parts.append("its columns are in another order")
    probs = [c for c in missing + extra if c.startswith("prob_")]
    origin = _origin(found)
    if probs and len(probs) == len(missing + extra) and PREDICTED_GRADE in found:
        n = sum(c.startswith("prob_") for c in found)
        origin = f"it holds {n} grades, this model {sum(c.startswith('prob_') for c in expected)}"
    tail = f"; {remedy}" if remedy else ""
    return f"{path} is not {what} ({'; '.join(parts)}): {origin}{tail}"


def check_header(path: str | Path, expected: Sequence[str], *, what: str = "a retino predictions file",
                 remedy: str = "", also: Sequence[Sequence[str]] = ()) -> None:
    """Refuse ``path`` unless its header (CSV) or first row's keys (JSON lines) are ``expected``
    (or one of the older layouts in ``also``, e.g. :func:`older_columns`).

    Raises:
        RetinoError: one line naming the file, what is missing and what is unexpected, and
            which writer the file seems to come from.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
            first = fh.readline()
    except OSError as exc:
        raise RetinoError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    found = header_of(first)
    if found is None:
        raise RetinoError(f"{path} is not {what}: it has no header line")
    reason = refusal(path, found, expected, what=what, remedy=remedy)
    if reason and not any(list(found) == list(old) for old in also):
        raise RetinoError(reason)


def header_of(first_line: str) -> list[str] | None:
    """The column names of a first line: a CSV header, or the keys of a JSON object."""
    text = first_line.strip()
    if not text:
        return None
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return None
        return list(obj) if isinstance(obj, dict) else None
    return next(csv.reader([text]), None)


def read_rows(path: str | Path, expected: Sequence[str], *, what: str = "a retino predictions file",
              remedy: str = "", also: Sequence[Sequence[str]] = ()) -> list[dict[str, str]]:
    """The rows of a predictions CSV, after :func:`check_header`; values are the cells' text."""
    check_header(path, expected, what=what, remedy=remedy, also=also)
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for n, row in enumerate(rows, 2):
        if None in row or any(v is None for v in row.values()):
            raise RetinoError(f"{path}: row {n} does not have {len(row)} cells")
    return rows
