"""Procedural fundus-like demo dataset in the Kaggle 2015 EyePACS layout.

Real fundus data sets need a licence and gigabytes of downloads, so `retino synth` draws a
small stand-in that every later command (stats, train, evaluate, export, predict) can run
on in minutes. The pictures imitate what a grader looks at: an orange-red retina on black,
optic disc, macula and vessels, plus the lesions that define each grade (microaneurysms,
blot haemorrhages, hard exudates, neovascularisation). They teach nothing about real eyes.

numpy and PIL only: no torch, so the command starts fast and runs anywhere.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from retinocli import NUM_GRADES
from retinocli.config import SynthConfig, config_of
from retinocli.data.fundus import Frame, Tee, background, draw_lesions, draw_vessels, illumination
from retinocli.errors import RetinoError
from retinocli.events import EventsLike, emitter

# Per-patient base grade, near the Kaggle 2015 training labels (73/7/15/2.5/2 % of images),
# with the rare grades a little more common so a 400-image demo still shows them.
GRADE_PRIOR = (0.73, 0.07, 0.14, 0.03, 0.03)
# How far the fellow eye's grade is from the patient's base grade: 0, 1 or 2 steps.
FELLOW_EYE_SHIFT = {0: 0.75, 1: 0.23, 2: 0.02}
DRAWING = "drawing fundus images"  # the progress task of generate
JPEG_QUALITY = 92
EYES = ("left", "right")
MASKS = "masks"  # masks/<image>.png: where the lesions are, for tests of heatmaps (`--masks`)
# Everything generate() writes; --force deletes these and nothing else.
OWNED = ("trainLabels.csv", "testLabels.csv", "train", "test", MASKS)


@dataclass(frozen=True)
class _Eye:
    """One image to draw: which split, patient and eye it belongs to, and its grade."""

    split: str
    patient: int
    eye: str
    grade: int

    @property
    def name(self) -> str:
        return f"{self.patient}_{self.eye}"


def generate(out: Path, config: SynthConfig | None = None, *, events: EventsLike = None, **options) -> dict:
    """Write a synthetic data set in the Kaggle 2015 EyePACS layout.

    Args:
        out: Folder to write `trainLabels.csv`, `testLabels.csv`, `train/` and `test/` into.
        config: A :class:`retinocli.config.SynthConfig`, or `options`, its fields as keywords:
            n (even, at least 10: every patient has two eyes), size (16 to 2048 px), seed (the
            same seed writes the same bytes), test_fraction (of patients, 0 to 0.9), force
            (replace an earlier data set in `out`; only the files listed in `OWNED` are removed,
            anything else in the folder is kept) and masks (also write `masks/<image>.png` (image names are unique across splits), a
            binary mask (0 or 255) of the pixels a lesion covers, at the image's size; it
            is empty exactly when the image has no lesions (grade 0); the images' bytes
            do not change).
        events: A listener for progress (task "drawing fundus images"), see :mod:`retinocli.events`.

    Returns:
        A summary: `out`, `n`, `size`, `seed`, `patients`, `splits`, which maps each
        split to {grade: image count} for every grade, and `masks` (the folder, or None).

    Raises:
        RetinoError: For bad arguments, or a non-empty `out` without `force`.
    """
    cfg = config_of(SynthConfig, config, options)
    n, size, seed, test_fraction, masks = cfg.n, cfg.size, cfg.seed, cfg.test_fraction, cfg.masks
    out = Path(out)
    _prepare_out(out, cfg.force)

    eyes = _plan(np.random.default_rng(seed), n // 2, test_fraction)
    for split in ("train", "test") + ((MASKS,) if masks else ()):
        (out / split).mkdir(parents=True)
    say = emitter(events)
    say.started(DRAWING, total=len(eyes))
    for eye in eyes:
        image, lesions = _render(eye, size, seed)
        image.save(out / eye.split / f"{eye.name}.jpeg", "JPEG", quality=JPEG_QUALITY)
        if masks:
            lesions.save(out / MASKS / f"{eye.name}.png")
        say.advanced(DRAWING)
    say.finished(DRAWING)

    splits: dict[str, dict[int, int]] = {}
    for split in ("train", "test"):
        rows = [e for e in eyes if e.split == split]
        # Kaggle's CSVs name images without the extension, e.g. "10_left,0".
        with open(out / f"{split}Labels.csv", "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["image", "level"])
            writer.writerows([e.name, e.grade] for e in rows)
        splits[split] = {g: sum(e.grade == g for e in rows) for g in range(NUM_GRADES)}

    return {
        "out": str(out),
        "n": n,
        "size": size,
        "seed": seed,
        "patients": n // 2,
        "splits": splits,
        "masks": str(out / MASKS) if masks else None,
    }


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RetinoError(f"{out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise RetinoError(f"{out} is not empty; use --force to replace a synthetic data set there")
    for name in OWNED:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _plan(rng: np.random.Generator, patients: int, test_fraction: float) -> list[_Eye]:
    """Draw patient ids, the split and both eyes' grades, patients sorted by id."""
    # Gaps between ids, like real data sets where some patients were dropped.
    ids = np.cumsum(rng.integers(1, 4, size=patients))
    base = rng.choice(NUM_GRADES, size=patients, p=GRADE_PRIOR)

    # Split by patient so both eyes of a person land on the same side: no leakage.
    n_test = int(round(test_fraction * patients))
    if test_fraction > 0:
        n_test = min(max(n_test, 1), patients - 1)
    is_test = np.zeros(patients, dtype=bool)
    is_test[rng.permutation(patients)[:n_test]] = True

    # Rare grades could be missing from a small draw, and a model cannot learn a grade it
    # never sees: move grade-0 patients into every grade up to a floor of ~4 % per split.
    for mask in (~is_test, is_test):
        members = np.flatnonzero(mask)
        floor = int(round(0.04 * len(members))) if len(members) >= 10 else 0
        for grade in range(1, NUM_GRADES):
            missing = floor - int(np.sum(base[members] == grade))
            donors = [i for i in rng.permutation(members) if base[i] == 0][: max(missing, 0)]
            base[donors] = grade

    shifts = list(FELLOW_EYE_SHIFT)
    shift_p = list(FELLOW_EYE_SHIFT.values())
    eyes = []
    for i in range(patients):
        fellow_shift = rng.choice(shifts, p=shift_p) * rng.choice((-1, 1))
        fellow = int(np.clip(base[i] + fellow_shift, 0, NUM_GRADES - 1))
        # Which eye carries the base grade is random, so neither side is always worse.
        grades = (int(base[i]), fellow) if rng.random() < 0.5 else (fellow, int(base[i]))
        split = "test" if is_test[i] else "train"
        eyes += [_Eye(split, int(ids[i]), eye, g) for eye, g in zip(EYES, grades)]
    return eyes


