"""The one exception a user can cause, and the small helpers every module shares for errors
and for files written whole. The CLI turns a RetinoError into one line and exit code 2."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


class RetinoError(Exception):
    """An error caused by the user's input (paths, options, files), not by a bug."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first non-blank line of an exception's message, or its class name when it has none."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text[:limit] if limit is not None else text


def atomic_write(path: str | Path, data: str | bytes | None = None, *,
                 write: Callable[[IO[Any]], None] | None = None, binary: bool = False,
                 keep_mode_of: Path | None = None) -> Path:
    """Write ``path`` so that a crash at any moment leaves the old file or the new one.

    The bytes (``data``, or what ``write(fh)`` writes) go to a temporary ``.<name>.<hex>.tmp``
    in the same folder, are flushed to disk, and only then replace ``path`` with one rename.
    Text is UTF-8 with newlines as given. The file gets the permissions of any other output
    (0666 less the umask), or those of ``keep_mode_of``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    binary = binary or isinstance(data, bytes)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        opened = (os.fdopen(fd, "wb") if binary else
                  os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline=""))
        with opened as fh:
            if data is not None:
                fh.write(data)
            if write is not None:
                write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if keep_mode_of is not None:
            import shutil

            shutil.copymode(keep_mode_of, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
