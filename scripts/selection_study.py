"""Which epoch should a run keep, and does the ordinal head's prior start help? (issue #14)

The RetinaMNIST validation split (120 images) chooses each run's best epoch and fits its cut
points, so its own numbers cannot say whether those choices generalise. This study carves a
stratified ``--carve`` images out of the training split as a third, untouched split, trains the
recipe on the rest (same validation split), and scores the served weights (the EMA) of every
epoch on both validation and the carved split. Selection rules are then replayed on the
validation history and judged on the carved split:

    best val QWK (what ``retino train`` keeps), last epoch, least val loss,
    best val QWK smoothed over three epochs, and the oracle (best carved-split QWK; a bound).

Arms: ``prior`` (the CORAL biases start at the grades' prior, what training does) and
``coral-pytorch`` (the biases start at (K-1..1)/(K-1), as before; the study replaces
:func:`retinocli.engine.parts.coral_prior_bias` for that arm only).

    python scripts/selection_study.py --data ../shared/data/retinamnist --out /tmp/sel \\
        --config examples/recipes/retinamnist.toml --seeds 0 1 2 --arms prior coral-pytorch

Metrics are computed here from the predictions with scikit-learn (QWK, accuracy, one-vs-rest
macro AUC, referable-DR AUC on P(grade >= 2), NLL), not taken from retino's own report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, cohen_kappa_score, log_loss, roc_auc_score

from retinocli.config import TrainConfig, read_config_file
from retinocli.engine import parts as parts_module
from retinocli.engine.checkpoints import MODEL_KEYS, load_checkpoint, save_checkpoint, served_weights
from retinocli.engine.trainer import train
from retinocli.reporting.evaluate import open_model, score_paths
from retinocli.rundir import RunDir

GRADES = 5
RULES = ("best val QWK (shipped)", "last epoch", "least val loss", "best val QWK, 3-epoch mean", "oracle")


def carve(source: Path, out: Path, n: int, seed: int = 0) -> Path:
    """``out`` with train/ minus a stratified ``n``, val/ as it is and the ``n`` as holdout/."""
    if out.exists():
        return out
    rng = np.random.default_rng(seed)
    files = {g: sorted((source / "train" / str(g)).iterdir()) for g in range(GRADES)}
    total = sum(len(f) for f in files.values())
    for g, group in files.items():
        take = set(rng.choice(len(group), round(n * len(group) / total), replace=False).tolist())
        for i, f in enumerate(group):
            dest = out / ("holdout" if i in take else "train") / str(g)
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest / f.name)
    shutil.copytree(source / "val", out / "val")
    return out


def folder_split(root: Path) -> tuple[list[Path], np.ndarray]:
    paths = [p for g in range(GRADES) for p in sorted((root / str(g)).iterdir())]
    return paths, np.array([int(p.parent.name) for p in paths])


def measures(probs: np.ndarray, y: np.ndarray, grades: np.ndarray) -> dict[str, float]:
    probs = np.clip(probs.astype(np.float64), 1e-12, None)
    probs /= probs.sum(1, keepdims=True)
    return {"qwk": float(cohen_kappa_score(y, grades, weights="quadratic")),
            "accuracy": float(accuracy_score(y, grades)),
            "auc": float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(GRADES)))),
            "referable_auc": float(roc_auc_score(y >= 2, probs[:, 2:].sum(1))),
            "nll": float(log_loss(y, probs, labels=list(range(GRADES))))}


def served_checkpoint(run_dir: Path, dest: Path) -> None:
    """last.pt as best.pt would hold it: the EMA's weights when there is one."""
    state = load_checkpoint(RunDir(run_dir).last)
    save_checkpoint({**{k: state[k] for k in MODEL_KEYS if k in state}, "model": served_weights(state)}, dest)


def one_run(cfg: TrainConfig, splits: dict[str, tuple[list[Path], np.ndarray]]) -> list[dict]:
    rows: list[dict] = []

    def score(epoch: int, row: dict) -> None:
        ckpt = Path(cfg.project) / cfg.name / "epoch.pt"
        served_checkpoint(Path(cfg.project) / cfg.name, ckpt)
        backend = open_model(ckpt, device="cpu", threads=1)
        out = {"epoch": epoch, "val_loss_history": row["val_loss"], "val_qwk_history": row["val_qwk"]}
        for split, (paths, y) in splits.items():
            probs = score_paths(backend, [str(p) for p in paths], threads=1).probs
            out[split] = measures(probs, y, backend.grader.grades(probs))
        rows.append(out)
        ckpt.unlink()

    train(cfg, force=True, on_epoch_end=score)
    return rows


