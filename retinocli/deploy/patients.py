"""``retino predict``'s per-patient file (issue #15): the worse eye decides. No torch.

Where the image names give patients and eyes (Kaggle's ``10_left``), predict writes, after
the per-image output is complete, one row per patient
(:func:`retinocli.reporting.referral.referral_table`): the grade of each eye, the patient's
grade (the worse eye's) and ``referable`` (yes when any eye is referred at the model's frozen
threshold). It is rebuilt from the whole per-image output, rows kept by ``--resume``
included, so an interrupted and resumed run writes the same file as an uninterrupted one.

With ``--fuse-eyes`` each eye's probabilities are first refined with its fellow's by the
fusion model stored with the model; the per-image output stays single-eye (it is streamed
before the fellow eye may have been read).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retinocli.data.layouts import parse_patient_eye
from retinocli.deploy import schema
from retinocli.errors import RetinoError, atomic_write
from retinocli.models.grading import Grader, referable_score

__all__ = ["patients_target", "read_output", "write_patients"]


def patients_target(out: Any, patients: str | Path | None, names: Sequence[str], grader: Grader, *,
                    force: bool, resume: bool, fuse_eyes: bool) -> tuple[Path | None, str | None]:
    """Where the per-patient file goes (or None) and a note; checked before any image is read.

    ``patients`` when given; else ``patients.csv`` beside a file output when some name
    gives a patient and an eye; else (stdout, or no patient in the names) none. A default
    file that exists already (another predict into the same folder) is left alone, with a
    note, unless ``--force`` or ``--resume``.

    Raises:
        RetinoError: ``--fuse-eyes`` without a stored fusion or without eyes in the names,
            or a ``--patients`` file that exists without ``--force``/``--resume``.
    """
    from retinocli.rundir import RunDir

    has_eyes = any(parse_patient_eye(n)[1] is not None for n in names)
    if fuse_eyes:
        if grader.fusion is None:
            raise RetinoError("--fuse-eyes: this model stores no fellow-eye fusion (it is fitted at training "
                              "when the validation names give both eyes, e.g. 10_left and 10_right)")
        if not has_eyes:
            raise RetinoError("--fuse-eyes needs image names that give patient and eye, e.g. 10_left.jpeg")
    if patients is not None:
        target = Path(patients)
    elif hasattr(out, "write") or not has_eyes:
        return None, None
    else:
        target = RunDir(Path(out).parent).patients()
        if target == Path(out):
            target = Path(out).with_name(f"{Path(out).stem}-patients.csv")
    if target.is_dir():
        raise RetinoError(f"{target} is a folder; give a file name for the patients")
    if not hasattr(out, "write") and target.absolute() == Path(out).absolute():
        raise RetinoError(f"--patients {target} is the predictions file itself; name another file")
    if target.exists() and not (force or resume):
        if patients is None:
            return None, f"{target} exists, left as it is: no per-patient file (--patients FILE or --force)"
        raise RetinoError(f"{target} exists; pass --force to overwrite it")
    return target, None


def read_output(path: Path, json_lines: bool) -> list[dict[str, Any]]:
    """The rows of a complete per-image output file (CSV cells as text, JSON values typed)."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        if json_lines:
            return [json.loads(line) for line in fh if line.strip()]
        return list(csv.DictReader(fh))


def write_patients(path: Path, rows: Sequence[dict[str, Any]], grader: Grader, num_grades: int, *,
                   fuse_eyes: bool = False) -> dict[str, Any]:
    """Write the per-patient file from every per-image row; returns counts for the summary.

    Returns:
        ``path``, ``patients`` (rows written), ``referable`` (patients referred),
        ``fused``, ``threshold``.
    """
    import pandas as pd

    from retinocli.reporting.referral import fuse_probs, referral_table

    frame = pd.DataFrame(list(rows), columns=list(schema.columns(num_grades, labelled=False)))
    frame = frame[frame[schema.STATUS] == schema.OK].copy()
    cols = [schema.prob_column(j) for j in range(num_grades)]
    for c in (*cols, schema.PREDICTED_GRADE, schema.REFERABLE_PROB):
        frame[c] = pd.to_numeric(frame[c])
    if fuse_eyes and len(frame):
        probs = fuse_probs(frame[schema.IMAGE].astype(str).tolist(), frame[cols].to_numpy(float), grader)
        frame[cols] = probs
        frame[schema.PREDICTED_GRADE] = probs.argmax(1)
        frame[schema.REFERABLE_PROB] = referable_score(probs)
        frame[schema.REFERABLE] = np.where(grader.referable(probs, fused=True), schema.YES, schema.NO)
    table = referral_table(frame)
    atomic_write(path, table.to_csv(index=False))
    return {"path": str(path), "patients": int(len(table)),
            "referable": int((table[schema.REFERABLE] == schema.YES).sum()), "fused": fuse_eyes,
            "threshold": grader.threshold(fused=fuse_eyes)}
