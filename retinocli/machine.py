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
