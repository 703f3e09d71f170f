"""Bad input for stats, train, evaluate, export and predict (issue #7).

Every command meets a corpus of broken and odd images, spoilt label files and wrong options,
and must do what it defines for each one: skip the file and report it with its reason while
the batch goes on, or stop with one line starting with ``error:`` and exit code 2. Never a
traceback, and nothing written outside the command's output (every call is made from a
working folder inside ``tmp_path``, and the files under ``tmp_path`` and the corpus are
compared before and after).

The tables below are the inventory: each test is parametrized over one of them, and
``CASES`` (command -> [(case, defined behaviour)]) is built from the same tables for
RELIABILITY.md.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import stat
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from retinocli import GRADE_NAMES
from retinocli.cli import app
from builders import build_tiny_onnx
from builders import png_claiming

OK = "ok"
# chmod 000 does not stop root from reading a file: the case cannot be made there.
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# ------------------------------------------------------------------ the inventory

# case -> (file name, what reading it gives: OK or the reason every command reports)
IMAGE_CASES: dict[str, tuple[str, str]] = {
    "truncated-jpeg": ("truncated.jpg", "truncated image"),
    "zero-bytes": ("zero.jpg", "empty file"),
    "text-named-jpg": ("text.jpg", "cannot identify image file"),
    "decompression-bomb-100000x100000": ("bomb.png", "image too large"),
    "unreadable-permissions": ("noperm.jpg", "permission denied"),
    "png-named-jpeg": ("png_named.jpeg", OK),
    "16-bit-png": ("deep16.png", OK),
    "cmyk-jpeg": ("cmyk.jpg", OK),
    "rgba-png": ("rgba.png", OK),
    "palette-png": ("palette.png", OK),
    "grayscale-png": ("grey.png", OK),
    "exif-rotated-jpeg": ("rotated.jpg", OK),
    "name-with-spaces": ("with space.jpg", OK),
    "non-ascii-name": ("ünï 眼.jpg", OK),
}
BROKEN = [c for c, (_, want) in IMAGE_CASES.items() if want != OK and not (AS_ROOT and c == "unreadable-permissions")]
# PIL mode stats must report for the odd ones (the file as stored; every command reads it as RGB)
MODES = {"16-bit-png": "I;16", "cmyk-jpeg": "CMYK", "rgba-png": "RGBA", "palette-png": "P", "grayscale-png": "L"}
LOOP = "symlink-loop"  # a folder link to an ancestor, in every image folder: must terminate

# case -> (what is done to trainLabels.csv of a Kaggle-layout dataset, message of exit 2 or OK)
LABEL_CASES: dict[str, tuple[str, str]] = {
    "bom": ("UTF-8 byte-order mark before the header", OK),
    "extra-empty-columns": ("two empty columns on every line", OK),
    "duplicated-row": ("one row twice", OK),
    "image-not-on-disk": ("a row naming nope_left", OK),
    "missing-image-name": ("a row with a grade and no name", OK),
    "missing-grade": ("a row with a name and no grade", "row(s) have no grade"),
    "grade-5": ("a row with grade 5", "grade(s) are not 0-4"),
    "grade-minus-1": ("a row with grade -1", "grade(s) are not 0-4"),
    "path-escape": ("a row naming ../../etc/passwd", "image name '../../etc/passwd' points outside the images folder"),
    "absolute-path": ("a row naming /etc/passwd", "image name '/etc/passwd' points outside the images folder"),
    "not-a-csv": ("binary bytes", "not a readable CSV file"),
    "course-different-lengths": ("course layout, 6 names in train_img.csv, 5 in train_label.csv",
                                 "train_img.csv lists 6 images but train_label.csv has 5 labels"),
}
ACCEPTED_LABELS = [c for c, (_, want) in LABEL_CASES.items() if want == OK]
REFUSED_LABELS = [c for c, (_, want) in LABEL_CASES.items() if want != OK]

# Options, model files and other arguments: (case, arguments, fragment of the one error line). Tokens in braces
# are paths of the fixtures: {data} a clean dataset, {run} a trained run, {models} and {ckpts}
# broken model files, {work} the working folder.
TRAIN_BASE = ["--data", "{data}", "--img-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0",
              "--stem", "imagenet", "--project", "{work}/runs"]
OPTION_CASES: dict[str, list[tuple[str, list[str], str]]] = {
    "stats": [
        ("sample-negative", ["{data}", "--sample", "-1"], "--sample must be 0 or more, got -1"),
        ("unknown-layout", ["{data}", "--layout", "nonsense"], "unknown layout 'nonsense'"),
        ("no-such-folder", ["{work}/missing"], "no such folder"),
        ("dataset-is-a-file", ["{models}/text.pt"], "is a file, not a dataset folder"),
        ("images-not-a-folder", ["{data}", "--images", "{work}/missing"], "--images: no such folder"),
        ("plot-exists", ["{data}", "--plot", "{models}/text.pt"], "already exists; pass --force"),
    ],
    "train": [
        ("img-size-zero", ["--img-size", "0"], "--img-size must be at least 8; got 0"),
        ("img-size-negative", ["--img-size", "-32"], "--img-size must be at least 8; got -32"),
        ("img-size-7", ["--img-size", "7"], "--img-size must be at least 8; got 7"),
        ("batch-size-zero", ["--batch-size", "0"], "--batch-size must be at least 1; got 0"),
        ("batch-size-negative", ["--batch-size", "-8"], "--batch-size must be at least 1; got -8"),
        ("epochs-zero", ["--epochs", "0"], "--epochs must be at least 1; got 0"),
        ("workers-negative", ["--workers", "-1"], "--workers must be 0 or more; got -1"),
        ("val-fraction-1", ["--val-fraction", "1"], "--val-fraction must be in [0, 1); got 1.0"),
        ("lr-zero", ["--lr", "0"], "--lr must be positive; got 0.0"),
        ("sgd-momentum-negative", ["--optimizer", "sgd", "--momentum", "-1"], "--momentum must be in [0, 1); got -1.0"),
        ("weight-decay-negative", ["--weight-decay", "-1"], "--weight-decay must be 0 or more; got -1.0"),
        ("warmup-negative", ["--warmup-epochs", "-1"], "--warmup-epochs must be 0 or more; got -1.0"),
        ("unknown-arch", ["--arch", "resnet9"], "unknown architecture 'resnet9'; choose from resnet18"),
        ("unknown-arch-vgg16", ["--arch", "vgg16"], "unknown architecture 'vgg16'"),
        ("unknown-device", ["--device", "tpu"], "unknown device 'tpu'"),
        ("decode-gpu-on-the-cpu", ["--decode", "gpu", "--augment-on", "device", "--device", "cpu"],
         "--decode gpu needs a CUDA device"),
        ("unknown-weights-name", ["--weights", "IMAGENET9K"], "resnet18 has no weights 'IMAGENET9K'"),
        ("weights-text-file-pth", ["--weights", "{models}/text.pth"], "not a loadable weights file"),
        ("weights-of-another-arch", ["--arch", "resnet34", "--weights", "{run}/best.pt"],
         "do not fit resnet34"),
        ("name-leaves-project", ["--name", "../escaped"], "--name must be a folder name inside --project"),
        ("name-empty", ["--name", ""], "--name must be a folder name inside --project"),
        ("resume-text-file-pt", ["--resume", "{models}/text.pt"], "refused or unreadable checkpoint"),
        ("resume-folder-without-checkpoint", ["--resume", "{models}/empty-folder"], "no such checkpoint"),
        ("resume-checkpoint-without-optimizer", ["--resume", "{ckpts}/no-optimizer"],
         "cannot resume from it, it lacks optimizer"),
        ("resume-checkpoint-of-another-arch", ["--resume", "{ckpts}/resume-other-arch"],
         "cannot resume, its weights do not fit resnet34"),
        ("resume-checkpoint-with-3-classes", ["--resume", "{ckpts}/resume-3-classes"],
         "cannot resume, its weights do not fit resnet18 with 5 grades"),
        ("resume-from-best-pt", ["--resume", "{run}/best.pt"],
         "best.pt keeps only the model (for evaluate and export): resume from"),
        ("seeds-with-seed", ["--seeds", "0,1", "--seed", "3"], "--seed and --seeds cannot be used together"),
        ("seeds-with-resume", ["--seeds", "0,1", "--resume", "{run}"], "--resume and --seeds cannot be used together"),
        ("seeds-not-integers", ["--seeds", "0,x"], "--seeds takes seeds (integers >= 0) separated by commas"),
        ("seeds-repeated", ["--seeds", "1,2,1"], "--seeds repeats a seed: 1,2,1"),
        ("target-sensitivity-zero", ["--target-sensitivity", "0"], "--target-sensitivity must be in (0, 1]; got 0.0"),
    ],
    "evaluate": [
        ("batch-size-zero", ["{run}", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        ("batch-size-negative", ["{run}", "--batch-size", "-4"], "--batch-size must be >= 1, got -4"),
        ("threads-zero", ["{run}", "--threads", "0"], "--threads must be >= 1, got 0"),
        ("threads-negative", ["{run}", "--threads", "-1"], "--threads must be >= 1, got -1"),
        ("unknown-split", ["{run}", "--split", "holdout"], "--split must be one of train, val, test"),
        ("unknown-device", ["{run}", "--device", "tpu"], "unknown device 'tpu'"),
        ("unknown-provider", ["{models}/ok.onnx", "--provider", "npu"], "unknown provider 'npu'"),
        ("unknown-layout", ["{run}", "--layout", "nonsense"], "unknown layout 'nonsense'"),
        ("outputs-exist", ["{run}", "--out", "{models}/evaluated"], "already exists; pass --force"),
        ("all-test-images-unreadable", ["{run}", "--data", "{broken_data}"],
         "none of the 4 test images could be read"),
        ("checkpoint-text-file-pt", ["{models}/text.pt"], "refused or unreadable checkpoint"),
        ("not-a-run-folder", ["{models}/empty-folder"], "holds no best.pt or last.pt"),
        ("no-such-model", ["{work}/missing.pt"], "no such run or checkpoint"),
        ("checkpoint-of-another-arch", ["{ckpts}/other-arch"], "weights do not fit resnet34 with 5 grades"),
        ("checkpoint-with-3-classes", ["{ckpts}/3-classes"], "weights do not fit resnet18 with 3 grades"),
        ("checkpoint-without-preprocessing", ["{ckpts}/no-preprocess"], "no preprocessing settings inside"),
        ("onnx-text-file", ["{models}/text.onnx"], "is not an ONNX model file"),
        ("onnx-empty-file", ["{models}/empty.onnx"], "empty file, not an ONNX model"),
        ("onnx-without-metadata", ["{models}/no-metadata.onnx"], "has no retino metadata"),
        ("onnx-garbled-grade-names", ["{models}/garbled-names.onnx"], "retino.grade_names is not valid JSON"),
        ("onnx-garbled-preprocess", ["{models}/garbled-preprocess.onnx"],
         "retino.preprocess: preprocess.size must be an integer >= 8, got -4"),
        ("onnx-metadata-format-2", ["{models}/format-2.onnx"], "retino metadata format '2' is not supported"),
        ("onnx-size-unlike-its-graph", ["{models}/size-mismatch.onnx"], "but its metadata asks for [batch, 3, 64, 64]"),
        ("onnx-3-grade-names-5-outputs", ["{models}/three-grades.onnx"],
         "output 'logits' has 5 values, but its metadata asks for 3"),
        ("fuse-eyes-on-the-val-split", ["{run}", "--fuse-eyes", "--split", "val"],
         "the fellow-eye fusion is fitted on the validation split"),
    ],
    "export": [
        ("opset-16", ["{run}", "--opset", "16"], "--opset must be >= 17, got 16"),
        ("opset-zero", ["{run}", "--opset", "0"], "--opset must be >= 17, got 0"),
        ("opset-negative", ["{run}", "--opset", "-1"], "--opset must be >= 17, got -1"),
        ("fp16-and-int8", ["{run}", "--fp16", "--int8"], "--fp16 and --int8 exclude each other"),
        ("calibration-images-zero", ["{run}", "--int8", "--calibration-images", "0"],
         "--calibration-images must be >= 1, got 0"),
        ("calibration-images-negative", ["{run}", "--int8", "--calibration-images", "-5"],
         "--calibration-images must be >= 1, got -5"),
        ("out-not-onnx", ["{run}", "--out", "{work}/model.txt"], "--out must end in .onnx"),
        ("out-exists", ["{run}", "--out", "{models}/ok.onnx"], "already exists; pass --force"),
        ("checkpoint-text-file-pt", ["{models}/text.pt"], "refused or unreadable checkpoint"),
        ("checkpoint-text-file-onnx", ["{models}/text.onnx"], "refused or unreadable checkpoint"),
        ("onnx-model-as-checkpoint", ["{models}/ok.onnx"], "refused or unreadable checkpoint"),
        ("not-a-run-folder", ["{models}/empty-folder"], "holds no best.pt or last.pt"),
        ("no-such-run", ["{work}/missing"], "no such run or checkpoint"),
        ("checkpoint-of-another-arch", ["{ckpts}/other-arch"], "weights do not fit resnet34 with 5 grades"),
        ("checkpoint-with-3-classes", ["{ckpts}/3-classes"], "weights do not fit resnet18 with 3 grades"),
        ("checkpoint-without-preprocessing", ["{ckpts}/no-preprocess"], "no preprocessing settings inside"),
    ],
    "predict": [
        ("batch-size-zero", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        ("batch-size-negative", ["--batch-size", "-4"], "--batch-size must be >= 1, got -4"),
        ("threads-zero", ["--threads", "0"], "threads must be >= 1, got 0"),
        ("threads-negative", ["--threads", "-2"], "threads must be >= 1, got -2"),
        ("unknown-provider", ["--provider", "npu"], "unknown provider 'npu'"),
        ("out-is-a-folder", ["--out", "{work}"], "is a folder; give a file name for the predictions"),
        ("out-exists", ["--out", "{models}/text.pt"], "exists; pass --resume to continue it or --force"),
        ("resume-and-force", ["--resume", "--force"], "--resume keeps the rows in the output and --force"),
        ("resume-stdout", ["--out", "-", "--resume"], "--resume continues an output file, not stdout"),
        ("resume-evaluate-predictions", ["--out", "{models}/evaluate-predictions.csv", "--resume"],
         "is not this model's predictions (unexpected true_grade): `retino evaluate` wrote it"),
        ("resume-old-predictions", ["--out", "{models}/old-predictions.csv", "--resume"],
         "(missing image, predicted_grade, referable; unexpected grade): an older retino wrote it"),
        ("no-such-folder", ["{work}/missing"], "no such folder"),
        ("folder-without-images", ["{models}/empty-folder"], "no images (.jpeg, .jpg"),
        ("file-not-an-image", ["{models}/text.pt"], "is neither a folder nor an image file"),
        ("model-text-file-onnx", ["--model", "{models}/text.onnx"], "is not an ONNX model file"),
        ("model-text-file-pt", ["--model", "{models}/text.pt"], "is not an ONNX model file"),
        ("model-empty-file", ["--model", "{models}/empty.onnx"], "empty file, not an ONNX model"),
        ("model-missing", ["--model", "{work}/missing.onnx"], "file not found"),
        ("model-is-a-folder", ["--model", "{models}/empty-folder"], "is a folder, not an ONNX model file"),
        ("onnx-without-metadata", ["--model", "{models}/no-metadata.onnx"], "has no retino metadata"),
        ("onnx-garbled-grade-names", ["--model", "{models}/garbled-names.onnx"],
         "retino.grade_names is not valid JSON"),
        ("onnx-garbled-preprocess", ["--model", "{models}/garbled-preprocess.onnx"],
         "retino.preprocess: preprocess.size must be an integer >= 8, got -4"),
        ("onnx-metadata-format-2", ["--model", "{models}/format-2.onnx"],
         "retino metadata format '2' is not supported"),
        ("onnx-size-unlike-its-graph", ["--model", "{models}/size-mismatch.onnx"],
         "but its metadata asks for [batch, 3, 64, 64]"),
        ("onnx-3-grade-names-5-outputs", ["--model", "{models}/three-grades.onnx"],
         "output 'logits' has 5 values, but its metadata asks for 3"),
        ("fuse-eyes-model-without-fusion", ["--fuse-eyes"], "--fuse-eyes: this model stores no fellow-eye fusion"),
    ],
}


def _image_behaviour(command: str, case: str) -> str:
    want = IMAGE_CASES[case][1]
    if case == "unreadable-permissions" and AS_ROOT:
        if command in PERMISSION_CASES:
            return (f"n/a in-process as root (chmod 000 does not stop root); in a child process run as "
                    f"nobody: {PERMISSION_CASES[command]['file']}")
        return "n/a: the tests run as root, which chmod 000 does not stop (not faked)"
    if want == OK:
        return {"stats": "works: readable, counted under its format and mode",
                "train": "works: decoded to RGB and trained on",
                "evaluate": "works: status ok, in the metrics",
                "predict": "works: status ok, graded"}[command]
    return {"stats": f"skip-and-report: in files.unreadable with reason '{want}'",
            "train": f"skip-and-report: skipped ('{want}'), counted in 'N image(s) per epoch could not be read'",
            "evaluate": f"skip-and-report: status error '{want}', left out of the metrics (n_unreadable)",
            "predict": f"skip-and-report: status error '{want}'"}[command]


_LABEL_ACCEPTED = {
    "bom": "accepted: read as if absent",
    "extra-empty-columns": "accepted: empty columns dropped",
    "duplicated-row": {"stats": "accepted: reported as a duplicate row", "train": "accepted: trained on as listed",
                       "evaluate": "accepted: scored as listed (twice)"},
    "image-not-on-disk": {"stats": "accepted: counted and listed as missing",
                          "train": "accepted: skipped with a note 'listed image(s) missing on disk'",
                          "evaluate": "accepted: left out, counted in n_missing with a note"},
}
_LABEL_ACCEPTED["missing-image-name"] = _LABEL_ACCEPTED["image-not-on-disk"]
_LOOP_BEHAVIOUR = {"stats": "terminates: folders layout walk does not follow it; each image once",
                   "train": "terminates: the images folder is listed without recursion",
                   "evaluate": "terminates: folders layout walk does not follow it; each image once",
                   "predict": "terminates: every real folder scanned once; each image once"}


# Permissions need a user they stop: as root, checked by a child process that drops to nobody.
PERMISSION_CASES = {
    "stats": {"file": "skip-and-report: in files.unreadable with reason 'permission denied'",
              "folder": "error (exit 2): 'cannot read <folder>: Permission denied'"},
    "predict": {"file": "skip-and-report: status error 'permission denied'",
                "folder": "error (exit 2): 'cannot read folder <folder>: Permission denied'"},
}


def _inventory() -> dict[str, list[tuple[str, str]]]:
    cases: dict[str, list[tuple[str, str]]] = {}
    for command in ("stats", "train", "evaluate", "export", "predict"):
        rows = []
        if command != "export":
            rows += [(f"image: {c}", _image_behaviour(command, c)) for c in IMAGE_CASES]
            rows.append((f"image: {LOOP}", _LOOP_BEHAVIOUR[command]))
            if command in PERMISSION_CASES:
                rows.append(("image: folder-without-permission", PERMISSION_CASES[command]["folder"]))
        if command in ("stats", "train", "evaluate"):
            for case, (_, want) in LABEL_CASES.items():
                if want != OK:
                    rows.append((f"labels: {case}", f"error (exit 2): '{want}'"))
                else:
                    told = _LABEL_ACCEPTED[case]
                    rows.append((f"labels: {case}", told if isinstance(told, str) else told[command]))
        if command == "export":
            rows.append(("run: training images unreadable", "works: parity checked on random pixels instead"))
        if command == "predict":
            rows.append(("argument: --strict with a broken file", "exit 1 after writing every row (the error row too)"))
        rows += [(f"argument: {c}", f"error (exit 2): '{msg}'") for c, _, msg in OPTION_CASES[command]]
        cases[command] = rows
    return cases


#: command -> [(case, defined behaviour)]: the inventory RELIABILITY.md is written from.
CASES: dict[str, list[tuple[str, str]]] = _inventory()

# ------------------------------------------------------------------ running the CLI

runner = CliRunner()


def _tree(roots) -> dict[str, tuple]:
    """Every entry under ``roots`` (links not followed: the corpus holds a loop) -> kind, size, mtime."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                kind = stat.S_IFMT(st.st_mode)
                out[path] = (kind,) if stat.S_ISDIR(st.st_mode) else (kind, st.st_size, st.st_mtime_ns)
    return out


