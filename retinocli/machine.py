"""How much of this machine retino uses when the user does not say: one rule per kind of work."""
from __future__ import annotations

import os

MAX_DECODE_THREADS = 8  # beyond this, JPEG decoding threads mostly wait on each other and the disk
MAX_CPU_LOADER_WORKERS = 4  # on a CPU run the workers compete with the model for the same cores


def cores() -> int:
    """The cores this process may run on (a container's or SLURM's share, not the whole host's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def decode_threads() -> int:
    """Threads that decode images with PIL, which releases the GIL: one per core, at most 8.

    ``stats``, ``evaluate`` and ``predict`` use it.
    """
    return min(MAX_DECODE_THREADS, cores())


def process_workers() -> int:
    """Processes for work that holds the GIL (``prepare``'s crop and resize): one per core."""
    return cores()


def loader_workers(device_type: str) -> int:
    """DataLoader workers for training: up to 8 feeding a GPU; on a CPU, leave a core to the model."""
    if device_type == "cuda":
        return min(MAX_DECODE_THREADS, cores())
    return min(MAX_CPU_LOADER_WORKERS, max(0, cores() - 1))


def source_revision(package_dir: str | os.PathLike | None = None) -> str | None:
    """The git commit of the retino code that runs (``+dirty`` when the package's files differ
    from it), so a run records which code trained it, not only the version number.

    None when the package is not the ``retinocli`` folder at the top of a git checkout (an
    installed wheel, even inside a user's own repository), or when git is missing.
    """
    import subprocess
    from pathlib import Path

    here = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != here.resolve().parent:
        return None
    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return commit + ("+dirty" if changed else "")
