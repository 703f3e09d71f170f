"""Batched augmentation alone on one device: images/s per preset and batch, and where the time goes.

    python scripts/gpu_augment_speed.py [--device cuda] [--size 512] [--out FOLDER]
Prints one JSON line per (preset, batch); with --out also writes profile-<preset>.txt (the
profiler's top operations at the largest batch).
"""
import argparse
import json
import time
from pathlib import Path

import torch

from retinocli.engine.augment import BatchAugment

ap = argparse.ArgumentParser()
ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
ap.add_argument("--size", type=int, default=512)
ap.add_argument("--batches", default="32,128,256")
ap.add_argument("--seconds", type=float, default=1.5)
ap.add_argument("--out", type=Path)
a = ap.parse_args()
dev = torch.device(a.device)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
for preset in ("light", "strong"):
    aug = BatchAugment(preset, seed=0)
    for batch in map(int, a.batches.split(",")):
        x = torch.randint(0, 256, (batch, 3, a.size, a.size), dtype=torch.uint8, device=dev)
        for step in range(3):
            aug(x, step)
        sync()
        n, step, start = 0, 3, time.perf_counter()
        while time.perf_counter() - start < a.seconds:
            aug(x, step)
            step += 1
            n += batch
        sync()
        rate = n / (time.perf_counter() - start)
        print(json.dumps({"preset": preset, "batch": batch, "size": a.size, "device": str(dev),
                          "images_per_second": round(rate, 1)}), flush=True)
    if a.out:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for step in range(10):
                aug(x, step)
            sync()
        key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"profile-{preset}.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=18))
