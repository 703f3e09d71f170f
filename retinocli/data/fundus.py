"""Drawing one procedural fundus photograph: background, vessels and the lesions of a grade.

The anatomy is written once, in canonical coordinates (units of the fundus radius, optic
disc on the left as in a left eye); :class:`Frame` maps them to canvas pixels and mirrors a
right eye. :mod:`retinocli.data.synth` decides which eyes to draw and writes the data set.

numpy and PIL only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Albedo colours (RGB) before illumination; the photo's brightness multiplies them.
VEIN = (112, 22, 18)
ARTERY = (150, 36, 26)
MICROANEURYSM = (118, 10, 10)
HAEMORRHAGE = (100, 12, 10)
PRERETINAL = (88, 8, 8)
EXUDATE = (252, 228, 96)
COTTON_WOOL = (236, 206, 168)
NEW_VESSEL = (178, 22, 30)
DISC_RIM = (250, 206, 128)
DISC_GLOW = (255, 196, 130)
DISC_CUP = (255, 240, 196)


@dataclass(frozen=True)
class Frame:
    """Maps canonical fundus coordinates to canvas pixels.

    Canonical coordinates are in units of the fundus radius, centred on the fundus, y down,
    with the optic disc on the left as in a left eye. Mirroring x gives a right eye, so all
    the anatomy below is written once.
    """

    cx: float
    cy: float
    radius: float
    mirror: bool

    def px(self, x: float | np.ndarray, y: float | np.ndarray) -> tuple:
        """Canvas (x, y) of canonical (x, y); works on floats and on numpy arrays."""
        sx = -x if self.mirror else x
        return self.cx + sx * self.radius, self.cy + y * self.radius


class Tee:
    """Draws each lesion shape on the photo in its colour and on the mask in white."""

    def __init__(self, photo: ImageDraw.ImageDraw, mask: ImageDraw.ImageDraw):
        self.photo, self.mask = photo, mask

    def __getattr__(self, shape: str) -> Callable:
        def both(*args, fill, **kwargs) -> None:
            getattr(self.photo, shape)(*args, fill=fill, **kwargs)
            getattr(self.mask, shape)(*args, fill=255, **kwargs)

        return both


def _grid(frame: Frame, box: tuple[int, int, int, int], x: float, y: float) -> np.ndarray:
    """Squared distance from canonical point (x, y), in radii^2, of each pixel in `box`.

    `box` is (left, top, right, bottom) in canvas pixels; effects that fade out close to
    their centre are computed on a small box only, which keeps a 128 px image at a few ms.
    """
    px, py = frame.px(x, y)
    xs = np.arange(box[0], box[2], dtype=np.float32)
    ys = np.arange(box[1], box[3], dtype=np.float32)
    return ((xs[None, :] - px) ** 2 + (ys[:, None] - py) ** 2) / frame.radius**2


def _box(frame: Frame, side: int, x: float, y: float, reach: float) -> tuple[int, int, int, int]:
    """The canvas box within `reach` radii of canonical point (x, y)."""
    px, py = frame.px(x, y)
    r = reach * frame.radius
    return (
        max(0, int(px - r)),
        max(0, int(py - r)),
        min(side, int(math.ceil(px + r))),
        min(side, int(math.ceil(py + r))),
    )


def _smooth_noise(rng: np.random.Generator, cells: int, side: int) -> np.ndarray:
    """Zero-mean noise varying over about side / cells pixels (choroid, uneven flash)."""
    coarse = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32))
    return np.asarray(coarse.resize((side, side), Image.Resampling.BICUBIC))


def background(
    rng: np.random.Generator,
    patient_rng: np.random.Generator,
    frame: Frame,
    side: int,
    disc: tuple[float, float],
    disc_r: float,
    macula: tuple[float, float],
) -> np.ndarray:
    """The retina's colour with macula and optic disc, before vessels and illumination."""
    # Pigmentation differs between people (lighter orange to darker brown-red).
    base = np.array(
        [patient_rng.uniform(200, 235), patient_rng.uniform(72, 108), patient_rng.uniform(28, 52)],
        dtype=np.float32,
    )
    shade = 1 + 0.05 * _smooth_noise(rng, 7, side) + 0.025 * _smooth_noise(rng, 23, side)
    # The macula is darker because of its pigment, most at the fovea.
    box = _box(frame, side, *macula, reach=0.45)
    d2 = _grid(frame, box, *macula)
    macula_shade = 1 - 0.30 * np.exp(-d2 / (2 * 0.11**2)) - 0.15 * np.exp(-d2 / (2 * 0.03**2))
    shade[box[1] : box[3], box[0] : box[2]] *= macula_shade
    rgb = shade[..., None] * base

    # A bright yellowish disc with a paler cup and a soft glow around it.
    box = _box(frame, side, *disc, reach=3.7 * disc_r)
    d = np.sqrt(_grid(frame, box, *disc)) / disc_r
    rim = np.clip((1.08 - d) / 0.16, 0, 1)[..., None]
    cup = np.clip((0.55 - d) / 0.25, 0, 1)[..., None]
    glow = (0.3 * np.exp(-(d**2) / 3.0))[..., None]
    patch = rgb[box[1] : box[3], box[0] : box[2]]
    for alpha, colour in ((glow, DISC_GLOW), (rim, DISC_RIM), (cup, DISC_CUP)):
        patch = patch * (1 - alpha) + np.array(colour, dtype=np.float32) * alpha
    rgb[box[1] : box[3], box[0] : box[2]] = patch
    return np.clip(rgb, 0, 255).astype(np.uint8)


