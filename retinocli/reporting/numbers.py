"""How numbers read in report.md, result tables and figure labels: one rule per kind of number,
and the one way a Markdown table is written."""

from __future__ import annotations

import math
from typing import Any

MISSING = "–"  # what a table shows for NaN or a value the run did not record

def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pct(x: Any, sep: str = " ") -> str:
    """0.735 -> ``73.5 %`` (``73.5%`` with ``sep=""``, as terminal tables and figure labels
    print it); NaN or missing -> ``–``."""
    return f"{100 * x:.1f}{sep}%" if finite(x) else MISSING


def tight_pct(x: Any) -> str:
    """0.735 -> ``73.5%``: :func:`pct` for terminal tables and figure labels."""
    return pct(x, sep="")


def num(x: Any, digits: int = 3) -> str:
    """Kappa, AUC, F1: three decimals; NaN or missing -> ``–``."""
    return f"{x:.{digits}f}" if finite(x) else MISSING


def params(n: Any) -> str:
    """11_689_512 -> ``11.7 M``."""
    if not finite(n):
        return MISSING
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(int(n))


def beats_majority(accuracy: float, majority: float) -> bool:
    """At least one percentage point above always answering the commonest grade."""
    return accuracy - majority >= 0.01 - 1e-9


def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table's lines; ``|`` inside a cell is escaped."""
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|")

    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return out
