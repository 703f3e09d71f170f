"""Rich rendering of results. Takes plain dicts, prints tables; computes nothing itself."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from retinocli import GRADE_NAMES


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def balance_table(split: str, s: dict) -> Table:
    """Counts and shares per grade for one split, with the majority-grade bar in the caption."""
    table = Table(title=f"{split}: {s['images']:,} images ({s['found']:,} on disk)",
                  title_justify="left", show_footer=True)
    table.add_column("grade", footer="total")
    table.add_column("name")
    table.add_column("images", justify="right", footer=f"{s['labelled']:,}")
    table.add_column("share", justify="right", footer="100%" if s["labelled"] else "-")
    for g, name in enumerate(GRADE_NAMES):
        style = "bold" if g == s["majority_grade"] else ""
        table.add_row(str(g), name, f"{s['counts'][g]:,}", _pct(s["shares"][g]), style=style)
    if s["labelled"]:
        ratio = s["imbalance_ratio"]
        absent = f"; grades {s['absent_grades']} absent" if s["absent_grades"] else ""
        table.caption = (f"imbalance {ratio:.1f}:1{absent}.  Bar to clear: always answering grade "
                         f"{s['majority_grade']} ({GRADE_NAMES[s['majority_grade']]}) scores "
                         f"[bold]{_pct(s['majority_accuracy'])}[/] accuracy")
    else:
        table.caption = "unlabelled"
    table.caption_justify = "left"
    return table


def render_stats(stats: dict, warnings: list[str], console: Console) -> None:
    """Print everything ``retino stats`` found."""
    console.print(f"[bold]{stats['root']}[/]  layout: [cyan]{stats['layout']}[/]")
    for note in stats["notes"]:
        console.print(f"[dim]note:[/] {note}")
    for split, s in stats["splits"].items():
        console.print(balance_table(split, s))

    p = stats["patients"]
    if p["patients"]:
        eyes = ", ".join(f"{k} {v:,}" for k, v in p["eyes"].items()) or "not named"
        console.print(f"Patients: {p['patients']:,} from file names ({p['with_patient_id']:,} images); "
                      f"eyes: {eyes}; {p['patients_with_both_eyes']:,} with both eyes; "
                      f"{p['straddling_splits']:,} in more than one split")
    else:
        console.print("Patients: the file names carry no patient ids (patient leakage cannot be checked)")

    f = stats["files"]
    table = Table(title=f"Files ({f['checked']:,} checked, {f['checked_scope']})", title_justify="left")
    table.add_column("what")
    table.add_column("value")
    table.add_row("missing on disk", f"{f['missing']:,}")
    table.add_row("unreadable", f"{len(f['unreadable']):,}")
    table.add_row("formats", ", ".join(f"{k} {v:,}" for k, v in f["formats"].items()) or "-")
    table.add_row("colour modes", ", ".join(f"{k} {v:,}" for k, v in f["modes"].items()) or "-")
    for key, unit in (("width", "px"), ("height", "px"), ("megabytes", "MB")):
        s = f[key]
        table.add_row(key if key != "megabytes" else "file size",
                      "-" if s is None else f"{s['min']:g} / {s['median']:g} / {s['max']:g} {unit} "
                      "(min / median / max)")
    console.print(table)
    if f["missing_examples"]:
        shown = ", ".join(f"{m['split']}/{m['image']}" for m in f["missing_examples"])
        console.print(f"[dim]missing, e.g.:[/] {shown}")
    for bad in f["unreadable"][:20]:
        console.print(f"[red]unreadable[/] {bad['path']}: {bad['reason']}")

    for line in warnings:
        console.print(f"[bold yellow]warning:[/] {line}")
    if not warnings:
        console.print("[green]No leakage, missing or unreadable files found.[/]")


class _RateColumn(ProgressColumn):
    """Items per second, the number every long job in retino is judged by."""

    def __init__(self, unit: str = "img"):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-" if speed is None else f"{speed:,.1f} {self.unit}/s", style="cyan")


def progress_bar(console: Console, unit: str = "img", *, transient: bool = False) -> Progress:
    """A rich progress bar with count, rate and time left; pass extra fields via ``postfix``."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    _RateColumn(unit), TimeElapsedColumn(), TextColumn("<"), TimeRemainingColumn(),
                    TextColumn("{task.fields[postfix]}"), console=console, transient=transient)


def render_training(result, console: Console) -> None:
    """The summary after ``retino train``: last epochs, the best one, and what to run next."""
    table = Table(title=f"{result.run_dir}: {result.epochs_done} epoch(s)", title_justify="left")
    for col in ("epoch", "s", "img/s", "lr", "train loss", "train acc", "val loss", "val acc", "val QWK", "val bal acc"):
        table.add_column(col, justify="right")
    for row in result.history[-10:]:
        best = row["epoch"] == result.best_epoch
        table.add_row(str(row["epoch"]), f"{row['seconds']:.1f}", f"{row['images_per_second']:,.0f}",
                      f"{row['lr']:.2e}", f"{row['train_loss']:.3f}", _pct(row["train_accuracy"]),
                      f"{row['val_loss']:.3f}", _pct(row["val_accuracy"]), f"{row['val_qwk']:.3f}",
                      _pct(row["val_balanced_accuracy"]), style="bold green" if best else "")
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    colour = "green" if result.stopped == "completed" else "yellow"
    console.print(f"[{colour}]{result.stopped}[/]")
    if result.best_epoch:
        b = result.best_metrics
        console.print(f"best.pt: epoch {result.best_epoch}, val accuracy {_pct(b['accuracy'])}, "
                      f"QWK {b['qwk']:.3f}, balanced accuracy {_pct(b['balanced_accuracy'])}")