def illumination(rng: np.random.Generator, frame: Frame, side: int) -> np.ndarray:
    """Flash brightness, vignetting and the black surround outside the fundus circle."""
    r2 = _grid(frame, (0, 0, side, side), 0.0, 0.0)
    brightness = rng.uniform(0.72, 1.05)
    tilt = rng.uniform(-0.08, 0.08, size=2)
    axis = (np.arange(side, dtype=np.float32) - side / 2) / frame.radius
    gradient = 1 + tilt[0] * axis[None, :] + tilt[1] * axis[:, None]
    vignette = 1 - 0.55 * np.clip(r2, 0, 1) ** 1.6
    # One canvas pixel of soft edge keeps the circle's rim anti-aliased.
    inside = np.clip((1 - np.sqrt(r2)) * frame.radius + 0.5, 0, 1)
    return brightness * gradient * vignette * inside


def draw_vessels(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    frame: Frame,
    disc: tuple[float, float],
    canvas: int,
) -> None:
    """The four arcades (veins and arteries in pairs) and small macular branches."""
    vein_w = 0.013 * canvas
    # (start angle in degrees, initial curvature in radians per radius, how fast the bend
    # fades in radii, length in radii, width in canvas pixels, colour). Temporal arcades
    # leave the disc upwards or downwards and bend around the macula; nasal ones and the
    # small macular branches run almost straight.
    arcades = [
        (-80, 3.6, 0.35, 1.15, vein_w, VEIN),
        (-88, 3.4, 0.35, 1.10, 0.75 * vein_w, ARTERY),
        (80, -3.6, 0.35, 1.15, vein_w, VEIN),
        (88, -3.4, 0.35, 1.10, 0.75 * vein_w, ARTERY),
        (-118, -0.50, math.inf, 0.65, 0.85 * vein_w, VEIN),
        (-138, -0.40, math.inf, 0.60, 0.65 * vein_w, ARTERY),
        (118, 0.50, math.inf, 0.65, 0.85 * vein_w, VEIN),
        (138, 0.40, math.inf, 0.60, 0.65 * vein_w, ARTERY),
        (-20, 0.30, math.inf, 0.40, 0.45 * vein_w, ARTERY),
        (20, -0.30, math.inf, 0.40, 0.45 * vein_w, VEIN),
    ]
    for angle, curvature, bend, length, width, colour in arcades:
        start = (disc[0] + rng.normal(0, 0.012), disc[1] + rng.normal(0, 0.012))
        _vessel(
            draw,
            rng,
            frame,
            start,
            math.radians(angle + rng.normal(0, 6)),
            curvature * rng.uniform(0.85, 1.15),
            length * rng.uniform(0.9, 1.1),
            width,
            colour,
            depth=2,
            bend=bend,
        )


