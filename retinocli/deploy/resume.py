"""Resuming predict's output (``retino predict --resume``): what an earlier run left in the
file. Graded rows are kept, rows that said error are dropped to be read again, and a last line
cut short by a kill is cut off; a file that is not this model's predictions is refused untouched.
No torch.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retinocli.deploy import schema
from retinocli.errors import RetinoError

__all__ = ["Earlier", "read_earlier"]

_RESTART = "cannot resume it (pass --force to start over)"


@dataclass
class Earlier:
    """What an earlier run left in the output file.

    Attributes:
        graded: path -> predicted grade of every row kept (status ok).
        retry: paths whose rows said error; dropped from the file, to be read again.
    """

    graded: dict[str, int | None] = field(default_factory=dict)
    retry: set[str] = field(default_factory=set)
    referred: set[str] = field(default_factory=set)  # graded paths whose referable is yes


def read_earlier(out: Path, fieldnames: Sequence[str], json_lines: bool) -> Earlier:
    """Read ``out`` for ``--resume``: keep its graded rows, drop its error rows for a retry.

    A last line without its newline is what a kill leaves mid-write: once the complete
    rows are known to be this model's predictions, it is cut off, so the resumed run
    rewrites that image. A file written by anything else is refused untouched. When rows
    with status error are dropped, the file is rewritten atomically (a temporary file,
    then a rename): a kill during the rewrite leaves the old file or the new one.
    """
    data = out.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    text = complete.decode("utf-8", errors="surrogateescape")
    if not text:
        # Only a torn first line: start over, if it is the start of what this run writes.
        first = ("{" + json.dumps(fieldnames[0]) + ": " if json_lines else ",".join(fieldnames)).encode()
        if data and not (first.startswith(data) or data.startswith(first)):
            raise RetinoError(f"{out} is not {'JSON lines' if json_lines else 'CSV'} predictions (one "
                              f"incomplete line); {_RESTART}")
        _truncate(out, 0)
        return Earlier()
    looks_json = text.lstrip().startswith("{")
    if looks_json != json_lines:
        kind, flag = ("JSON lines", "with --json") if looks_json else ("CSV", "without --json")
        raise RetinoError(f"{out} holds {kind}; resume it {flag}")
    what = "this model's predictions"
    rows: list[dict[str, Any]] = []
    if json_lines:
        lines = [line for line in text.splitlines() if line.strip()]
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                raise RetinoError(f"{out}: line {n} is not a predictions row; {_RESTART}")
            reason = schema.refusal(out if n == 1 else f"{out}: line {n}", list(row), fieldnames, what=what,
                                    remedy=_RESTART)
            if reason:
                raise RetinoError(reason)
            rows.append(row)
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None) or []
        reason = schema.refusal(out, header, fieldnames, what=what, remedy=_RESTART)
        if reason:
            raise RetinoError(reason)
        for n, cells in enumerate(reader, 2):
            if len(cells) != len(fieldnames):
                raise RetinoError(f"{out}: row {n} has {len(cells)} columns, expected "
                                  f"{len(fieldnames)}; {_RESTART}")
            rows.append(dict(zip(fieldnames, cells)))

    if len(complete) != len(data):  # only now that the file is known to be ours
        _truncate(out, len(complete))
    earlier = Earlier()
    kept = []
    for row in rows:
        if row[schema.STATUS] == schema.OK:
            grade = row[schema.PREDICTED_GRADE]
            earlier.graded[row[schema.PATH]] = int(grade) if grade not in ("", None) else None
            earlier.retry.discard(row[schema.PATH])
            if row[schema.REFERABLE] == schema.YES:
                earlier.referred.add(row[schema.PATH])
            kept.append(row)
        else:
            earlier.retry.add(row[schema.PATH])
    if len(kept) < len(rows):
        _rewrite(out, fieldnames, kept, json_lines)
    return earlier


def _truncate(out: Path, size: int) -> None:
    with open(out, "r+b") as fh:
        fh.truncate(size)


def _rewrite(out: Path, fieldnames: Sequence[str], rows: list[dict[str, Any]], json_lines: bool) -> None:
    """Replace ``out`` with ``rows`` (as read: CSV cells stay the same text) in one rename."""
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as fh:
        writer = schema.RowWriter(fh, fieldnames, json_lines=json_lines)
        writer.header()
        writer.write(rows)
        os.fsync(fh.fileno())
    shutil.copymode(out, tmp)
    os.replace(tmp, out)
