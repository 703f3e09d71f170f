"""The ``retino`` command line: parse, build a config, call one library function, render.

One file per group of commands (data, training, evaluation, deploy, speed); ``common`` has the app,
the consoles of this invocation and the error handling. Heavy libraries (pandas, torch,
onnxruntime) are imported inside the commands that need them, so ``retino --help`` starts at
once and ``stats``/``predict`` never load torch.
"""

# importing a group registers its commands, in this order in --help: the journey of an image
from retinocli.cli import data, training, evaluation, deploy, speed  # noqa: F401,I001
from retinocli.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point (also ``python -m retinocli``: usage lines say ``retino`` either way)."""
    app(prog_name="retino")