def _render(eye: _Eye, size: int, seed: int) -> tuple[Image.Image, Image.Image]:
    """Draw one fundus photograph for `eye` at `size` x `size` pixels, and its lesion mask.

    The mask ("L", 0 or 255) marks every pixel a lesion shape touches, grade 4's new
    vessels included.
    """
    # One generator per image from (seed, patient, eye): an image does not depend on how
    # many were drawn before it. The patient's own generator gives both eyes one pigment.
    patient_rng = np.random.default_rng([seed, eye.patient])
    rng = np.random.default_rng([seed, eye.patient, EYES.index(eye.eye)])
    # Supersample so thin vessels and small dots are anti-aliased after the reduce below.
    ss = 2 if size <= 512 else 1
    side = size * ss
    frame = Frame(
        cx=side / 2 + rng.uniform(-0.02, 0.02) * side,
        cy=side / 2 + rng.uniform(-0.02, 0.02) * side,
        radius=side / 2 * rng.uniform(0.90, 0.95),
        mirror=eye.eye == "right",
    )
    disc = (-0.42 + rng.uniform(-0.04, 0.04), rng.uniform(-0.06, 0.04))
    macula = (0.04 + rng.uniform(-0.04, 0.04), 0.03 + rng.uniform(-0.04, 0.04))
    disc_r = 0.12 * rng.uniform(0.9, 1.1)

    albedo = background(rng, patient_rng, frame, side, disc, disc_r, macula)
    image = Image.fromarray(albedo)
    draw = ImageDraw.Draw(image)
    draw_vessels(draw, rng, frame, disc, side)
    mask = Image.new("L", (side, side))
    draw_lesions(Tee(draw, ImageDraw.Draw(mask)), rng, frame, eye.grade, side, disc, disc_r, macula)

    photo = np.asarray(image, dtype=np.float32) * illumination(rng, frame, side)[..., None]
    # Any coverage of a reduced pixel counts: a 1 px microaneurysm stays in the mask.
    lesions = mask.reduce(ss).point(lambda v: 255 if v else 0)
    return Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).reduce(ss), lesions


