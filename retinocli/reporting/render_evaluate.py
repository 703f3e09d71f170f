"""Rich rendering of ``retino evaluate``'s report (confusion table, per-grade and clinical
metrics with intervals, patients, the frozen operating point, calibration and fellow-eye fusion
of issue #15) and of predict's referral counts. Only the CLI prints what these return."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from retinocli.reporting.numbers import MISSING, num, tight_pct

__all__ = ["calibration_line", "confusion_table", "fusion_line", "interval_cell", "operating_line", "operating_table",
           "patient_table", "predict_referral_lines", "render_evaluation"]


def _point_rows(t: Table, op: dict[str, Any], prefix: str = "") -> None:
    for key, label, pct in (("sensitivity", "referable sensitivity", True),
                            ("specificity", "referable specificity", True),
                            ("referable_auc", "referable ROC AUC", False)):
        entry = op[key]
        t.add_row(prefix + label, (tight_pct if pct else num)(entry["estimate"]), interval_cell(entry, pct))


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
        t.add_row("ECE before temperature", num(cal["ece_before"]), "")
        t.add_row("ECE after temperature", num(cal["ece_after"]), "")
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
            f"{op['target_sensitivity']:.2f} (val: sensitivity {tight_pct(val.get('sensitivity'))}, specificity "
            f"{tight_pct(val.get('specificity'))}), never re-tuned" + counts)


def calibration_line(cal: dict[str, Any]) -> str:
    """``calibration: temperature 1.37 (fitted on validation); ECE 0.112 -> 0.041 ...``"""
    how = "fitted on validation" if cal["fitted"] else "none stored: T = 1"
    return (f"calibration: temperature {cal['temperature']:.3f} ({how}); expected calibration error "
            f"{num(cal['ece_before'])} -> {num(cal['ece_after'])}; NLL {num(cal['nll_before'])} -> "
            f"{num(cal['nll_after'])}")


def fusion_line(fusion: dict[str, Any]) -> str:
    """Single-eye against fused headline numbers on the split evaluated."""
    a, b = fusion["single"], fusion["fused"]
    parts = ", ".join(f"{label} {num(a[k])} -> {num(b[k])}" for k, label in (
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


def confusion_table(cm: list[list[int]], names: list[str], title: str) -> Table:
    """True grades as rows, predictions as columns: count and row share, diagonal highlighted."""
    table = Table(title=title, title_justify="left", show_lines=False, padding=(0, 1))
    table.add_column("true \\ predicted", style="bold", no_wrap=True)
    for g, name in enumerate(names):
        table.add_column(f"{g}\n{name}", justify="right", no_wrap=True)
    table.add_column("total", justify="right", style="dim")
    for i, row in enumerate(cm):
        total = sum(row)
        cells = []
        for j, n in enumerate(row):
            share = n / total if total else 0.0
            text = f"{n:,} [dim]{share:.0%}[/]" if total else "0"
            if i == j:
                text = f"[bold green]{n:,}[/] [green]{share:.0%}[/]" if total else "[green]0[/]"
            elif n:
                text = f"[red]{n:,}[/] [dim]{share:.0%}[/]"
            cells.append(text)
        table.add_row(f"{i} {names[i]}", *cells, f"{total:,}")
    return table



def interval_cell(entry: dict | None, pct: bool) -> str:
    """``low–high`` of a bootstrap interval, as percentages or to three decimals."""
    if not entry or entry.get("low") is None or entry["low"] != entry["low"]:  # missing or nan
        return MISSING
    fmt = tight_pct if pct else num
    return f"{fmt(entry['low'])} – {fmt(entry['high'])}"



def patient_table(section: dict) -> Table:
    """The patient-level scores of ``retino evaluate`` (the worse eye decides), with intervals."""
    ci = (section.get("intervals") or {}).get("metrics", {})
    m = section["metrics"]
    t = Table(title=f"patients: {section['n']:,} ({section['with_both_eyes']:,} with both eyes); "
                    f"{section['rule']}", title_justify="left", show_header=bool(ci))
    for col in ("metric", "value", *(("95% interval",) if ci else ())):
        t.add_column(col, justify="left" if col == "metric" else "right")
    rows = (("accuracy", tight_pct(m["accuracy"]), "accuracy", True),
            ("quadratic weighted kappa", num(m["qwk"]), "qwk", False),
            ("referable sensitivity", tight_pct(m["referable"]["sensitivity"]), "referable_sensitivity", True),
            ("referable specificity", tight_pct(m["referable"]["specificity"]), "referable_specificity", True),
            ("referable ROC AUC", num(ci.get("referable_auc", {}).get("estimate")), "referable_auc", False))
    for label, value, key, pct in rows:
        t.add_row(label, value, *((interval_cell(ci.get(key), pct),) if ci else ()))
    return t



def render_evaluation(report: dict, console: Console) -> None:
    """Confusion table, per-grade scores and the summary metrics of ``retino evaluate``."""
    m, names = report["metrics"], report["grade_names"]
    what = f"{report.get('arch') or '?'} · {report.get('weights') or 'scratch'} · {report.get('mode') or '?'}"
    # the model's path on a line of its own: inside a table title rich would fold it at the width
    console.print(f"Model: {report['model']}", markup=False, highlight=False, soft_wrap=True)
    console.print(confusion_table(m["confusion_matrix"], names,
                                  f"{report['split']} split, {m['n']:,} images{', TTA' if report['tta'] else ''}"
                                  f" — {what}"))
    per = Table(title="per grade", title_justify="left")
    for col in ("grade", "precision", "recall", "F1", "support"):
        per.add_column(col, justify="right" if col != "grade" else "left")
    for row in m["per_class"]:
        per.add_row(f"{row['grade']} {row['name']}", tight_pct(row["precision"]), tight_pct(row["recall"]),
                    tight_pct(row["f1"]), f"{row['support']:,}")
    console.print(per)
    ref = m["referable"]
    ci = report.get("intervals")
    summary = Table(title="summary" + (f" (95% intervals: {ci['n_boot']:,} bootstrap resamples of "
                                      f"{ci['unit']}s)" if ci else ""),
                    title_justify="left", show_header=False)
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    if ci:
        summary.add_column("95% interval", justify="right")
    gap = m["accuracy_gap"]
    gap_style = "bold red" if gap < 0.01 else "green"

    def row(label: str, value: str, key: str | None = None, pct: bool = False) -> None:
        cells = [label, value]
        if ci:
            cells.append(interval_cell(ci["metrics"].get(key or ""), pct))
        summary.add_row(*cells)

    row("accuracy", f"[bold]{tight_pct(m['accuracy'])}[/]", "accuracy", True)
    row(f"majority baseline (always grade {m['majority_grade']})", tight_pct(m["majority_accuracy"]))
    row("gap to baseline", f"[{gap_style}]{gap * 100:+.1f} points[/]")
    row("balanced accuracy", tight_pct(m["balanced_accuracy"]), "balanced_accuracy", True)
    row("macro F1", tight_pct(m["macro_f1"]), "macro_f1", True)
    row("quadratic weighted kappa", num(m["qwk"]), "qwk")
    row("referable DR (grade >= 2) sensitivity", tight_pct(ref["sensitivity"]), "referable_sensitivity", True)
    row("referable DR specificity", tight_pct(ref["specificity"]), "referable_specificity", True)
    row("referable DR ROC AUC", num(ref.get("auc")), "referable_auc")
    row("one-vs-rest macro AUC", num(m.get("ovr_macro_auc")), "ovr_macro_auc")
    console.print(summary)
    if report.get("patients"):
        console.print(patient_table(report["patients"]))
    _render_evaluate(report, console)
    if gap < 0.01:
        console.print(f"[bold red]warning:[/] accuracy does not beat answering grade {m['majority_grade']} "
                      f"for every image by 1 point; judge by balanced accuracy, QWK and the confusion table")
    if report["n_unreadable"]:
        console.print(f"[yellow]note:[/] {report['n_unreadable']} unreadable image(s) left out")
    console.print(f"[dim]{report['n_images']:,} images in {report['seconds']:.1f}s "
                  f"({report['images_per_second']:,.1f} img/s) on {report['runtime']}[/]")



def _render_evaluate(report: dict, console: Console) -> None:
    """Issue #15's frozen operating point, calibration and fusion (reporting.render_evaluate)."""
    from retinocli.reporting import render_evaluate as rc

    if report.get("operating_point"):
        console.print(rc.operating_table(report))
        console.print(rc.operating_line(report), soft_wrap=True, highlight=False)
    if report.get("calibration"):
        console.print(rc.calibration_line(report["calibration"]), soft_wrap=True, highlight=False)
    if report.get("fusion"):
        console.print(rc.fusion_line(report["fusion"]), soft_wrap=True, highlight=False)



