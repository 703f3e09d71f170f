"""retino: diabetic-retinopathy grading from fundus photographs.

The library is usable without the CLI; heavy modules (torch, onnxruntime) are imported
only by the functions that need them.
"""

__version__ = "0.1.0"

GRADE_NAMES: tuple[str, ...] = ("No DR", "Mild", "Moderate", "Severe", "Proliferative")
NUM_GRADES = len(GRADE_NAMES)

from retinocli.errors import RetinoError  # noqa: E402

__all__ = ["GRADE_NAMES", "NUM_GRADES", "RetinoError", "__version__"]