def invoke(args: list, roots, allowed=()) -> object:
    """Run ``retino ARGS`` in-process; no traceback, and nothing written outside ``allowed``."""
    before = _tree(roots)
    result = runner.invoke(app, [str(a) for a in args])
    after = _tree(roots)
    exc = result.exception
    assert exc is None or isinstance(exc, SystemExit), "".join(traceback.format_exception(exc))
    assert "Traceback" not in result.output
    changed = {p for p in after if before.get(p) != after[p]} | {p for p in before if p not in after}
    inside = tuple(str(a) for a in allowed)
    stray = sorted(p for p in changed if not any(p == a or p.startswith(a + os.sep) for a in inside))
    assert not stray, f"written outside {inside or 'nothing'}: {stray}"
    return result


def assert_refused(result, message: str) -> None:
    """Exit 2 and one line on stderr: ``error: ...message...``."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]


@contextmanager
def deadline(seconds: float):
    """Fail rather than hang: a walk that follows a symlink loop would never end."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: does a symlink loop never end?")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def fill(args, paths: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in paths.items()}) for a in args]


# ------------------------------------------------------------------ the corpus


def fundus(seed: int, *, width: int = 48, height: int = 48) -> Image.Image:
    """A bright noisy disc on black, enough like a fundus for every preprocessing mode."""
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[:height, :width]
    disc = (x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 2.2) ** 2
    colour = np.array([rng.integers(120, 220), rng.integers(40, 120), rng.integers(10, 60)])
    noise = rng.integers(-10, 10, (height, width, 3))
    return Image.fromarray((disc[..., None] * (colour + noise)).clip(0, 255).astype(np.uint8))