def pick(rule: str, rows: list[dict]) -> int:
    """Index of the epoch ``rule`` keeps (ties: the earliest, as training's strict ``>``)."""
    qwk = np.array([r["val_qwk_history"] for r in rows])
    if rule == RULES[0]:
        return int(np.argmax(qwk))
    if rule == "last epoch":
        return len(rows) - 1
    if rule == "least val loss":
        return int(np.argmin([r["val_loss_history"] for r in rows]))
    if rule == RULES[3]:
        padded = np.concatenate([qwk[:1], qwk, qwk[-1:]])
        return int(np.argmax((padded[:-2] + padded[1:-1] + padded[2:]) / 3))
    return int(np.argmax([r["holdout"]["qwk"] for r in rows]))


def summarise(results: dict[str, dict[int, list[dict]]]) -> dict:
    table = {}
    for arm, seeds in results.items():
        for rule in RULES:
            chosen = [rows[pick(rule, rows)] for rows in seeds.values()]
            table[f"{arm} | {rule}"] = {
                "epochs": [c["epoch"] for c in chosen],
                **{f"{split} {m}": [float(np.mean([c[split][m] for c in chosen])),
                                    float(np.std([c[split][m] for c in chosen], ddof=1)) if len(chosen) > 1 else 0.0]
                   for split in ("val", "holdout") for m in ("qwk", "accuracy", "auc", "referable_auc", "nll")}}
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="an ImageFolder tree with train/ and val/")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=Path("examples/recipes/retinamnist.toml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=["prior", "coral-pytorch"], choices=["prior", "coral-pytorch"])
    ap.add_argument("--carve", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=None,
                    help="override the recipe's epochs (its arms are kept apart from the recipe's in the results)")
    args = ap.parse_args()
    data = carve(args.data, args.out / "data", args.carve)
    splits = {"val": folder_split(data / "val"), "holdout": folder_split(data / "holdout")}
    recipe = read_config_file(args.config, {f.name for f in dataclasses.fields(TrainConfig)})
    if args.epochs:
        recipe["epochs"] = args.epochs
    prior_start = parts_module.coral_prior_bias
    results: dict[str, dict[int, list[dict]]] = {}
    log = args.out / "epochs.json"
    if log.exists():
        results = {arm: {int(s): rows for s, rows in seeds.items()} for arm, seeds in json.loads(log.read_text()).items()}
    for start in args.arms:
        parts_module.coral_prior_bias = prior_start if start == "prior" else (
            lambda f: torch.arange(len(f) - 1, 0, -1).float() / (len(f) - 1))
        arm = f"{start}, {recipe['epochs']} epochs" if args.epochs else start
        for seed in args.seeds:
            if seed in results.get(arm, {}):
                continue
            cfg = TrainConfig(**{**recipe, "data": str(data), "seed": seed, "project": str(args.out / "runs"),
                                 "name": f"{arm.replace(', ', '-').replace(' ', '')}-s{seed}",
                                 "recipe": str(args.config)})
            results.setdefault(arm, {})[seed] = one_run(cfg, splits)
            log.write_text(json.dumps(results, indent=1))
    parts_module.coral_prior_bias = prior_start
    table = summarise(results)
    (args.out / "summary.json").write_text(json.dumps(table, indent=1))
    print(f"{'arm | rule':48s} {'epochs':>14s}  holdout QWK      ACC    AUC  ref.AUC   NLL | val QWK")
    for key, t in table.items():
        h = lambda m: t[f"holdout {m}"][0]  # noqa: E731
        print(f"{key:48s} {str(t['epochs']):>14s}  {h('qwk'):.3f}±{t['holdout qwk'][1]:.3f}  {h('accuracy'):.3f}  "
              f"{h('auc'):.3f}  {h('referable_auc'):.3f}  {h('nll'):.3f} | {t['val qwk'][0]:.3f}")


if __name__ == "__main__":
    main()
