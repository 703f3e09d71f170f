"""``retino bench``'s row for ``--decode gpu`` (issue #16): JPEG bytes decoded by nvJPEG in batches.

The worker's share is reading the file and checking its header
(:func:`retinocli.engine.jpeg_decode.jpeg_bytes`); the device's is one batched
``decode_jpeg``, the resize and the light augmentation. The row is compared with the same
training input decoded by PIL in the worker (``augment_new_name("light", ...)``). Without a
CUDA device it is skipped and a note says so.
"""

from __future__ import annotations

from pathlib import Path

from retinocli.reporting.bench import Row, augment_new_name, timed

SKIPPED = "GPU JPEG decoding (retino train --decode gpu): skipped, it needs a CUDA device"


def gpu_decode_name(label: str) -> str:
    return f"retino loader reading JPEG bytes, decoded on the GPU in batches + light augmentation, {label}"


def bench_gpu_decode(paths: list[Path], size: int, label: str, device, min_seconds: float,
                     batch: int = 32) -> tuple[list[Row], list[str]]:
    """(rows, notes): one row on a CUDA device, else a note."""
    if device.type != "cuda":
        return [], [SKIPPED]
    import torch

    from retinocli.engine.augment import BatchAugment
    from retinocli.engine.jpeg_decode import JpegCollate, jpeg_bytes
    from retinocli.engine.trainer import to_input
    from retinocli.imaging.preprocess import IMAGENET_MEAN, IMAGENET_STD

    files = [paths[i % len(paths)] for i in range(batch)]
    if any(jpeg_bytes(f) is None for f in files):
        return [], ["GPU JPEG decoding: skipped, the generated files are not plain JPEGs"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core on the host side, as the other data rows
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    collate, aug, step = JpegCollate(size), BatchAugment("light", seed=0), {"n": 0}

    def run() -> int:
        step["n"] += 1
        images, _ = collate([(jpeg_bytes(f), 0) for f in files])
        to_input(images.pin_memory(), device, mean, std, False, aug, step["n"])
        return batch

    try:
        speed = timed(run, min_seconds=min_seconds, sync=torch.cuda.synchronize, warmup=3)
    finally:
        torch.set_num_threads(threads)
    return [Row("data", gpu_decode_name(label), str(device), 1, batch, size, speed,
                baseline=augment_new_name("light", label, device.type))], []
