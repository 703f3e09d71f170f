"""Rich rendering of evaluate's frozen operating point, calibration and fellow-eye fusion
(issue #15), and of predict's referral counts. Only the CLI prints what these return."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from retinocli.reporting.render import _interval, _num, _pct

__all__ = ["calibration_line", "fusion_line", "operating_line", "operating_table", "predict_referral_lines"]


def _point_rows(t: Table, op: dict[str, Any], prefix: str = "") -> None:
    for key, label, pct in (("sensitivity", "referable sensitivity", True),
                            ("specificity", "referable specificity", True),
                            ("referable_auc", "referable ROC AUC", False)):
        entry = op[key]
        t.add_row(prefix + label, (_pct if pct else _num)(entry["estimate"]), _interval(entry, pct))


def operating_table(report: dict[str, Any]) -> Table:
    """Sensitivity and specificity at the frozen threshold (never re-tuned), beside the AUC."""
    op = report["operating_point"]
    fused = ", eyes fused" if op["fused"] else ""
    cal = report.get("calibration")
    temp = f", T = {cal['temperature']:.2f}" if cal else ""
    t = Table(title=f"frozen referral: P(grade >= 2) >= {op['threshold']:.3f}{temp}{fused}", title_justify="left")
    for col in ("metric", "value", "95% interval"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    _point_rows(t, op)
    patient_op = (report.get("patients") or {}).get("operating_point")
    if patient_op:
        _point_rows(t, patient_op, "patients: ")
    if cal:
        t.add_row("ECE before temperature", _num(cal["ece_before"]), "")
        t.add_row("ECE after temperature", _num(cal["ece_after"]), "")
    return t


def operating_line(report: dict[str, Any]) -> str:
    """Where the threshold came from (frozen on validation, never re-tuned; or the default)
    and what it referred on the split evaluated."""
    op = report["operating_point"]
    counts = (f"; on the {report['split']} split it referred {op['tp'] + op['fp']:,} of "
              f"{op['tp'] + op['fp'] + op['tn'] + op['fn']:,} images (tp {op['tp']}, fn {op['fn']}, "
              f"fp {op['fp']}, tn {op['tn']})")
    if not op["frozen"]:
        return ("referral threshold not frozen (a model trained before thresholds were frozen, or one whose "
                "validation split lacked referable or non-referable images), default 0.5" + counts)
    val = op["validation"] or {}
    return (f"referral threshold {op['threshold']:.3f} frozen on validation for sensitivity >= "
            f"{op['target_sensitivity']:.2f} (val: sensitivity {_pct(val.get('sensitivity'))}, specificity "
            f"{_pct(val.get('specificity'))}), never re-tuned" + counts)


def calibration_line(cal: dict[str, Any]) -> str:
    """``calibration: temperature 1.37 (fitted on validation); ECE 0.112 -> 0.041 ...``"""
    how = "fitted on validation" if cal["fitted"] else "none stored: T = 1"
    return (f"calibration: temperature {cal['temperature']:.3f} ({how}); expected calibration error "
            f"{_num(cal['ece_before'])} -> {_num(cal['ece_after'])}; NLL {_num(cal['nll_before'])} -> "
            f"{_num(cal['nll_after'])}")


def fusion_line(fusion: dict[str, Any]) -> str:
    """Single-eye against fused headline numbers on the split evaluated."""
    a, b = fusion["single"], fusion["fused"]
    parts = ", ".join(f"{label} {_num(a[k])} -> {_num(b[k])}" for k, label in (
        ("qwk", "QWK"), ("referable_auc", "referable AUC"), ("patient_qwk", "patient QWK"),
        ("patient_referable_auc", "patient referable AUC")))
    return (f"fellow-eye fusion ({fusion['source']}; fitted on {fusion['fitted_on']}, "
            f"{fusion.get('n')} images): {parts}")


def predict_referral_lines(summary) -> list[str]:
    """predict's referral count at the frozen threshold, and the per-patient file."""
    how = "frozen on validation" if summary.frozen else "not frozen: default"
    lines = [f"referable (P(grade >= 2) >= {summary.threshold:.3f}, {how}): {summary.referred:,} of "
             f"{summary.graded:,} images"]
    p = summary.patients
    if p:
        fused = ", eyes fused" if p["fused"] else ""
        lines.append(f"{p['referable']:,} of {p['patients']:,} patients referable{fused}")
    return lines