def _walk(
    rng: np.random.Generator,
    start: tuple[float, float],
    angle: float,
    curvature: float,
    length: float,
    wiggle: float,
    bend: float = math.inf,
) -> tuple[np.ndarray, np.ndarray]:
    """A smooth curve with random turns; returns points and headings.

    The curvature fades over `bend` radii of length, so an arcade turns near the disc and
    then runs on towards the periphery instead of closing into a circle.
    """
    steps = max(4, int(length * 40))
    step = length / steps
    fade = np.exp(-np.arange(steps) * step / bend)
    headings = angle + np.cumsum(curvature * fade * step + rng.normal(0, wiggle, steps))
    xy = np.empty((steps + 1, 2))
    xy[0] = start
    moves = step * np.stack([np.cos(headings), np.sin(headings)], axis=1)
    xy[1:] = np.asarray(start) + np.cumsum(moves, axis=0)
    return xy, headings


def _polyline(frame: Frame, xy: np.ndarray) -> list[float]:
    """Canonical points as the flat [x0, y0, x1, y1, ...] list that ImageDraw.line takes."""
    return np.column_stack(frame.px(xy[:, 0], xy[:, 1])).ravel().tolist()


def _vessel(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    frame: Frame,
    start: tuple[float, float],
    angle: float,
    curvature: float,
    length: float,
    width: float,
    colour: tuple[int, int, int],
    depth: int,
    bend: float = math.inf,
) -> None:
    """Draw one tapering vessel and, recursively, its branches."""
    xy, headings = _walk(rng, start, angle, curvature, length, wiggle=0.05, bend=bend)
    widths = width * (1 - 0.65 * np.arange(len(xy)) / (len(xy) - 1))
    flat = _polyline(frame, xy)
    # Chunks of a few segments share one width: a smooth taper for few draw calls.
    for i in range(0, len(xy) - 1, 5):
        chunk = flat[2 * i : 2 * i + 12]
        draw.line(chunk, fill=colour, width=max(1, round(widths[i])), joint="curve")
    if depth == 0:
        return
    for _ in range(rng.integers(1, 4) if depth == 2 else rng.integers(0, 3)):
        k = int(rng.integers(len(xy) // 5, len(xy) * 4 // 5))
        side = 1 if rng.random() < 0.5 else -1
        _vessel(
            draw,
            rng,
            frame,
            tuple(xy[k]),
            headings[min(k, len(headings) - 1)] + side * rng.uniform(0.45, 0.95),
            rng.uniform(-1.0, 1.0),
            length * rng.uniform(0.25, 0.5),
            0.7 * widths[k],
            colour,
            depth - 1,
        )


def draw_lesions(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    frame: Frame,
    grade: int,
    canvas: int,
    disc: tuple[float, float],
    disc_r: float,
    macula: tuple[float, float],
) -> None:
    """Draw the lesions that define `grade`.

    Lesion sizes are a fraction of the canvas, exaggerated against real eyes so a dot stays
    at least ~2 px wide after the image is shrunk to 64 px for training.
    """
    if grade == 0:
        return
    pen = _LesionPen(draw, rng, frame, canvas, disc, disc_r)
    # Grade 4 is proliferative disease on top of moderate or severe background changes.
    background = grade if grade < 4 else int(rng.choice((2, 3)))
    # Counts drawn from [low, high): microaneurysms, scattered blots, hard exudates.
    counts = {
        1: ((2, 6), (0, 1), (0, 1)),
        2: ((6, 14), (2, 6), (3, 9)),
        3: ((12, 22), (0, 1), (6, 14)),  # plus the blots in every quadrant below
    }
    microaneurysms, blots, exudate_count = (int(rng.integers(*c)) for c in counts[background])
    if background == 3:
        # Severe, as in the 4-2-1 rule's first arm: many haemorrhages in all four quadrants.
        for quadrant in range(4):
            for _ in range(int(rng.integers(3, 6))):
                pen.blot(pen.spot(quadrant=quadrant))
        for _ in range(int(rng.integers(1, 4))):
            pen.dot(pen.spot(0.6), rng.uniform(0.025, 0.035), COTTON_WOOL)

    for _ in range(microaneurysms):
        pen.dot(pen.spot(0.7), rng.uniform(0.014, 0.02), MICROANEURYSM)
    for _ in range(blots):
        pen.blot(pen.spot())
    pen.exudates(exudate_count, macula)
    if grade == 4:
        pen.proliferative()


class _LesionPen:
    """The lesion shapes of one image, drawn where the retina is (never on the optic disc)."""

    def __init__(self, draw: ImageDraw.ImageDraw, rng: np.random.Generator, frame: Frame, canvas: int,
                 disc: tuple[float, float], disc_r: float):
        self.draw, self.rng, self.frame, self.canvas = draw, rng, frame, canvas
        self.disc, self.disc_r = disc, disc_r

    def spot(self, r_max: float = 0.85, quadrant: int | None = None) -> tuple[float, float]:
        rng = self.rng
        while True:
            if quadrant is None:
                theta = rng.uniform(0, 2 * math.pi)
            else:
                theta = rng.uniform(quadrant * math.pi / 2, (quadrant + 1) * math.pi / 2)
            r = r_max * math.sqrt(rng.uniform(0.01, 1))
            x, y = r * math.cos(theta), r * math.sin(theta)
            if math.hypot(x - self.disc[0], y - self.disc[1]) > 1.6 * self.disc_r:
                return x, y

    def dot(self, xy: tuple[float, float], radius: float, colour: tuple[int, int, int]) -> None:
        cx, cy = self.frame.px(*xy)
        r = radius * self.canvas
        self.draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)

    def blot(self, xy: tuple[float, float]) -> None:
        # A few overlapping ellipses give the irregular outline of a blot haemorrhage.
        rng = self.rng
        radius = rng.uniform(0.024, 0.042)
        spread = 0.35 * radius * self.canvas / self.frame.radius  # lesion sizes are canvas fractions
        for _ in range(int(rng.integers(2, 5))):
            jitter = (rng.normal(0, spread), rng.normal(0, spread))
            part = (xy[0] + jitter[0], xy[1] + jitter[1])
            self.dot(part, radius * rng.uniform(0.55, 0.9), HAEMORRHAGE)

    def exudates(self, count: int, macula: tuple[float, float]) -> None:
        # Hard exudates cluster, often in rings around the macula where fluid leaks.
        rng = self.rng
        while count > 0:
            centre = (macula[0] + rng.normal(0, 0.22), macula[1] + rng.normal(0, 0.22))
            in_cluster = min(count, int(rng.integers(3, 7)))
            for _ in range(in_cluster):
                xy = (centre[0] + rng.normal(0, 0.06), centre[1] + rng.normal(0, 0.06))
                self.dot(xy, rng.uniform(0.014, 0.022), EXUDATE)
            count -= in_cluster

    def proliferative(self) -> None:
        """Grade 4's new vessels (the first tuft usually on the disc) and, half the time, preretinal blood."""
        rng, disc = self.rng, self.disc
        for i in range(int(rng.integers(1, 4))):
            # The first tuft grows from the disc (NVD), later ones elsewhere (NVE).
            if i == 0 and rng.random() < 0.7:
                theta = rng.uniform(0, 2 * math.pi)
                reach = 1.3 * self.disc_r
                centre = (disc[0] + reach * math.cos(theta), disc[1] + reach * math.sin(theta))
            else:
                centre = self.spot(0.75)
            _new_vessels(self.draw, rng, self.frame, centre, self.canvas)
        if rng.random() < 0.5:
            cx, cy = self.frame.px(*self.spot(0.7))
            r = rng.uniform(0.07, 0.11) * self.canvas
            # Preretinal blood settles: a boat shape with a flat upper edge.
            self.draw.chord((cx - r, cy - r * 0.8, cx + r, cy + r * 0.8), 0, 180, fill=PRERETINAL)


def _new_vessels(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    frame: Frame,
    centre: tuple[float, float],
    canvas: int,
) -> None:
    """A tuft of fine, tangled, bright-red new vessels around `centre`."""
    width = max(1, round(0.007 * canvas))
    spread = rng.uniform(0.06, 0.1)
    for _ in range(int(rng.integers(10, 18))):
        start = (centre[0] + rng.normal(0, spread / 2), centre[1] + rng.normal(0, spread / 2))
        angle, curvature = rng.uniform(0, 2 * math.pi), rng.uniform(-25, 25)
        xy, _ = _walk(rng, start, angle, curvature, spread, wiggle=0.6)
        draw.line(_polyline(frame, xy), fill=NEW_VESSEL, width=width, joint="curve")
