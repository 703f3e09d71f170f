"""How well do cut points fitted on part of the validation split grade the rest? (issue #14)

For each run (ordinal head), the model scores its validation images once (the
continuous grade score its cut points act on); then, many times over, the images are split in
two halves stratified by grade: cut points are fitted on one half by each strategy and the QWK
they give on the other half is recorded. The mean held-out QWK says which strategy generalises
from ~60 images; it is the question the 120-image RetinaMNIST validation split poses.

    python scripts/cutpoint_study.py RUN [RUN ...] [--repeats 200] [--json OUT]

Strategies: rounding (0.5, 1.5, ...; nothing fitted), the plain QWK maximiser (strength 0),
the shipped regularised fit (strength 2) and stronger pulls, and bagging (the mean of the
strength-0 fits on bootstrap resamples).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from retinocli.models.cutpoints import fit_cutpoints, frequency_cutpoints, qwk
from retinocli.models.grading import cut, default_cutpoints
from retinocli.reporting.evaluate import open_model, score_paths, split_records


def validation_scores(run: Path) -> tuple[np.ndarray, np.ndarray, str]:
    backend = open_model(run, device="cpu")
    _, paths, y, _, _ = split_records(backend, data=None, split="val")
    probs = score_paths(backend, paths).probs
    head = backend.grader.head
    if head != "ordinal":  # regression's probabilities are built from its cut points: not its raw score
        raise SystemExit(f"{run}: the study takes ordinal runs (the expected grade is their score)")
    return probs.astype(np.float64) @ np.arange(probs.shape[1]), y, head


def bagged(s: np.ndarray, y: np.ndarray, k: int, rng: np.random.Generator, n: int = 25) -> np.ndarray:
    fits = []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        fits.append(fit_cutpoints(s[i], y[i], k, strength=0.0))
    return np.sort(np.mean(fits, 0))


STRATEGIES = {
    "rounding": lambda s, y, k, rng: default_cutpoints(k),
    "strength 0": lambda s, y, k, rng: fit_cutpoints(s, y, k, strength=0.0),
    "strength 2 (shipped)": lambda s, y, k, rng: fit_cutpoints(s, y, k, strength=2.0),
    "strength 8": lambda s, y, k, rng: fit_cutpoints(s, y, k, strength=8.0),
    "bagged strength 0": bagged,
    "frequencies": lambda s, y, k, rng: frequency_cutpoints(s, y, k),
    "strength 2 to frequencies": lambda s, y, k, rng: fit_cutpoints(s, y, k, strength=2.0, prior="frequencies"),
    "strength 8 to frequencies": lambda s, y, k, rng: fit_cutpoints(s, y, k, strength=8.0, prior="frequencies"),
    "strength 32 to frequencies": lambda s, y, k, rng: fit_cutpoints(s, y, k, strength=32.0, prior="frequencies"),
}


def halves(y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a = []
    for g in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == g))
        a.extend(idx[: len(idx) // 2 + rng.integers(0, 2) * (len(idx) % 2)])
    mask = np.zeros(len(y), bool)
    mask[a] = True
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def study(s: np.ndarray, y: np.ndarray, repeats: int, seed: int = 0) -> dict[str, list[float]]:
    k = 5
    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {name: [] for name in STRATEGIES}
    for _ in range(repeats):
        fit, held = halves(y, rng)
        for name, strategy in STRATEGIES.items():
            cuts = strategy(s[fit], y[fit], k, rng)
            out[name].append(qwk(y[held], cut(s[held], cuts), k))
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    table: dict[str, dict[str, float]] = {}
    for run in args.runs:
        s, y, head = validation_scores(run)
        result = study(s, y, args.repeats)
        table[run.name] = {name: float(np.mean(v)) for name, v in result.items()}
        print(run.name, head, len(y), " ".join(f"{n}={np.mean(v):.3f}" for n, v in result.items()), flush=True)
    means = {name: float(np.mean([t[name] for t in table.values()])) for name in STRATEGIES}
    print("mean over runs:", " ".join(f"{n}={v:.3f}" for n, v in means.items()))
    if args.json:
        args.json.write_text(json.dumps({"runs": table, "mean": means, "repeats": args.repeats}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
