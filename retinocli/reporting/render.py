"""Rich rendering of results. Takes plain dicts, prints tables; computes nothing itself."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from retinocli import GRADE_NAMES
from retinocli.events import Listener
from retinocli.reporting.numbers import tight_pct


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
        table.add_row(str(g), name, f"{s['counts'][g]:,}", tight_pct(s["shares"][g]), style=style)
    if s["labelled"]:
        ratio = s["imbalance_ratio"]
        absent = f"; grades {s['absent_grades']} absent" if s["absent_grades"] else ""
        table.caption = (f"imbalance {ratio:.1f}:1{absent}.  Bar to clear: always answering grade "
                         f"{s['majority_grade']} ({GRADE_NAMES[s['majority_grade']]}) scores "
                         f"[bold]{tight_pct(s['majority_accuracy'])}[/] accuracy")
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
    """Items per second, the number every long job in retino is judged by.

    A task that carries a ``rate`` field (``retino prepare``'s does) shows that number, the
    one its summary prints; others show rich's estimate over their recent updates.
    """

    def __init__(self, unit: str = "img"):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        rate = task.fields.get("rate")
        speed = rate if rate is not None else (task.finished_speed or task.speed)
        return Text("-" if speed is None else f"{speed:,.1f} {self.unit}/s", style="cyan")


def progress_bar(console: Console, unit: str = "img", *, transient: bool = False) -> Progress | PlainProgress:
    """Progress for a long job: on a terminal a rich bar with count, rate and time left; in a pipe
    (``| tee``, SLURM, CI) plain, complete, flushed lines instead (:class:`PlainProgress`).

    Extra text goes in the ``postfix`` field. A task added with ``line_at_stop=True`` prints its
    plain line at ``stop_task`` (after the caller has put its results in ``postfix``) rather than
    when its count completes.
    """
    if not console.is_terminal:
        return PlainProgress(console, unit)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    _RateColumn(unit), TimeElapsedColumn(), TextColumn("<"), TimeRemainingColumn(),
                    TextColumn("{task.fields[postfix]}"), console=console, transient=transient)


class PlainTask:
    def __init__(self, description: str, total: float | None, completed: float, fields: dict):
        self.description, self.total, self.completed, self.fields = description, total, completed, fields
        self.start = time.perf_counter()
        self.finished_at: float | None = None
        self.done = False  # its final line is printed
        self.last_line = self.start

    @property
    def finished(self) -> bool:
        return self.total is not None and self.completed >= self.total


class PlainProgress:
    """The parts of rich's Progress that retino uses, printing whole lines instead of a live bar.

    A line when a task completes (or at ``stop_task`` for ``line_at_stop`` tasks) and, for long
    tasks, one every ``every`` seconds: a log never stays empty and never holds half a line.
    """

    def __init__(self, console: Console, unit: str = "img", every: float = 30.0):
        self.console, self.unit, self.every = console, unit, every
        self.tasks: list[PlainTask] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        self.tasks.append(PlainTask(description, total, completed, fields))
        return len(self.tasks) - 1

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **fields) -> None:
        task = self.tasks[task_id]
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if description is not None:
            task.description = description
        task.fields.update(fields)
        now = time.perf_counter()
        if task.finished and task.finished_at is None:
            task.finished_at = now
            if not task.fields.get("line_at_stop"):
                self._line(task)
        # a progress line while counting; none once the count is complete, its final line follows
        elif not task.done and not task.finished and now - task.last_line >= self.every:
            self._line(task, partial=True)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def stop_task(self, task_id: int) -> None:
        task = self.tasks[task_id]
        if not task.done:
            task.finished_at = task.finished_at or time.perf_counter()
            self._line(task)

    def _line(self, task: PlainTask, partial: bool = False) -> None:
        end = time.perf_counter() if partial else (task.finished_at or time.perf_counter())
        seconds = end - task.start
        count = f"{task.completed:,.0f}" + (f"/{task.total:,.0f}" if task.total is not None else "")
        speed = task.fields.get("rate") or (task.completed / seconds if seconds > 0 else 0)
        rate = f", {speed:,.1f} {self.unit}/s" if speed and task.completed > 0 else ""
        postfix = task.fields.get("postfix") or ""
        text = f"{task.description}: {count} {self.unit} in {seconds:,.1f} s{rate}" + (f" | {postfix}" if postfix else "")
        task.last_line = time.perf_counter()
        task.done = not partial
        # soft_wrap: a log line is never cut or folded at the console width
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)


class EventBars:
    """Draws :mod:`retinocli.events` from library code: each task on the bar, messages as lines."""

    PREFIX = {"note": "[yellow]note:[/] ", "warning": "[bold yellow]warning:[/] "}

    def __init__(self, bar, console: Console):
        self.bar, self.console = bar, console
        self.ids: dict[str, int] = {}

    def __call__(self, event) -> None:
        if event.kind == "message":
            self.console.print(self.PREFIX.get(event.level, "") + escape(event.text), highlight=False, soft_wrap=True)
            return
        fields = {k: v for k, v in event.fields.items()}
        if event.kind == "started" or event.task not in self.ids:
            fields.setdefault("postfix", "")
            self.ids[event.task] = self.bar.add_task(event.task, total=event.total,
                                                     completed=event.completed or 0, **fields)
            if event.kind == "started":
                return
        task = self.ids[event.task]
        if event.kind == "advanced":
            self.bar.update(task, advance=event.advance or None, completed=event.completed,
                            total=event.total, **fields)
        else:  # finished
            self.bar.update(task, **fields)
            self.bar.stop_task(task)


@contextmanager
def event_bars(console: Console, unit: str = "img", *, transient: bool = False) -> Iterator[EventBars]:
    """A listener for library events, drawn on :func:`progress_bar` for the length of the block."""
    with progress_bar(console, unit, transient=transient) as bar:
        yield EventBars(bar, console)


@contextmanager
def event_stages(console: Console, doing: str) -> Iterator[Listener]:
    """A listener for a job that only says which stage it is in: a spinner on a terminal, one line
    per stage as it starts in a log (``doing: stage``)."""
    if not console.is_terminal:
        yield lambda event: console.print(f"{doing}: {event.text}", markup=False, highlight=False, soft_wrap=True)
        return
    with console.status(doing) as status:
        yield lambda event: status.update(f"{doing}: {event.text}")


def render_training(result, console: Console) -> None:
    """The summary after ``retino train``: last epochs, the best one, and what to run next."""
    console.print(f"Run folder: {result.run_dir}", markup=False, highlight=False, soft_wrap=True)
    table = Table(title=f"{result.epochs_done} epoch(s)", title_justify="left")
    for col in ("epoch", "s", "img/s", "lr", "train loss", "train acc", "val loss", "val acc", "val QWK", "val bal acc"):
        table.add_column(col, justify="right")
    for row in result.history[-10:]:
        best = row["epoch"] == result.best_epoch
        table.add_row(str(row["epoch"]), f"{row['seconds']:.1f}", f"{row['images_per_second']:,.0f}",
                      f"{row['lr']:.2e}", f"{row['train_loss']:.3f}", tight_pct(row["train_accuracy"]),
                      f"{row['val_loss']:.3f}", tight_pct(row["val_accuracy"]), f"{row['val_qwk']:.3f}",
                      tight_pct(row["val_balanced_accuracy"]), style="bold green" if best else "")
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    for warning in result.warnings:
        console.print(f"[bold red]warning:[/] {escape(warning)}", soft_wrap=True)
    colour = "green" if result.stop == "completed" else "yellow"
    console.print(f"[{colour}]{escape(result.stopped)}[/]", soft_wrap=True)
    if result.best_epoch:
        b = result.best_metrics
        console.print(f"best.pt: epoch {result.best_epoch}, val accuracy {tight_pct(b['accuracy'])}, "
                      f"QWK {b['qwk']:.3f}, balanced accuracy {tight_pct(b['balanced_accuracy'])}")


def render_export(result, console: Console) -> None:
    """Where the ONNX file went, its size, and the parity numbers."""
    p = result.parity
    console.print(f"[green]Wrote[/] {result.path} ({result.size_bytes / 1e6:.1f} MB, {result.precision}, "
                  f"opset {result.opset}) in {result.seconds:.1f}s")
    if p.get("checked"):
        console.print(f"parity vs PyTorch on {p['images']} images at batch {' and '.join(map(str, p['batches']))}: "
                      f"max |Δ prob| {p['max_abs_diff_probs']:.2e}, max |Δ logit| {p['max_abs_diff_logits']:.2e}")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")


def render_bench(result, console: Console) -> None:
    """One table per section: images/s and the ratio to each row's baseline."""
    env = result.environment
    console.print(f"[bold]retino bench[/] on {env.get('gpu') or env.get('cpu')} ({env.get('cores')} cores), "
                  f"torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}")
    titles = {"data": "Data pipeline: one worker process, file -> training tensor",
              "train": "Training step (forward + backward + AdamW), synthetic batches on the device",
              "pipeline": "Training step fed by the real input pipeline (loader processes in 'threads')",
              "infer": "Inference"}
    for section, title in titles.items():
        rows = [r for r in result.rows if r.section == section]
        if not rows:
            continue
        table = Table(title=title, title_justify="left")
        for col in ("what", "device", "threads", "batch", "size", "img/s", "vs baseline"):
            table.add_column(col, justify="left" if col in ("what", "device") else "right")
        for r in rows:
            ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
            style = "bold green" if (r.ratio or 0) >= 1.2 else ("red" if r.ratio is not None and r.ratio < 1 else "")
            table.add_row(r.name, r.device, str(r.threads), str(r.batch), str(r.size),
                          f"{r.images_per_second:,.1f}" + (f" ({r.note})" if r.note else ""),
                          f"[{style}]{ratio}[/]" if style else ratio)
        console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")


def render_predict_summary(summary, grade_names: list[str], console: Console) -> None:
    """Predictions per grade, referable count, unreadable files, speed, provider, and where they went.

    Each count is stated once. Paths go on lines of their own, never inside a table, so a
    long one is never wrapped into pieces.
    """
    from rich.markup import escape

    from retinocli.reporting.metrics import REFERABLE_GRADE

    graded = summary.graded
    table = Table(title="predicted grades", title_justify="left")
    table.add_column("grade")
    table.add_column("name")
    table.add_column("images", justify="right")
    table.add_column("share", justify="right")
    for g, (name, n) in enumerate(zip(grade_names, summary.counts)):
        table.add_row(str(g), escape(name), f"{n:,}", f"{n / graded:.1%}" if graded else "-")
    share = f" ({summary.referable / graded:.1%})" if graded else ""
    table.caption = f"referable DR (grade >= {REFERABLE_GRADE}): [bold]{summary.referable:,}[/]{share}"
    table.caption_justify = "left"
    console.print(table)
    from retinocli.reporting.render_evaluate import predict_referral_lines

    for text in predict_referral_lines(summary):
        console.print(text, soft_wrap=True, highlight=False)
    line = f"{summary.total:,} images: {graded:,} graded, {summary.errors:,} unreadable"
    console.print(line + (' (status "error" in the output)' if summary.errors else ""))
    for path, reason in summary.error_examples:
        console.print(f"  {escape(path)}: {escape(reason)}", soft_wrap=True, highlight=False)
    if summary.kept or summary.retried:
        retried = f" ({summary.retried:,} unreadable last time, tried again)" if summary.retried else ""
        console.print(f"this run read {summary.done_now:,}{retried}; {summary.kept:,} graded earlier were kept")
    speed = (f"{summary.seconds:,.2f} s, {summary.images_per_second:,.1f} img/s "
             if summary.images_per_second is not None else "")
    console.print(f"{speed}on [cyan]{summary.provider}[/]")
    if summary.out != "-":
        console.print(f"Predictions: {escape(summary.out)}", soft_wrap=True, highlight=False)
    if summary.patients:
        console.print(f"Patients: {escape(summary.patients['path'])}", soft_wrap=True, highlight=False)
    for note in summary.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True, highlight=False)


