"""The frozen operating point, calibration and fellow-eye fusion as evaluate and predict
report them (issue #15). Numpy and pandas; no torch.

Everything here *applies* what training froze on validation (:mod:`retinocli.models.freeze`)
to the split being scored; nothing is re-tuned on it.

* :func:`operating_section`: referable sensitivity and specificity at the frozen threshold,
  with bootstrap intervals, beside the referable ROC AUC.
* :func:`calibration_section`: ECE and NLL before and after the stored temperature, and the
  reliability-diagram data of both.
* :func:`referral_table`: the per-patient file (worse eye decides) with a ``referable``
  column at the frozen threshold, optionally after fellow-eye fusion.
* :func:`fuse_probs`: fused probabilities for rows whose names give patients and eyes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from retinocli.models.grading import Grader, referable_score

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["add_sections", "calibration_section", "fuse_probs", "fusion_for", "headline", "operating_section",
           "referral_table"]

#: Bins of the reliability diagram and of the ECE (Guo et al., 2017, use 15).
ECE_BINS = 15


def operating_section(y: np.ndarray, pred: np.ndarray, score: np.ndarray, grader: Grader, *,
                      fused: bool = False, groups: np.ndarray | None = None, n_boot: int = 1000,
                      seed: int = 0, num_classes: int = 5) -> dict[str, Any]:
    """Referable sensitivity/specificity at the model's frozen threshold on this split.

    Args:
        y, pred: true and predicted grades. score: ``P(grade >= 2)`` per row
            (:func:`retinocli.models.grading.referable_score`; per patient, the worse eye's).
        fused: the scores are after fellow-eye fusion: the fusion's own threshold applies.
        groups: patient ids, resampled as clusters in the intervals; None: rows.
        n_boot: resamples for the intervals (0: estimates only).

    Returns:
        ``threshold``, ``frozen`` (False: the 0.5 default of a model trained before it was
        frozen), ``target_sensitivity`` and the ``validation`` sensitivity/specificity it was
        frozen at, then on this split ``sensitivity``, ``specificity``, ``referable_auc``
        (each ``{"estimate", "low", "high"}``, the interval None when ``n_boot`` is 0) and
        the counts tp, fn, fp, tn.
    """
    from retinocli.reporting import clinical
    from retinocli.reporting.bootstrap import bootstrap_ci
    from retinocli.reporting.metrics import REFERABLE_GRADE, roc_auc

    threshold = grader.threshold(fused=fused)
    frozen = (grader.fusion or {}).get("referral") if fused else grader.referral
    point = clinical.operating_point(y, score, threshold)
    out: dict[str, Any] = {
        "threshold": threshold, "frozen": frozen is not None, "fused": fused,
        "target_sensitivity": (frozen or {}).get("target_sensitivity"),
        "validation": {k: frozen.get(k) for k in ("sensitivity", "specificity", "n")} if frozen else None,
        **{k: point[k] for k in ("tp", "fn", "fp", "tn")},
    }
    names = {"sensitivity": "referable_sensitivity", "specificity": "referable_specificity",
             "referable_auc": "referable_auc"}
    if n_boot:
        ci = bootstrap_ci(y, pred, None, referable_score=score, groups=groups, threshold=threshold,
                          n_boot=n_boot, seed=seed, num_classes=num_classes)
        out.update({k: {f: ci["metrics"][m][f] for f in ("estimate", "low", "high")} for k, m in names.items()})
        out.update(unit=ci["unit"], n_boot=n_boot, seed=seed)
    else:
        auc = float(roc_auc(np.asarray(y) >= REFERABLE_GRADE, score))
        out.update({"sensitivity": {"estimate": point["sensitivity"], "low": None, "high": None},
                    "specificity": {"estimate": point["specificity"], "low": None, "high": None},
                    "referable_auc": {"estimate": auc, "low": None, "high": None}})
    return out


def calibration_section(y: np.ndarray, probs: np.ndarray, grader: Grader) -> dict[str, Any]:
    """ECE and NLL before and after the stored temperature, with reliability data of both.

    ``probs`` are the model's (calibrated) probabilities; "before" undoes the temperature
    exactly (:meth:`Grader.uncalibrate`; with TTA it undoes it on the averaged views).
    """
    from retinocli.reporting.calibration import ece, nll, reliability

    before = grader.uncalibrate(probs)
    after = np.asarray(probs, np.float64)
    return {"temperature": grader.temperature, "fitted": grader.temperature != 1.0,
            "n_bins": ECE_BINS,
            "ece_before": ece(before, y, ECE_BINS), "ece_after": ece(after, y, ECE_BINS),
            "nll_before": nll(before, y), "nll_after": nll(after, y),
            "reliability_before": reliability(before, y, ECE_BINS),
            "reliability_after": reliability(after, y, ECE_BINS)}


def fuse_probs(names: list[str], probs: np.ndarray, grader: Grader) -> np.ndarray:
    """Probabilities after the grader's fellow-eye fusion (:func:`retinocli.reporting.clinical.fuse`).

    ``probs`` are the model's (calibrated) probabilities; the fusion takes them before the
    temperature, as it was fitted (:func:`retinocli.models.freeze.fit_fellow_fusion`).
    Fellows are looked up among ``names`` themselves (``10_left`` with ``10_right``); an
    image without one is fused with ``has_fellow`` 0, as in fitting.
    """
    from retinocli.deploy.schema import prob_column
    from retinocli.models.freeze import predictions_frame
    from retinocli.reporting import clinical

    frame = predictions_frame(names, None, grader.uncalibrate(probs))
    fellow, has = clinical.fellow_probs(frame)
    cols = [prob_column(j) for j in range(probs.shape[1])]
    return clinical.fuse(frame[cols].to_numpy(float), fellow, has, grader.fusion)


def referral_table(frame: pd.DataFrame) -> pd.DataFrame:
    """:func:`retinocli.reporting.clinical.patient_table` plus ``referable`` (yes/no).

    ``frame`` holds each image's ``referable`` decision (yes/no at the frozen threshold,
    :meth:`Grader.referable`); a patient is referable when any of their images is, the
    decision ``predict`` and ``evaluate`` write per image, so the two files never disagree.
    """
    from retinocli.deploy.schema import IMAGE, NO, REFERABLE, YES
    from retinocli.reporting import clinical

    table = clinical.patient_table(frame)
    ok = frame[frame[REFERABLE].isin([YES, NO])]
    patients = clinical.patient_ids(ok[IMAGE].astype(str).tolist())[0]
    referred = set(patients[(ok[REFERABLE] == YES).to_numpy()])
    table[REFERABLE] = np.where(table["patient"].astype(str).isin(referred), YES, NO)
    return table


def add_sections(report: dict[str, Any], frame: pd.DataFrame, grader: Grader, *, y: np.ndarray,
                 probs: np.ndarray, single: np.ndarray, fusion: dict[str, Any] | None,
                 n_boot: int, seed: int, num_classes: int) -> None:
    """evaluate's #15 sections, in place: ``operating_point`` (image level and, where patients
    are known, ``patients.operating_point``), ``calibration`` (of the single-eye
    probabilities) and, with fusion, ``fusion`` (single-eye against fused headline numbers).

    ``frame`` is evaluate's labelled frame of the readable images (with ``referable``);
    ``probs`` the probabilities graded (fused or not), ``single`` those before fusion.
    """
    from retinocli.deploy import schema as s
    from retinocli.reporting import clinical

    fused = fusion is not None
    frame = frame.assign(**{s.REFERABLE_PROB: referable_score(probs)})  # the scores the decisions thresholded
    patients, eyes = clinical.patient_ids(frame[s.IMAGE].astype(str).tolist())
    groups = patients if eyes.astype(bool).any() else None
    pred = frame[s.PREDICTED_GRADE].to_numpy(np.int64)
    common = dict(fused=fused, n_boot=n_boot, seed=seed, num_classes=num_classes)
    report["operating_point"] = operating_section(y, pred, frame[s.REFERABLE_PROB].to_numpy(), grader,
                                                  groups=groups, **common)
    if "patients" in report:
        table = clinical.patient_table(frame)
        report["patients"]["operating_point"] = operating_section(
            table[s.TRUE_GRADE].to_numpy(np.int64), table[s.PREDICTED_GRADE].to_numpy(np.int64),
            table[s.REFERABLE_PROB].to_numpy(float), grader, **common)
    report["calibration"] = calibration_section(y, single, grader)
    if fused:
        report["fusion"] = {**fusion,
                            "single": headline(frame[s.IMAGE].tolist(), y, single, grader.grades(single)),
                            "fused": headline(frame[s.IMAGE].tolist(), y, probs, pred)}


def headline(names: list[str], y: np.ndarray, probs: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """QWK and referable ROC AUC per image and per patient (worse eye): what fusion is judged on."""
    from retinocli.deploy import schema as s
    from retinocli.models.freeze import predictions_frame
    from retinocli.reporting import clinical
    from retinocli.reporting.metrics import REFERABLE_GRADE, quadratic_weighted_kappa, roc_auc

    frame = predictions_frame(names, y, probs).assign(**{s.PREDICTED_GRADE: np.asarray(pred, np.int64)})
    table = clinical.patient_table(frame)
    score = referable_score(probs)
    return {"qwk": float(quadratic_weighted_kappa(y, pred)),
            "referable_auc": float(roc_auc(np.asarray(y) >= REFERABLE_GRADE, score)),
            "patient_qwk": float(quadratic_weighted_kappa(table[s.TRUE_GRADE], table[s.PREDICTED_GRADE])),
            "patient_referable_auc": float(roc_auc(table["true_referable"], table[s.REFERABLE_PROB]))}


def fusion_for(backend, *, split: str, tta: bool, batch_size: int, threads: int | None):
    """The backend's grader with a fellow-eye fusion, and where that fusion came from.

    The fusion stored with the model (fitted on the run's validation split at training) when
    there is one; else one fitted now on the run's validation split (read from its
    split.csv), with a threshold frozen there. Never on the split evaluated.

    Raises:
        RetinoError: ``split`` is ``val`` (the fusion's own data), or no fusion is stored and
            the run's validation split is not here (or gives no fellow eyes) to fit one.
    """
    from dataclasses import replace

    from retinocli.errors import RetinoError
    from retinocli.models.freeze import fit_fellow_fusion
    from retinocli.reporting.clinical import check_fusion
    from retinocli.reporting.evaluate import score_paths, split_records

    if split == "val":
        raise RetinoError("--fuse-eyes: the fellow-eye fusion is fitted on the validation split, so scoring "
                          "it there would be in-sample; evaluate another split (--split test, or --data)")
    grader = backend.grader
    if grader.fusion is not None:
        model = check_fusion(grader.fusion)
        return grader, {"source": "stored with the model", "fitted_on": "the run's val split, at training",
                        "n": model.get("n"), "with_fellow": model.get("with_fellow")}
    try:
        names, paths, grades, source, _ = split_records(backend, data=None, split="val")
    except RetinoError as exc:
        raise RetinoError(f"--fuse-eyes: this model stores no fellow-eye fusion, and none can be fitted "
                          f"now: {exc}") from None
    scored = score_paths(backend, paths, tta=tta, batch_size=batch_size, threads=threads)
    ok = ~np.isnan(scored.probs).any(axis=1)
    target = (grader.referral or {}).get("target_sensitivity", 0.87)
    model = fit_fellow_fusion([n for n, g in zip(names, ok) if g], grades[ok],
                              grader.uncalibrate(scored.probs[ok]), target)
    return replace(grader, fusion=model), {
        "source": "fitted now (not stored)", "fitted_on": f"the run's val split ({source})",
        "n": model["n"], "with_fellow": model["with_fellow"]}