def deep16() -> np.ndarray:
    """A 16-bit grey fundus using the full range (its corner pixel is white)."""
    arr = np.asarray(fundus(2).convert("L"), np.uint16) * 257
    arr[0, 0] = 65535
    return arr


def write_images(folder: Path) -> dict[str, Path]:
    """IMAGE_CASES into ``folder`` (plus the loop link) -> case: path."""
    folder.mkdir(parents=True, exist_ok=True)
    fundus(0).save(folder / "whole.jpg", quality=90)
    whole = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    paths = {case: folder / name for case, (name, _) in IMAGE_CASES.items()}
    paths["truncated-jpeg"].write_bytes(whole[: len(whole) // 2])
    paths["zero-bytes"].write_bytes(b"")
    paths["text-named-jpg"].write_text("grade 2, left eye\n")
    png_claiming(paths["decompression-bomb-100000x100000"], 100_000, 100_000)
    fundus(1).save(paths["png-named-jpeg"], format="PNG")
    Image.fromarray(deep16()).save(paths["16-bit-png"])
    fundus(3).convert("CMYK").save(paths["cmyk-jpeg"], quality=95)
    rgba = fundus(4).convert("RGBA")
    rgba.putalpha(200)
    rgba.save(paths["rgba-png"])
    fundus(5).convert("P", palette=Image.Palette.ADAPTIVE).save(paths["palette-png"])
    fundus(6).convert("L").save(paths["grayscale-png"])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64 wide x 48 high, to be shown turned: 48 x 64
    fundus(7, width=64).save(paths["exif-rotated-jpeg"], exif=exif, quality=90)
    fundus(8).save(paths["name-with-spaces"], quality=90)
    fundus(9).save(paths["non-ascii-name"], quality=90)
    if AS_ROOT:
        del paths["unreadable-permissions"]
    else:
        fundus(10).save(paths["unreadable-permissions"])
        paths["unreadable-permissions"].chmod(0)
    (folder / "loop").symlink_to("..", target_is_directory=True)  # its parent: an ancestor
    return paths


def label_line(name: str, grade: int | str) -> str:
    return f"{name},{grade}"


@dataclass
class Corpus:
    root: Path
    clean: Path  # Kaggle layout, 24 good images, nothing wrong
    data: Path  # clean + every image case in train/ and test/ + accepted label spoils in both CSVs
    images: dict[str, dict[str, Path]]  # split -> case -> path in data
    photos: Path  # every image case for predict, with nested/loop -> ..
    photo_paths: dict[str, Path]
    folders: Path  # folders layout, 6 train and 4 test images, with train/2/loop and test/2/loop -> ../..
    broken_data: Path  # clean, with its 4 test images replaced by zero-byte files
    models: Path  # text files named .pt/.onnx/.pth, tiny ONNX graders with spoilt metadata

    def paths(self, **more) -> dict[str, Path]:
        return {"data": self.clean, "models": self.models, "broken_data": self.broken_data, **more}


def spoil_labels(csv_path: Path, cases: list[str]) -> None:
    """Apply the accepted LABEL_CASES to a Kaggle label file: BOM, empty columns, rows."""
    lines = csv_path.read_text().strip().splitlines()
    header, rows = lines[0], lines[1:]
    if "duplicated-row" in cases:
        rows.append(rows[0])
    if "image-not-on-disk" in cases:
        rows.append(label_line("nope_left", 1))
    if "missing-image-name" in cases:
        rows.append(label_line("", 1))
    lines = [header, *rows]
    if "extra-empty-columns" in cases:
        lines = [line + ",," for line in lines]
    csv_path.write_text(("\ufeff" if "bom" in cases else "") + "\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    from retinocli.data.synth import generate

    root = tmp_path_factory.mktemp("bad-input")
    clean = root / "clean"
    generate(clean, n=24, size=48, seed=0)

    data = root / "data"
    shutil.copytree(clean, data)
    images = {}
    for split in ("train", "test"):
        images[split] = write_images(data / split)
        with open(data / f"{split}Labels.csv", "a") as fh:
            for k, path in enumerate(images[split].values()):
                fh.write(label_line(path.stem, k % 5) + "\n")
        spoil_labels(data / f"{split}Labels.csv", ACCEPTED_LABELS)

    photos = root / "photos"
    photo_paths = write_images(photos / "nested")
    for name in sorted(os.listdir(clean / "test"))[:2]:
        shutil.copy(clean / "test" / name, photos / name)

    folders = root / "folders"
    for split in ("train", "test"):
        for k, name in enumerate(sorted(os.listdir(clean / split))[:6]):
            target = folders / split / ("0" if k % 2 else "2")
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(clean / split / name, target / name)
        (folders / split / "2" / "loop").symlink_to("../..", target_is_directory=True)

    broken = root / "broken"
    shutil.copytree(clean, broken)
    for path in (broken / "test").iterdir():
        path.write_bytes(b"")

    models = root / "models"
    (models / "empty-folder").mkdir(parents=True)
    for name in ("text.pt", "text.onnx", "text.pth"):
        (models / name).write_text("this is not a model\n")
    (models / "empty.onnx").write_bytes(b"")
    build_tiny_onnx(models / "ok.onnx")
    build_tiny_onnx(models / "no-metadata.onnx", info=False)
    build_tiny_onnx(models / "three-grades.onnx", info={"grade_names": ["none", "some", "much"]})
    spoilt = {"garbled-names.onnx": {"retino.grade_names": "[\"No DR\", "},
              "garbled-preprocess.onnx": {"retino.preprocess": json.dumps({"size": -4, "mode": "none"})},
              "format-2.onnx": {"retino.format": "2"},
              "size-mismatch.onnx": {"retino.preprocess": json.dumps({"size": 64, "mode": "none"})}}
    for name, change in spoilt.items():
        proto = onnx.load(str(models / "ok.onnx"))
        for prop in proto.metadata_props:
            prop.value = change.get(prop.key, prop.value)
        onnx.save(proto, str(models / name))
    from retinocli.deploy import schema

    ok_probs = [0.5, 0.2, 0.1, 0.1, 0.1]
    with open(models / "evaluate-predictions.csv", "w", newline="") as fh:  # one row, no newline at the end
        writer = schema.RowWriter(fh, schema.EVALUATE_COLUMNS)
        writer.header()
        writer.write([schema.make_row("a", "/x/a.png", ok_probs, GRADE_NAMES, labelled=True, true_grade=1)])
    (models / "evaluate-predictions.csv").write_text((models / "evaluate-predictions.csv").read_text().rstrip("\n"))
    (models / "old-predictions.csv").write_text(  # predict's columns before the one schema
        "path,grade,grade_name,confidence,prob_0,prob_1,prob_2,prob_3,prob_4,referable_prob,status,error\n"
        "/x/a.png,0,No DR,0.5,0.5,0.2,0.1,0.1,0.1,0.3,ok,\n")
    (models / "evaluated").mkdir()
    (models / "evaluated" / "metrics.json").write_text("{}\n")
    return Corpus(root=root, clean=clean, data=data, images=images, photos=photos, photo_paths=photo_paths,
                  folders=folders, broken_data=broken, models=models)


@pytest.fixture(scope="module")
def slim_run(trained_run, tmp_path_factory) -> Path:
    """The trained run without last.pt (best.pt is a third of its bytes), plus spoilt checkpoints.

    ``ckpts/<case>/best.pt`` for evaluate and export, ``ckpts/<case>/last.pt`` for --resume.
    """
    from retinocli.engine.checkpoints import load_checkpoint, save_checkpoint

    root = tmp_path_factory.mktemp("slim")
    run = root / "run"
    run.mkdir()
    for name in ("split.csv", "config.json", "history.csv"):
        shutil.copy(trained_run / name, run / name)
    state = load_checkpoint(trained_run / "best.pt")  # the model only: no optimizer
    save_checkpoint(state, run / "best.pt")
    resumable = {**load_checkpoint(trained_run / "last.pt"), "optimizer": {}}  # complete, an empty optimizer

    cfg = state["config"]
    three = dict(state["model"], **{"fc.weight": state["model"]["fc.weight"][:3],
                                    "fc.bias": state["model"]["fc.bias"][:3]})
    variants = {
        "other-arch/best.pt": {**state, "config": {**cfg, "arch": "resnet34"}},
        "3-classes/best.pt": {**state, "class_names": ["none", "some", "much"]},
        "no-preprocess/best.pt": {k: v for k, v in state.items() if k != "preprocess"},
        "no-optimizer/last.pt": {k: v for k, v in resumable.items() if k != "optimizer"},
        # complete for a resume, with more epochs to go
        "resume-other-arch/last.pt": {**resumable, "config": {**cfg, "arch": "resnet34", "epochs": 99}},
        "resume-3-classes/last.pt": {**resumable, "model": three, "config": {**cfg, "epochs": 99},
                                     "class_names": ["none", "some", "much"]},
    }
    for name, ckpt in variants.items():
        save_checkpoint(ckpt, root / "ckpts" / name)
    return run


@contextmanager
def cwd(folder: Path):
    """Run module-scoped commands from a folder that is snapshotted, like ``work`` for the others."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        yield


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """The working folder every command runs in, so relative default outputs land under tmp_path."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


# ------------------------------------------------------------------ images


@pytest.mark.parametrize("case", [c for c, (_, want) in IMAGE_CASES.items() if want == OK])
def test_odd_images_decode_upright_rgb(corpus, case):
    """What every command's decoder (preprocess.load_image) makes of the files that must work."""
    from retinocli.imaging.preprocess import Preprocess, load_and_prepare, load_image

    path = corpus.images["train"][case]
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.size == ((48, 64) if case == "exif-rotated-jpeg" else (48, 48))
    arr = np.asarray(img)
    if case == "16-bit-png":  # 16 bits scaled to 8, not clipped: the 8-bit source again
        source = (deep16() // 257).astype(np.uint8)
        assert np.array_equal(arr[..., 0], source) and np.array_equal(arr[..., 1], source)
    if case == "rgba-png":  # composited on black with its alpha
        expected = np.rint(np.asarray(fundus(4), np.float64) * 200 / 255)
        assert np.abs(arr - expected).max() <= 1
    assert load_and_prepare(path, Preprocess(size=32, mode="crop")).max() > 40  # the disc, not black


def _skip_if_not_made(case: str) -> None:
    if case == "unreadable-permissions" and AS_ROOT:
        pytest.skip("n/a as root: chmod 000 does not stop root from reading (recorded in CASES)")


# --- stats


@pytest.fixture(scope="module")
def stats_of_corpus(corpus) -> dict:
    with cwd(corpus.root):
        result = invoke(["stats", corpus.data, "--json", "--full"], [corpus.root])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_stats_lists_each_unreadable_image_with_its_reason(corpus, stats_of_corpus, case):
    _skip_if_not_made(case)
    files = stats_of_corpus["files"]
    assert files["checked_scope"] == "all"
    reasons = {u["path"]: u["reason"] for u in files["unreadable"]}
    want = IMAGE_CASES[case][1]
    for split in ("train", "test"):
        path = str(corpus.images[split][case])
        if want == OK:
            assert path not in reasons
        else:
            assert want in reasons[path]
    if case in MODES:
        assert files["modes"][MODES[case]] == 2  # one in each split
    assert len(files["unreadable"]) == 2 * len(BROKEN)


def test_stats_terminates_on_a_symlink_loop(corpus, work):
    with deadline(60):
        result = invoke(["stats", corpus.folders, "--json", "--full"], [corpus.root, work])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["layout"] == "folders"
    assert out["overall"]["images"] == 10 and out["files"]["checked"] == 10  # 6 train + 4 test, once each
    assert out["files"]["unreadable"] == []


# --- train


@pytest.fixture(scope="module")
def trained_on_corpus(corpus) -> tuple:
    """One training run over the corpus: broken images in both splits, spoilt (accepted) labels.

    The batch is larger than the training split, so no image falls into a dropped last batch
    and every unreadable one is met in the epoch.
    """
    project = corpus.root / "train-runs"
    args = ["train", *fill(TRAIN_BASE, {"data": corpus.data, "work": corpus.root}), "--project", project,
            "--batch-size", "64", "--json"]
    with cwd(corpus.root):
        result = invoke(args, [corpus.root], allowed=[project])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    with open(project / "train" / "split.csv", newline="", encoding="utf-8") as fh:
        split = list(csv.DictReader(fh))
    return result, out, split


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_train_skips_and_counts_unreadable_images(corpus, trained_on_corpus, case):
    """The run completes; the dataset turns a broken file into a skipped sample with its reason."""
    from retinocli.engine.dataset import IGNORE, FundusDataset
    from retinocli.imaging.preprocess import Preprocess

    _skip_if_not_made(case)
    result, out, split = trained_on_corpus
    assert out["epochs"] == 1 and out["stopped"] == "completed"
    assert f"{len(BROKEN)} image(s) per epoch could not be read and were skipped" in out["notes"][0]
    path = corpus.images["train"][case]
    assert str(path) in {row["path"] for row in split}  # on disk, so handed to training
    dataset = FundusDataset([str(path)], [3], Preprocess(size=32), "light")
    image, target = dataset[0]
    assert tuple(image.shape) == (3, 32, 32)
    want = IMAGE_CASES[case][1]
    if want == OK:
        assert target == 3 and int(image.max()) > 100 and dataset.failures == []
    else:
        assert target == IGNORE and int(image.max()) == 0
        assert want in dataset.failures[0][1]


# --- evaluate


@pytest.fixture(scope="module")
def evaluated_corpus(corpus, slim_run, tmp_path_factory) -> tuple:
    """evaluate RUN --data corpus: broken test images, spoilt (accepted) test labels."""
    run = Path(shutil.copytree(slim_run, tmp_path_factory.mktemp("eval") / "run"))
    with cwd(run.parent):
        result = invoke(["evaluate", run, "--data", corpus.data, "--split", "test", "--json"],
                        [corpus.root, run.parent],
                        allowed=[run / "metrics.json", run / "predictions.csv", run / "patients.csv"])
    assert result.exit_code == 0, result.output
    with open(run / "predictions.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return result, json.loads((run / "metrics.json").read_text()), rows


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_evaluate_lists_unreadable_images_and_leaves_them_out(corpus, evaluated_corpus, case):
    _skip_if_not_made(case)
    result, report, rows = evaluated_corpus
    listed = 4 + len(IMAGE_CASES) - (1 if AS_ROOT else 0) + 1  # synth test eyes, the corpus, the duplicate
    assert report["n_images"] == len(rows) == listed
    assert report["n_unreadable"] == len(BROKEN)
    assert report["metrics"]["n"] == listed - len(BROKEN)
    assert sum(sum(r) for r in report["metrics"]["confusion_matrix"]) == listed - len(BROKEN)
    by_path = {r["path"]: r for r in rows}
    row = by_path[str(corpus.images["test"][case])]
    want = IMAGE_CASES[case][1]
    if want == OK:
        assert row["status"] == "ok" and row["error"] == ""
        assert abs(sum(float(row[f"prob_{g}"]) for g in range(5)) - 1) < 1e-5
    else:
        assert row["status"] == "error" and want in row["error"]
        assert row["predicted_grade"] == "" and row["prob_0"] == ""


def test_evaluate_terminates_on_a_symlink_loop(corpus, slim_run, work):
    with deadline(60):
        result = invoke(["evaluate", slim_run, "--data", corpus.folders, "--split", "test", "--out", work / "eval"],
                        [corpus.root, slim_run.parent, work], allowed=[work / "eval"])
    assert result.exit_code == 0, result.output
    report = json.loads((work / "eval" / "metrics.json").read_text())
    assert report["n_images"] == 4 and report["n_unreadable"] == 0


# --- predict


@pytest.fixture(scope="module")
def predicted_photos(corpus) -> dict[str, dict]:
    out = corpus.root / "predict-out" / "predictions.csv"
    with cwd(corpus.root), deadline(60):
        result = invoke(["predict", corpus.photos, "--model", corpus.models / "ok.onnx", "--out", out,
                         "--batch-size", "4", "--threads", "2"], [corpus.root], allowed=[out.parent])
    assert result.exit_code == 0, result.output
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths))  # the loop added nothing twice
    return {"rows": {r["path"]: r for r in rows}, "output": result.output}


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_predict_gives_every_file_its_status_and_reason(corpus, predicted_photos, case):
    _skip_if_not_made(case)
    row = predicted_photos["rows"][str(corpus.photo_paths[case])]
    want = IMAGE_CASES[case][1]
    if want == OK:
        assert row["status"] == "ok" and row["error"] == ""
        assert row["predicted_grade"] != "" and abs(sum(float(row[f"prob_{g}"]) for g in range(5)) - 1) < 1e-5
    else:
        assert row["status"] == "error" and want in row["error"]
        assert row["predicted_grade"] == "" and row["prob_0"] == ""
    errors = sum(r["status"] == "error" for r in predicted_photos["rows"].values())
    assert errors == len(BROKEN)
    assert f"{len(BROKEN)} unreadable" in " ".join(predicted_photos["output"].split())


def test_predict_terminates_on_a_symlink_loop(corpus, predicted_photos):
    on_disk = {str(p) for p in corpus.photo_paths.values()} | {str(corpus.photos / n) for n in os.listdir(corpus.photos)
                                                               if n.endswith(".jpeg")}
    assert set(predicted_photos["rows"]) == on_disk
    assert not any("loop" in p for p in predicted_photos["rows"])


def test_predict_strict_exits_1_after_writing_every_row(corpus, work):
    out = work / "one.csv"
    broken = corpus.photo_paths["truncated-jpeg"]
    result = invoke(["predict", broken, "--model", corpus.models / "ok.onnx", "--out", out, "--strict"],
                    [corpus.root, work], allowed=[out])
    assert result.exit_code == 1
    with open(out, newline="", encoding="utf-8") as fh:
        (row,) = csv.DictReader(fh)
    assert row["status"] == "error" and "truncated image" in row["error"]


# --- permissions


PERMISSION_CHILD = """
import json, os, sys
from PIL import Image
from typer.testing import CliRunner
from retinocli.cli import app

base, drop = sys.argv[1], int(sys.argv[2])
runner, model = CliRunner(), f"{base}/model.onnx"
Image.init()  # every lazy import first: after the drop the interpreter's own files are out of reach
for args in (["stats", f"{base}/warm", "--json"],
             ["predict", f"{base}/warm/train", "--model", model, "--out", f"{base}/out/warm.csv"]):
    assert runner.invoke(app, args).exit_code == 0
if drop:
    os.setgroups([])
    os.setgid(drop)
    os.setuid(drop)
results = {}
for case, args in {"stats-file": ["stats", f"{base}/ds", "--json"],
                   "stats-folder": ["stats", f"{base}/ds-closed", "--json"],
                   "predict-file": ["predict", f"{base}/photos", "--model", model, "--out", f"{base}/out/p.csv"],
                   "predict-folder": ["predict", f"{base}/photos-closed", "--model", model,
                                      "--out", f"{base}/out/q.csv"]}.items():
    r = runner.invoke(app, args)
    results[case] = {"exit": r.exit_code, "stdout": r.stdout, "stderr": r.stderr,
                     "exception": None if r.exception is None else type(r.exception).__name__}
results["predictions"] = open(f"{base}/out/p.csv", encoding="utf-8").read()
print(json.dumps(results))
"""


def reachable_by_others() -> str | None:
    """A temporary folder every user can enter: TMPDIR when it and its parents are, else /tmp."""
    import stat
    import tempfile

    for candidate in (tempfile.gettempdir(), "/tmp", "/var/tmp"):
        path = Path(candidate).resolve()
        chain = [path, *path.parents]
        if path.is_dir() and all(p.stat().st_mode & stat.S_IXOTH for p in chain) and \
                path.stat().st_mode & stat.S_IWOTH:
            return str(path)
    return None


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_permissions_for_a_user_they_stop(corpus):
    """chmod 000 on a file, and on a folder, for a user they stop (as root: a child dropped to nobody)."""
    import pwd
    import subprocess
    import sys
    import tempfile

    from retinocli.data.synth import generate

    drop = 0
    if AS_ROOT:
        try:
            drop = pwd.getpwnam("nobody").pw_uid
        except KeyError:
            pytest.skip("running as root and there is no user nobody to drop to")
    root = reachable_by_others() if drop else tempfile.gettempdir()
    if root is None:
        pytest.skip("no temporary folder that user nobody can reach (TMPDIR and /tmp are private)")
    with tempfile.TemporaryDirectory(prefix="retino-perm-", dir=root) as tmp:
        base = Path(tmp)
        generate(base / "warm", n=10, size=32, seed=1)
        shutil.copytree(base / "warm", base / "ds")
        shutil.copy(corpus.images["train"]["name-with-spaces"], base / "ds" / "train" / "noperm.jpg")
        with open(base / "ds" / "trainLabels.csv", "a") as fh:
            fh.write("noperm,1\n")
        shutil.copytree(base / "warm", base / "ds-closed")
        (base / "photos").mkdir()
        shutil.copy(base / "ds" / "train" / "noperm.jpg", base / "photos" / "ok.jpg")
        shutil.copy(base / "ds" / "train" / "noperm.jpg", base / "photos" / "noperm.jpg")
        shutil.copytree(base / "photos", base / "photos-closed" / "closed")
        shutil.copy(corpus.models / "ok.onnx", base / "model.onnx")
        (base / "out").mkdir()
        for path in [base, *base.rglob("*")]:
            path.chmod(0o777 if path == base / "out" else 0o755 if path.is_dir() else 0o644)
        shut = [base / "ds" / "train" / "noperm.jpg", base / "photos" / "noperm.jpg",
                base / "ds-closed" / "train", base / "photos-closed" / "closed"]
        for path in shut:
            path.chmod(0)
        try:
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
            done = subprocess.run([sys.executable, "-c", PERMISSION_CHILD, str(base), str(drop)],
                                  capture_output=True, text=True, env=env, timeout=1800)
        finally:
            for path in shut:
                path.chmod(0o755)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    for case in ("stats-file", "stats-folder", "predict-file", "predict-folder"):
        assert got[case]["exception"] in (None, "SystemExit") and "Traceback" not in got[case]["stderr"], got[case]
    stats = json.loads(got["stats-file"]["stdout"])
    assert got["stats-file"]["exit"] == 0
    assert [(Path(u["path"]).name, u["reason"]) for u in stats["files"]["unreadable"]] == \
        [("noperm.jpg", "permission denied")]
    assert got["stats-folder"]["exit"] == 2
    assert got["stats-folder"]["stderr"].strip() == f"error: cannot read {base}/ds-closed/train: Permission denied"
    assert got["predict-file"]["exit"] == 0
    rows = {Path(r["path"]).name: r for r in csv.DictReader(got["predictions"].splitlines())}
    assert rows["ok.jpg"]["status"] == "ok"
    assert rows["noperm.jpg"]["status"] == "error" and rows["noperm.jpg"]["error"] == "permission denied"
    assert got["predict-folder"]["exit"] == 2
    assert got["predict-folder"]["stderr"].strip() == \
        f"error: cannot read folder {base}/photos-closed/closed: Permission denied"


# --- export


def test_export_when_the_runs_images_are_unreadable(corpus, slim_run, work):
    """Parity needs real images of the run; when none can be read it checks on random pixels."""
    run = Path(shutil.copytree(slim_run, work.parent / "run"))
    with open(run / "split.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(run / "split.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "path": str(corpus.images["train"]["truncated-jpeg"])} for r in rows)
    result = invoke(["export", run, "--json"], [corpus.root, work.parent], allowed=[run / "model.onnx"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["path"] == str(run / "model.onnx") and out["parity"]["max_abs_diff_probs"] < 1e-4


# ------------------------------------------------------------------ label files


def spoilt_dataset(root: Path, clean: Path, case: str) -> Path:
    """A copy of the clean dataset whose label file has LABEL_CASES[case] done to it."""
    if case == "course-different-lengths":
        names = sorted(p.stem for p in (clean / "train").iterdir())[:6]
        (root / "data").mkdir(parents=True)
        for name in names:
            shutil.copy(clean / "train" / f"{name}.jpeg", root / "data")
        (root / "train_img.csv").write_text("\n".join(names) + "\n")
        (root / "train_label.csv").write_text("\n".join(["0", "1", "2", "0", "4"]) + "\n")
        return root
    shutil.copytree(clean, root)
    labels = root / "trainLabels.csv"
    extra = {"missing-grade": label_line("3_left", ""), "grade-5": label_line("3_left", 5),
             "grade-minus-1": label_line("3_left", -1), "path-escape": label_line("../../etc/passwd", 2),
             "absolute-path": label_line("/etc/passwd", 2)}
    if case in extra:
        labels.write_text(labels.read_text() + extra[case] + "\n")
    elif case == "not-a-csv":
        labels.write_bytes(bytes(range(256)) * 4)
    else:
        spoil_labels(labels, [case])
    return root


@pytest.mark.parametrize("case", LABEL_CASES)
def test_stats_label_files(corpus, work, case):
    data = spoilt_dataset(work.parent / "spoilt", corpus.clean, case)
    result = invoke(["stats", data, "--json"], [corpus.root, work.parent])
    want = LABEL_CASES[case][1]
    if want != OK:
        assert_refused(result, want)
        return
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    listed = 24 + (case in ("duplicated-row", "image-not-on-disk", "missing-image-name"))
    assert out["overall"]["images"] == listed
    assert out["splits"]["train"]["labelled"] == listed - 4
    missing = out["files"]["missing"]
    if case in ("image-not-on-disk", "missing-image-name"):
        name = "nope_left" if case == "image-not-on-disk" else ""
        assert missing == 1 and out["files"]["missing_examples"] == [{"split": "train", "image": name}]
    else:
        assert missing == 0
    dups = out["leakage"]["duplicate_rows_within_split"]
    assert dups == (1 if case == "duplicated-row" else 0)
    if case == "duplicated-row":
        first = (corpus.clean / "trainLabels.csv").read_text().splitlines()[1].split(",")[0]
        assert out["leakage"]["duplicate_row_examples"] == [first]


@pytest.mark.parametrize("case", REFUSED_LABELS)
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_spoilt_label_files_are_refused(corpus, slim_run, work, command, case):
    data = spoilt_dataset(work.parent / "spoilt", corpus.clean, case)
    if command == "train":
        args = ["train", *fill(TRAIN_BASE, {"data": data, "work": work})]
    else:
        args = ["evaluate", slim_run, "--data", data, "--split", "train", "--out", work / "eval"]
    result = invoke(args, [corpus.root, slim_run.parent, work.parent])
    assert_refused(result, LABEL_CASES[case][1])


@pytest.mark.parametrize("case", ACCEPTED_LABELS)
def test_train_accepts_label_file_quirks(corpus, trained_on_corpus, case):
    result, out, split = trained_on_corpus
    first = (corpus.clean / "trainLabels.csv").read_text().splitlines()[1].split(",")[0]
    names = [row["image"] for row in split]
    if case in ("bom", "extra-empty-columns"):  # the header was found: every clean row is there
        clean = [line.split(",")[0] for line in (corpus.clean / "trainLabels.csv").read_text().splitlines()[1:]]
        assert set(clean) <= set(names) and set(split[0]) == {"image", "path", "grade", "split", "patient", "eye"}
    if case == "duplicated-row":
        assert names.count(first) == 2
    if case in ("image-not-on-disk", "missing-image-name"):
        assert "nope_left" not in names and "" not in names
        # both label files name the two: training counts over every split it reads
        assert "skipping 4 listed image(s) missing on disk" in " ".join(result.stderr.split())


@pytest.mark.parametrize("case", ACCEPTED_LABELS)
def test_evaluate_accepts_label_file_quirks(corpus, evaluated_corpus, case):
    result, report, rows = evaluated_corpus
    first = (corpus.clean / "testLabels.csv").read_text().splitlines()[1].split(",")[0]
    names = [row["image"] for row in rows]
    if case in ("bom", "extra-empty-columns"):
        clean = [line.split(",")[0] for line in (corpus.clean / "testLabels.csv").read_text().splitlines()[1:]]
        assert set(clean) <= set(names)
    if case == "duplicated-row":
        assert names.count(first) == 2
    if case in ("image-not-on-disk", "missing-image-name"):
        assert "nope_left" not in names and "" not in names
        assert report["n_missing"] == 2


# ------------------------------------------------------------------ options and model files


def _option_cases(command: str):
    return [pytest.param(args, message, id=case) for case, args, message in OPTION_CASES[command]]


@pytest.mark.parametrize("args, message", _option_cases("stats"))
def test_stats_options(corpus, work, args, message):
    result = invoke(["stats", *fill(args, corpus.paths(work=work))], [corpus.root, work])
    assert_refused(result, message)


@pytest.mark.parametrize("args, message", _option_cases("train"))
def test_train_options(corpus, slim_run, work, args, message):
    paths = corpus.paths(work=work, run=slim_run, ckpts=slim_run.parent / "ckpts")
    result = invoke(["train", *fill(TRAIN_BASE + args, paths)], [corpus.root, slim_run.parent, work.parent])
    assert_refused(result, message)


@pytest.mark.parametrize("args, message", _option_cases("evaluate"))
def test_evaluate_options_and_models(corpus, slim_run, work, args, message):
    paths = corpus.paths(work=work, run=slim_run, ckpts=slim_run.parent / "ckpts")
    base = ["--data", "{data}", "--split", "test", "--out", "{work}/eval"]
    result = invoke(["evaluate", *fill(args[:1] + base + args[1:], paths)], [corpus.root, slim_run.parent, work])
    assert_refused(result, message)


@pytest.mark.parametrize("args, message", _option_cases("export"))
def test_export_options_and_checkpoints(corpus, slim_run, work, args, message):
    paths = corpus.paths(work=work, run=slim_run, ckpts=slim_run.parent / "ckpts")
    base = ["--out", "{work}/model.onnx"]
    result = invoke(["export", *fill(args[:1] + base + args[1:], paths)], [corpus.root, slim_run.parent, work])
    assert_refused(result, message)


@pytest.mark.parametrize("args, message", _option_cases("predict"))
def test_predict_options_and_models(corpus, work, args, message):
    folder = [] if args[0].startswith("--") else args[:1]
    base = [*(folder or ["{photos}"]), "--model", "{models}/ok.onnx", "--out", "{work}/predictions.csv"]
    rest = args[len(folder):]
    result = invoke(["predict", *fill(base + rest, corpus.paths(work=work, photos=corpus.photos))],
                    [corpus.root, work])
    assert_refused(result, message)


def test_inventory_is_complete():
    """CASES names every case each command's tests run; RELIABILITY.md is written from it."""
    assert set(CASES) == {"stats", "train", "evaluate", "export", "predict"}
    for command, rows in CASES.items():
        names = [name for name, _ in rows]
        assert len(names) == len(set(names)), command
        assert all(behaviour for _, behaviour in rows)


def test_reliability_md_counts_match_the_cases():
    import re

    text = (Path(__file__).resolve().parents[1] / "RELIABILITY.md").read_text()
    for command, cases in CASES.items():
        row = re.search(rf"^\| {command} \| (\d+) \|", text, flags=re.M)
        assert row and int(row.group(1)) == len(cases), f"RELIABILITY.md summary row for {command}"
        assert f"### {command} ({len(cases)} cases)" in text
        for case, _ in cases:
            assert f"| {case} |" in text, f"{command}: {case} missing from RELIABILITY.md"


def test_a_private_tmpdir_falls_back_to_a_shared_one(tmp_path, monkeypatch):
    """TMPDIR in a mode-700 home folder (clusters): the permission test must not use it for `nobody`."""
    import tempfile

    private = tmp_path / "home" / "tmp"
    private.mkdir(parents=True)
    (tmp_path / "home").chmod(0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    try:
        found = reachable_by_others()
    finally:
        (tmp_path / "home").chmod(0o755)
    assert found != str(private.resolve())
    if found is not None:
        assert all(p.stat().st_mode & stat.S_IXOTH for p in [Path(found), *Path(found).parents])