# ------------------------------------------------------------------ seeds (#15)
def render_seeds(study, console: Console) -> None:
    """After ``retino train --seeds``: a line per seed, mean ± sd over them, the next commands."""
    from retinocli.reporting.study import METRIC_LABELS, mean_sd

    for r in study.runs:
        best = (f"; best epoch {r.best_epoch}: " + ", ".join(
            f"{METRIC_LABELS[k]} {mean_sd(k, {'mean': r.best[k]})}" for k in ("val_accuracy", "val_qwk")
            if k in r.best)) if r.best_epoch else ""
        stopped = f", {r.stopped}" if r.stopped else ""
        console.print(f"seed {r.seed}: {r.run_dir}: {r.done}{stopped}{best}", markup=False, highlight=False,
                      soft_wrap=True)
    finished = [r for r in study.runs if r.best]
    if study.summary:
        console.print(f"Over {len(finished)} seed(s), mean ± sd: " + ", ".join(
            f"{METRIC_LABELS[k]} {mean_sd(k, study.summary[k])}" for k in ("val_accuracy", "val_qwk")
            if k in study.summary), markup=False, highlight=False, soft_wrap=True)
    if finished and not study.interrupted:
        runs = " ".join(str(r.run_dir) for r in finished)
        console.print(f"Next: for run in {runs}; do retino evaluate $run; done; retino report {runs}",
                      markup=False, highlight=False, soft_wrap=True)


def render_study(st, console: Console) -> None:
    """``retino report``/``compare`` of seeds: a line per recipe (mean ± sd) and per paired comparison."""
    from retinocli.reporting.study import METRIC_LABELS, comparison_line, mean_sd

    for r in st.recipes:
        shown = [k for k in ("qwk", "referable_auc", "val_qwk") if k in r["metrics"]][:2]
        console.print(f"{r['recipe']}: {len(r['runs'])} seed(s), mean ± sd " + ", ".join(
            f"{METRIC_LABELS[k]} {mean_sd(k, r['metrics'][k])}" for k in shown), markup=False, highlight=False,
            soft_wrap=True)
    for c in st.comparisons:
        console.print(comparison_line(c).replace("`", ""), markup=False, highlight=False, soft_wrap=True)
