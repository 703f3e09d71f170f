"""What training freezes with a model on its validation split (issue #15). No torch.

After each epoch's validation pass, :func:`freeze_grader` fits, in order and on the
validation outputs only:

1. the grader (cut points, regression scale) and the temperature (:func:`fit_grader`);
2. the referral operating point: the highest threshold on ``P(grade >= 2)`` whose
   validation sensitivity reaches ``--target-sensitivity``
   (:func:`retinocli.reporting.clinical.choose_threshold`), moved halfway to the next lower
   validation score so that float noise between training and deployment cannot flip the
   case that sits on it;
3. where the validation image names give patients and eyes (``10_left``), the fellow-eye
   fusion (:func:`retinocli.reporting.clinical.fit_fusion`, on the probabilities before the
   temperature) with its own frozen threshold.

``evaluate`` and ``predict`` only apply what is stored: nothing is re-tuned on the split
they score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from retinocli.errors import RetinoError
from retinocli.models.grading import Grader, fit_grader, referable_score

__all__ = ["fit_fellow_fusion", "fit_referral", "freeze_grader", "predictions_frame"]


def fit_referral(probs: np.ndarray, y: np.ndarray, target_sensitivity: float) -> dict[str, Any]:
    """The frozen operating point on validation probabilities ``probs`` and grades ``y``.

    Returns:
        ``threshold``, ``target_sensitivity``, the validation ``sensitivity``,
        ``specificity`` and counts (tp, fn, fp, tn) at it, ``split: "val"`` and ``n``.

    Raises:
        RetinoError: no referable image in ``y``, or a target outside (0, 1].
    """
    from retinocli.reporting.clinical import choose_threshold, operating_point

    score = referable_score(probs)
    chosen = choose_threshold(y, score, target_sensitivity)
    below = score[score < chosen["threshold"]]
    # halfway to the next lower score: the same cases are referred, with a margin either side
    threshold = (chosen["threshold"] + below.max()) / 2 if below.size else chosen["threshold"]
    point = operating_point(y, score, float(threshold))
    return {**point, "target_sensitivity": float(target_sensitivity), "split": "val", "n": int(len(y))}


def predictions_frame(names: Sequence[str], y: np.ndarray | None, probs: np.ndarray):
    """A predictions frame (:mod:`retinocli.deploy.schema` columns; labelled unless ``y`` is
    None) for :mod:`retinocli.reporting.clinical`."""
    import pandas as pd

    from retinocli.deploy.schema import IMAGE, PREDICTED_GRADE, REFERABLE_PROB, TRUE_GRADE, prob_column

    probs = np.asarray(probs, np.float64)
    frame = pd.DataFrame({IMAGE: [str(n) for n in names]})
    if y is not None:
        frame[TRUE_GRADE] = np.asarray(y, np.int64)
    frame[PREDICTED_GRADE] = probs.argmax(1)
    for j in range(probs.shape[1]):
        frame[prob_column(j)] = probs[:, j]
    frame[REFERABLE_PROB] = referable_score(probs)
    return frame


def fit_fellow_fusion(names: Sequence[str], y: np.ndarray, probs: np.ndarray,
                      target_sensitivity: float) -> dict[str, Any]:
    """The fellow-eye fusion fitted on validation, with its own frozen referral point.

    ``probs`` are the probabilities before the temperature: the fusion's logistic regression
    calibrates its own output, and its L2 penalty would fight the large weights that
    log-probabilities flattened by a large temperature need. The threshold is chosen on the fused validation probabilities, the same data the fusion
    was fitted on (in-sample, as the single-eye threshold is chosen on the data its
    temperature was fitted on).

    Raises:
        RetinoError: no image has its fellow eye among ``names``, a grade is absent, or no
            image is referable.
    """
    from retinocli.reporting.clinical import apply_fusion, fellow_probs, fit_fusion
    from retinocli.deploy.schema import prob_column

    frame = predictions_frame(names, y, probs)
    pairs = int(fellow_probs(frame)[1].sum())
    if not pairs:
        raise RetinoError("cannot fit fellow-eye fusion: no validation image has its fellow eye "
                          "there (names like 10_left and 10_right)")
    model = fit_fusion(frame)
    fused = apply_fusion(frame, model)[[prob_column(j) for j in range(probs.shape[1])]].to_numpy()
    return {**model, "fitted_on": "val", "n": int(len(y)), "with_fellow": pairs,
            "referral": fit_referral(fused, y, target_sensitivity)}


def freeze_grader(head: str, raw: np.ndarray, y: np.ndarray, *, num_grades: int = 5,
                  target_sensitivity: float = 0.87,
                  names: Sequence[str] | None = None) -> tuple[Grader, list[str]]:
    """The grader with everything of this module fitted on validation ``raw`` / ``y``.

    Args:
        names: the validation image names, in the order of ``raw``; None skips fusion.

    Returns:
        The grader and notes on what could not be frozen (e.g. no referable image).
    """
    notes: list[str] = []
    grader = fit_grader(head, raw, y, num_grades, temperature=True)
    from retinocli.reporting.calibration import T_RANGE

    if grader.temperature >= T_RANGE[1] * (1 - 1e-3):
        notes.append(f"the temperature reached its bound ({T_RANGE[1]:g}): the validation probabilities "
                     "carry almost no information about the grade yet")
    probs = grader.probabilities(raw)
    try:
        grader = replace(grader, referral=fit_referral(probs, y, target_sensitivity))
    except RetinoError as exc:
        notes.append(f"no referral threshold frozen: {exc}")
    if names is not None:
        try:
            grader = replace(grader, fusion=fit_fellow_fusion(names, y, grader.uncalibrated(raw),
                                                              target_sensitivity))
        except RetinoError as exc:
            notes.append(f"no fellow-eye fusion stored: {exc}")
    return grader, notes
