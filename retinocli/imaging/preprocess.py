"""From a fundus photograph on disk to the uint8 pixels and float tensor a model sees.

numpy and PIL only, no torch: training's data pipeline and the torch-free ONNX predictor
both call `load_and_prepare` and `normalize`, so a model is always served exactly the
pixels it was trained on. The steps, in order:

    load_image    decode safely (bomb guard, EXIF orientation, any mode -> RGB, JPEG draft)
    prepare       "none": squash to size x size; "crop": fundus_bbox -> crop_fundus -> resize;
                  "graham": crop, resize, then the Graham filter
    normalize     uint8 HWC -> float32 CHW, (x / 255 - mean) / std;  to_batch for NCHW
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageChops, ImageFilter, ImageOps, UnidentifiedImageError

from retinocli.errors import RetinoError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

MODES: tuple[str, ...] = ("none", "crop", "graham")
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# Fundus backgrounds are black (0-5 after JPEG); even the dim rim of the retina is > 30 in
# its brightest (red) channel.
BBOX_THRESHOLD = 15
# A row or column belongs to the fundus when more than this fraction of it is bright:
# ignores JPEG noise and small text labels, and trims well under a pixel off a circle's tip.
BBOX_MIN_FRACTION = 0.04
# crop_fundus looks for the box on a copy reduced by long side // this (1 below 1024 px).
_BBOX_WORK_SIZE = 512
# Draft-decode JPEGs to at least this multiple of the target size, to keep resize quality.
_DRAFT_FACTOR = 2
# PIL first reduces by an integer factor while the result stays >= this multiple of the
# output, then resamples: much faster for 4k photos, deterministic, visually the same.
_REDUCING_GAP = 3.0


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input; travels with a model in its checkpoint/ONNX file.

    Attributes:
        size: output side in pixels (square).
        mode: "none" (squash the whole photo), "crop" (crop to the fundus, pad square),
            "graham" (crop, then Ben Graham's local-contrast filter).
        mean: per-channel mean for `normalize`, RGB, on the 0-1 scale.
        std: per-channel std for `normalize`, RGB, all > 0.
        interpolation: PIL resampling filter name, one of INTERPOLATIONS.
    """

    size: int = 512
    mode: str = "none"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 8:
            raise RetinoError(f"preprocess.size must be an integer >= 8, got {self.size!r}")
        if self.mode not in MODES:
            raise RetinoError(
                f"preprocess.mode must be one of {', '.join(MODES)}, got {self.mode!r}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise RetinoError(
                f"preprocess.interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        # Lists from JSON become tuples of floats, so a round trip compares equal.
        object.__setattr__(self, "mean", _three_floats("mean", self.mean))
        object.__setattr__(self, "std", _three_floats("std", self.std))
        if min(self.std) <= 0:
            raise RetinoError(f"preprocess.std must be > 0, got {list(self.std)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """Inverse of `to_dict`; unknown keys are ignored, bad values raise RetinoError."""
        if not isinstance(d, dict):
            raise RetinoError(f"preprocess settings must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _three_floats(name: str, value: Any) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(np.isfinite(out)):
        raise RetinoError(f"preprocess.{name} must be three numbers (R, G, B), got {value!r}")
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- loading


def load_image(
    path: str | Path, *, target: int | None = None, max_pixels: int = 200_000_000
) -> Image.Image:
    """Decode an image file into an upright RGB image, or raise RetinoError saying why not.

    Args:
        path: image file.
        target: the side the caller will resize to. JPEGs at least 4x larger are decoded at
            a reduced DCT scale (`draft`) whose short side stays >= 2 * target.
        max_pixels: refuse files whose header claims more pixels than this, before any
            pixel is decoded. PIL's own guard (2 * Image.MAX_IMAGE_PIXELS, about 179 M)
            also applies and gives the same error.

    Transparent images are composited on black (the colour of a fundus background);
    16-bit and 32-bit grey images are scaled to 8 bits by the bit depth their largest
    value needs (a 12-bit sensor's 4095 becomes 255), not clipped.
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise RetinoError(f"{path}: {'not a file' if path.exists() else 'file not found'}")
        if path.stat().st_size == 0:
            raise RetinoError(f"{path}: empty file")
    except OSError as exc:  # a folder on the way that this user may not enter
        raise RetinoError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        with open(path, "rb") as fh:
            with warnings.catch_warnings():
                # max_pixels below is the guard we honour; PIL's warning threshold is lower.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(fh)
            w, h = im.size
            if w * h > max_pixels:
                raise RetinoError(
                    f"{path}: image too large: {w} x {h} pixels (decompression bomb guard)"
                )
            if target is not None and im.format == "JPEG":
                im.draft("RGB", (_DRAFT_FACTOR * target, _DRAFT_FACTOR * target))
            im.load()
            _exif_transpose(im)
            return _to_rgb(im, path)
    except RetinoError:
        raise
    except UnidentifiedImageError:
        raise RetinoError(f"{path}: cannot identify image file") from None
    except PermissionError:
        raise RetinoError(f"{path}: permission denied") from None
    except Image.DecompressionBombError as exc:
        raise RetinoError(f"{path}: image too large: {exc} (decompression bomb guard)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        # SyntaxError, ValueError, IndexError: what PIL's plugins raise on malformed headers.
        if "truncated" in str(exc).lower():
            raise RetinoError(f"{path}: truncated image") from None
        raise RetinoError(f"{path}: corrupt image ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _exif_transpose(im: Image.Image) -> None:
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except Exception:  # noqa: BLE001
        # Malformed EXIF must not make a decodable photo unreadable: keep it as stored.
        pass


def _to_rgb(im: Image.Image, path: Path) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_scale_to_uint8(np.asarray(im)), "L").convert("RGB")
    if "A" in mode or "a" in mode or "transparency" in im.info:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size)  # black
        out.paste(rgba, mask=rgba)
        return out
    try:
        return im.convert("RGB")
    except ValueError:
        raise RetinoError(f"{path}: unsupported image mode {mode}") from None


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    """Grey values of more than 8 bits -> uint8, by the bit range the largest value needs."""
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(0, None)
        top = float(a.max(initial=0.0))
        full = 1.0 if top <= 1.0 else float(2 ** max(8, int(np.ceil(top)).bit_length()) - 1)
    else:
        a = a.astype(np.int64).clip(0, None)
        full = float(2 ** max(8, int(a.max(initial=0)).bit_length()) - 1)
    return np.rint(a * (255.0 / full)).astype(np.uint8)


# --------------------------------------------------------------------------- fundus crop


def fundus_bbox(
    arr: np.ndarray, threshold: int = BBOX_THRESHOLD, min_fraction: float = BBOX_MIN_FRACTION
) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1), end-exclusive, of the bright fundus on a dark frame.

    Args:
        arr: uint8 image, HW or HWC (then the brightest channel counts).
        threshold: a pixel is bright when its value is above this.
        min_fraction: a row (column) is inside the fundus when more than this fraction of
            its pixels are bright; isolated noise and small labels do not reach it.

    Returns the whole image when no row or column qualifies.
    """
    gray = arr if arr.ndim == 2 else arr.max(axis=2)
    h, w = gray.shape
    bright = gray > threshold
    rows = np.flatnonzero(np.count_nonzero(bright, axis=1) > min_fraction * w)
    cols = np.flatnonzero(np.count_nonzero(bright, axis=0) > min_fraction * h)
    if rows.size == 0 or cols.size == 0:
        return 0, 0, w, h
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop_fundus(img: Image.Image, threshold: int = BBOX_THRESHOLD) -> Image.Image:
    """Crop an RGB image to its fundus and pad it with black to a centred square.

    Kaggle photos often cut the circle at top and bottom; padding instead of stretching
    keeps it round. The box is found on a copy reduced by an integer factor to under
    1024 px, so it is exact to within that factor (9 px on a 4928 px photo).
    """
    w, h = img.size
    factor = max(1, max(w, h) // _BBOX_WORK_SIZE)
    small = img.reduce(factor) if factor > 1 else img
    x0, y0, x1, y1 = fundus_bbox(np.asarray(_brightest_channel(small)), threshold)
    box = (x0 * factor, y0 * factor, min(w, x1 * factor), min(h, y1 * factor))
    if box == (0, 0, w, h) and w == h:
        return img
    cw, ch = box[2] - box[0], box[3] - box[1]
    side = max(cw, ch)
    out = Image.new("RGB", (side, side))
    out.paste(img.crop(box), ((side - cw) // 2, (side - ch) // 2))
    return out


def _brightest_channel(img: Image.Image) -> Image.Image:
    if img.mode != "RGB":
        return img.convert("L")
    r, g, b = img.split()
    return ImageChops.lighter(ImageChops.lighter(r, g), b)


# --------------------------------------------------------------------------- Graham filter


def graham(arr: np.ndarray, size: int) -> np.ndarray:
    """Ben Graham's Kaggle 2015 local-contrast filter on a fundus already cropped to size.

    out = clip(4 * img - 4 * blur(img, sigma=size / 30) + 128), then 0 outside the centred
    circle of radius 0.9 * size / 2, which hides the bright halo the blur leaves at the rim.
    The blur is PIL's ImageFilter.GaussianBlur(radius=sigma): PIL's radius is the standard
    deviation, applied as three extended box filters (a close Gaussian approximation),
    edges extended. Graham's own script used sigma = radius / 30 and grey 128 outside the
    circle; this is the variant with sigma = diameter / 30 and a black outside.

    Args:
        arr: uint8 HWC RGB image.
        size: the fundus diameter in pixels (the side of a cropped, resized image).
    """
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"graham expects uint8 HWC RGB, got {arr.dtype} {arr.shape}")
    img = Image.fromarray(arr, "RGB")
    blur = img.filter(ImageFilter.GaussianBlur(radius=size / 30))
    # subtract: clip((a - b) / scale + offset); with scale 1/4 exactly 4a - 4b + 128.
    sharp = np.array(ImageChops.subtract(img, blur, scale=0.25, offset=128))
    return np.multiply(sharp, _circle_mask(arr.shape[0], arr.shape[1], size), out=sharp)


@functools.lru_cache(maxsize=8)
def _circle_mask(h: int, w: int, size: int) -> np.ndarray:
    # A pure function of its arguments, cached because every image of a run asks for it.
    y, x = np.ogrid[:h, :w]
    r = 0.9 * size / 2
    inside = (x - (w - 1) / 2) ** 2 + (y - (h - 1) / 2) ** 2 <= r * r
    mask = inside.astype(np.uint8)[:, :, None]  # HW1, broadcasts over RGB
    mask.flags.writeable = False
    return mask


# --------------------------------------------------------------------------- model input


def prepare(img: Image.Image, p: Preprocess) -> np.ndarray:
    """RGB image -> uint8 HWC array of shape (p.size, p.size, 3) as p.mode describes."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if p.mode != "none":
        img = crop_fundus(img)
    if img.size != (p.size, p.size):
        img = img.resize(
            (p.size, p.size), INTERPOLATIONS[p.interpolation], reducing_gap=_REDUCING_GAP
        )
    arr = np.array(img)  # a writable copy (np.asarray of a PIL image is read-only)
    if p.mode == "graham":
        arr = graham(arr, p.size)
    return arr


def load_and_prepare(path: str | Path, p: Preprocess) -> np.ndarray:
    """The one path from a file to model pixels, shared by training and prediction."""
    return prepare(load_image(path, target=p.size), p)


def normalize(arr: np.ndarray, p: Preprocess) -> np.ndarray:
    """uint8 HWC -> float32 CHW, (x / 255 - mean) / std per channel."""
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"normalize expects HWC with 3 channels, got shape {arr.shape}")
    return np.ascontiguousarray(_normalize_hwc(arr, p).transpose(2, 0, 1))


def to_batch(images: Sequence[np.ndarray], p: Preprocess | None = None) -> np.ndarray:
    """List of uint8 HWC arrays of one shape -> normalised float32 NCHW.

    p defaults to Preprocess() (ImageNet mean and std); pass the model's own.
    """
    if len(images) == 0:
        raise ValueError("to_batch needs at least one image")
    stacked = np.stack(images)
    if stacked.ndim != 4 or stacked.shape[3] != 3:
        raise ValueError(f"to_batch expects HWC images with 3 channels, got {stacked.shape[1:]}")
    return np.ascontiguousarray(_normalize_hwc(stacked, p or Preprocess()).transpose(0, 3, 1, 2))


def _normalize_hwc(arr: np.ndarray, p: Preprocess) -> np.ndarray:
    std = np.asarray(p.std, dtype=np.float32)
    scale = 1.0 / (255.0 * std)
    shift = np.asarray(p.mean, dtype=np.float32) / std
    return arr.astype(np.float32) * scale - shift
