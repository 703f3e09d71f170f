"""What every ``retino`` command shares: the app, its consoles, error handling, common options.

Heavy libraries (pandas, torch, onnxruntime) are imported inside the commands that need
them, so ``retino --help`` starts at once and ``stats``/``predict`` never load torch.
"""

from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from retinocli import __version__
from retinocli.errors import RetinoError

PIPE_WIDTH = 200  # a log's line width when COLUMNS does not say: tables keep every column


def make_console(stderr: bool = False) -> Console:
    """A console for this invocation: ``COLUMNS`` wins; in a pipe, wide enough for whole tables."""
    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    width = None if (os.environ.get("COLUMNS") or tty) else PIPE_WIDTH
    return Console(stderr=stderr, width=width)


class RetinoGroup(TyperGroup):
    """Every error the user can cause, usage errors included: one ``error:`` line (and one
    usage hint), exit code 2. Typer would draw usage errors as boxed panels."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Exception as exc:  # click's exceptions, vendored by typer: recognised by shape
            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show()  # bare `retino`: the help, as before
                code = 0
            elif hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
                message = exc.format_message().strip().splitlines()
                err = make_console(stderr=True)
                err.print(f"[bold red]error:[/] {escape(' '.join(m.strip() for m in message if m.strip()))}",
                          highlight=False, soft_wrap=True)
                ctx = getattr(exc, "ctx", None)
                if ctx is not None:
                    err.print(f"usage: {escape(ctx.command_path)} --help", highlight=False, soft_wrap=True)
                code = exc.exit_code
            elif type(exc).__name__ == "Abort":
                make_console(stderr=True).print("[bold red]error:[/] aborted", highlight=False)
                code = 1
            elif isinstance(exc, OSError) and exc.errno == errno.EPIPE:  # `retino ... | head`
                code = 1
            else:
                raise
            if not standalone_mode:
                return code
            sys.exit(code)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="retino",
    help="Diabetic-retinopathy grading from colour fundus photographs: "
         "stats -> train -> evaluate -> report -> export -> predict.",
    cls=RetinoGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = make_console()
err_console = make_console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"retino {__version__}")
        raise typer.Exit(0)


@app.callback()
def _invocation(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print retino's version and exit.")] = False,
) -> None:
    """Runs before every command (the app's help is Typer's ``help=``, not this docstring).

    Consoles per invocation: COLUMNS and whether output is a terminal are read now, not at import.
    """
    global console, err_console
    console, err_console = make_console(), make_console(stderr=True)


@contextmanager
def user_errors():
    """Turn a :class:`RetinoError` into one red line on stderr and exit code 2."""
    try:
        yield
    except RetinoError as exc:
        # escaped: messages quote shapes and file names, and "[batch, 3, 64, 64]" is not markup
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def print_differences(differences: dict[str, dict]) -> None:
    """A line per run naming the settings it does not share with the others."""
    from retinocli.reporting.runs import describe_settings

    if differences:
        console.print("What differs between the runs:")
    for name, settings in differences.items():
        console.print(f"  {escape(name)}: {escape(describe_settings(settings))}", highlight=False, soft_wrap=True)


# Options every command that reads a dataset shares.
LayoutOpt = Annotated[Optional[str], typer.Option(
    "--layout", help="Force a layout: course, kaggle, aptos, idrid, folders, csv, cache (default: detect).")]
ImagesOpt = Annotated[Optional[Path], typer.Option(
    "--images", help="Folder holding the images, when not where the layout expects them.")]
CsvOpt = Annotated[Optional[Path], typer.Option("--csv", help="Any label CSV (csv layout).")]
ImageColOpt = Annotated[Optional[str], typer.Option("--image-col", help="--csv: column of image names.")]
LabelColOpt = Annotated[Optional[str], typer.Option("--label-col", help="--csv: column of grades 0-4.")]


ProviderOpt = Annotated[str, typer.Option(
    help="ONNX models: auto (TensorRT, then CUDA, then CPU), tensorrt, cuda, cpu.")]
