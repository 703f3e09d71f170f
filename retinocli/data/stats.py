"""What a dataset holds before anyone trains on it: balance, patients, leakage, broken files.

Works on the records of :mod:`retinocli.data.layouts`; pandas, numpy and PIL only, no torch.
Everything :func:`dataset_stats` returns is plain JSON-ready data; :mod:`retinocli.reporting.render`
renders it and :func:`balance_chart` draws it (the chart ``retino report`` draws too).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from retinocli import GRADE_NAMES, NUM_GRADES
from retinocli.config import StatsConfig, config_of
from retinocli.errors import RetinoError
from retinocli.events import EventsLike, emitter
from retinocli.machine import decode_threads
from retinocli.data.layouts import Dataset

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CHECKING = "checking images"  # the progress task of dataset_stats
EXAMPLES = 10  # how many offending names a report lists; the counts are always complete


def grade_balance(grades) -> dict:
    """Counts, shares, imbalance and the majority-grade bar for one list of grades.

    The majority accuracy is what always answering the commonest grade scores: the bar any
    model must clear (73.5 % on the course's test split, which its reports never noticed).
    """
    from retinocli.reporting.metrics import majority_baseline

    labelled = [int(g) for g in grades if g is not None and g == g]
    counts = Counter(labelled)
    n = len(labelled)
    per_grade = [counts.get(g, 0) for g in range(NUM_GRADES)]
    present = [c for c in per_grade if c]
    majority, majority_accuracy = majority_baseline(labelled) if n else (None, None)
    return {
        "labelled": n,
        "counts": per_grade,
        "shares": [c / n if n else 0.0 for c in per_grade],
        "absent_grades": [g for g in range(NUM_GRADES) if per_grade[g] == 0],
        "imbalance_ratio": max(present) / min(present) if present else None,
        "majority_grade": None if majority is None else int(majority),
        "majority_accuracy": None if majority_accuracy is None else float(majority_accuracy),
    }


def inspect_image(path: str, *, digest: bool = False) -> dict:
    """Say what one image is (format, mode, size, bytes), or why it cannot be read.

    The decode check is :func:`retinocli.imaging.preprocess.load_image` itself (in reduced-size
    draft mode, which still reads every byte, so truncated files show): a file stats calls
    readable is one training and prediction can read.
    """
    from PIL import Image

    from retinocli.imaging.preprocess import load_image

    info: dict = {"path": path}
    try:
        load_image(path, target=32)
    except RetinoError as exc:
        reason = str(exc).removeprefix(f"{path}: ")
        return {**info, "error": reason}
    try:
        info["bytes"] = os.path.getsize(path)
        with Image.open(path) as img:
            info.update(format=img.format, mode=img.mode, width=img.width, height=img.height)
        if digest:
            with open(path, "rb") as fh:
                info["sha1"] = hashlib.sha1(fh.read()).hexdigest()
    except OSError as exc:  # changed or vanished between the two reads
        return {**info, "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    return info


def _summary(values: list[float]) -> dict | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"min": ordered[0], "median": ordered[len(ordered) // 2], "max": ordered[-1]}


def _patients(records) -> dict:
    known = records.dropna(subset=["patient"])
    per_patient_splits = known.groupby("patient")["split"].agg(lambda s: tuple(sorted(set(s))))
    straddling = per_patient_splits[per_patient_splits.map(len) > 1]
    by_pair = Counter(" + ".join(splits) for splits in straddling)
    eyes = known.groupby("patient")["eye"].nunique()
    return {
        "with_patient_id": int(len(known)),
        "patients": int(known["patient"].nunique()),
        "eyes": {str(k): int(v) for k, v in known["eye"].value_counts().sort_index().items()},
        "patients_with_both_eyes": int((eyes >= 2).sum()),
        "straddling_splits": int(len(straddling)),
        "straddling_by_splits": dict(by_pair),
        "straddling_examples": list(straddling.index[:EXAMPLES]),
    }


def _leakage(records, checked: list[dict]) -> dict:
    """Images listed in more than one split, by path and (for checked files) by content."""
    per_path = records.groupby("path")["split"].agg(lambda s: tuple(sorted(set(s))))
    across = per_path[per_path.map(len) > 1]
    dup_within = records[records.duplicated(subset=["split", "path"], keep="first")]
    by_hash: dict[str, set] = {}
    split_of = dict(zip(records["path"], records["split"]))
    for info in checked:
        if "sha1" in info:
            by_hash.setdefault(info["sha1"], set()).add(info["path"])
    same_content = [sorted(paths) for paths in by_hash.values()
                    if len({split_of.get(p) for p in paths}) > 1]
    return {
        "same_image_across_splits": int(len(across)),
        "same_image_examples": [Path(p).name for p in across.index[:EXAMPLES]],
        "duplicate_rows_within_split": int(len(dup_within)),
        "duplicate_row_examples": list(dup_within["image"][:EXAMPLES]),
        "same_content_across_splits": len(same_content),
        "same_content_examples": [[Path(p).name for p in group] for group in same_content[:EXAMPLES]],
    }


def dataset_stats(ds: Dataset, *, sample: int | None = 200, seed: int = 0, threads: int | None = None,
                  events: EventsLike = None) -> dict:
    """Everything ``retino stats`` reports about a dataset.

    Args:
        ds: the dataset from :func:`retinocli.data.layouts.load_dataset`.
        sample: how many existing images to open and check (seeded); None opens all.
        seed: which images the sample takes.
        threads: decoding threads (PIL releases the GIL while decoding).
        events: a listener for progress (task "checking images"), see :mod:`retinocli.events`.
    """
    rec = ds.records
    splits = {}
    for split in ds.splits:
        part = rec[rec["split"] == split]
        splits[split] = {"images": int(len(part)), "found": int(part["found"].sum()),
                         **grade_balance(part["grade"].tolist())}
    overall = {"images": int(len(rec)), "found": int(rec["found"].sum()),
               **grade_balance(rec["grade"].tolist())}

    existing = rec[rec["found"]].drop_duplicates(subset=["path"])
    to_check = existing if sample is None or sample >= len(existing) else \
        existing.sample(n=sample, random_state=seed)
    paths = sorted(to_check["path"])
    checked: list[dict] = []
    workers = threads or decode_threads()
    say = emitter(events)
    say.started(CHECKING, total=len(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for info in pool.map(lambda p: inspect_image(p, digest=True), paths):
            checked.append(info)
            say.advanced(CHECKING)
    say.finished(CHECKING)
    good = [c for c in checked if "error" not in c]
    missing = rec[~rec["found"]]
    files = {
        "missing": int(len(missing)),
        "missing_examples": [{"split": s, "image": i} for s, i in
                             zip(missing["split"][:EXAMPLES], missing["image"][:EXAMPLES])],
        "checked": len(checked),
        "checked_scope": "all" if len(checked) == len(existing) else "sample",
        "unreadable": [{"path": c["path"], "reason": c["error"]} for c in checked if "error" in c],
        "formats": dict(Counter(c["format"] for c in good)),
        "modes": dict(Counter(c["mode"] for c in good)),
        "width": _summary([c["width"] for c in good]),
        "height": _summary([c["height"] for c in good]),
        "megabytes": _summary([round(c["bytes"] / 1e6, 3) for c in good]),
    }
    return {
        "root": str(ds.root),
        "layout": ds.layout,
        "notes": list(ds.notes),
        "grade_names": list(GRADE_NAMES),
        "splits": splits,
        "overall": overall,
        "patients": _patients(rec),
        "leakage": _leakage(rec, checked),
        "files": files,
    }


def warnings(stats: dict) -> list[str]:
    """The findings a person must not miss, one line each."""
    out = []
    leak, pat = stats["leakage"], stats["patients"]
    if leak["same_image_across_splits"]:
        out.append(f"leakage: {leak['same_image_across_splits']} image(s) appear in more than one split")
    if leak["same_content_across_splits"]:
        out.append(f"leakage: {leak['same_content_across_splits']} file(s) with identical content "
                   "sit in different splits (among the images checked)")
    if pat["straddling_splits"]:
        pairs = ", ".join(f"{k}: {v}" for k, v in pat["straddling_by_splits"].items())
        out.append(f"leakage: {pat['straddling_splits']} patient(s) have images in more than one "
                   f"split ({pairs}); one eye in each split lets a model grade a patient it has seen")
    if leak["duplicate_rows_within_split"]:
        out.append(f"{leak['duplicate_rows_within_split']} duplicate row(s) list the same image "
                   "twice within a split")
    files = stats["files"]
    if files["missing"]:
        out.append(f"{files['missing']} of {stats['overall']['images']} listed image(s) are missing on disk")
    if files["unreadable"]:
        out.append(f"{len(files['unreadable'])} image(s) cannot be read")
    for split, s in stats["splits"].items():
        if s["labelled"] and s["absent_grades"]:
            names = ", ".join(f"{g} {GRADE_NAMES[g]}" for g in s["absent_grades"])
            out.append(f"{split}: no images of grade {names}")
    return out


def balance_chart(stats: dict) -> Figure:
    """The class-balance chart of :func:`dataset_stats`' result: report's :func:`balance_figure`."""
    from retinocli.reporting.figures import balance_figure

    counts = {split: s["counts"] for split, s in stats["splits"].items() if s["labelled"]}
    return balance_figure(counts or {"all": stats["overall"]["counts"]},
                          f"{Path(stats['root']).name} ({stats['layout']} layout)")


def plot_balance(stats: dict, out: str | Path) -> Path:
    """Save :func:`balance_chart` as a PNG (``retino stats --plot``)."""
    from retinocli.reporting.figures import DPI

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    balance_chart(stats).savefig(out, dpi=DPI)
    return out


def run_stats(data: str | Path, config: StatsConfig | None = None, *, events: EventsLike = None,
              **options) -> dict:
    """``retino stats``: the dataset read, :func:`dataset_stats` with its :func:`warnings` under
    ``"warnings"``, and the balance chart written where ``config.plot`` says (its path under
    ``"plot"``). ``options`` make a :class:`retinocli.config.StatsConfig` when ``config`` is None.

    Raises:
        RetinoError: an unreadable dataset, or ``plot`` exists without ``force``.
    """
    from retinocli.data.layouts import load_dataset

    cfg = config_of(StatsConfig, config, options)
    if cfg.plot is not None and Path(cfg.plot).exists() and not cfg.force:
        raise RetinoError(f"{cfg.plot} already exists; pass --force to overwrite it")
    ds = load_dataset(data, layout=cfg.layout, images=cfg.images, csv=cfg.csv, image_col=cfg.image_col,
                      label_col=cfg.label_col)
    result = dataset_stats(ds, sample=None if cfg.full else cfg.sample, seed=cfg.seed, events=events)
    result["warnings"] = warnings(result)
    if cfg.plot is not None:
        result["plot"] = str(plot_balance(result, cfg.plot))
    return result
