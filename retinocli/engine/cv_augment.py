"""The augmentation presets per image with OpenCV: the fast way when they run in CPU workers.

``--augment-on opencv`` (what ``auto`` picks on a machine without CUDA) turns each decoded
image in its loader worker with one ``cv2.warpAffine`` (flips, rotation, shift and scale in a
single bilinear warp) and colour steps built from look-up tables and fixed-point blends. It
draws its parameters exactly as :class:`retinocli.engine.augment.BatchAugment` does
(:func:`~retinocli.engine.augment.sample_params`, already checked against torchvision's with
Kolmogorov-Smirnov tests), from the sample's seed, so an epoch is the same whatever the number
of workers and a resumed run repeats the uninterrupted one.

It copies torchvision v2's rules on uint8, like the batched path: colour steps in a random
order per image, each clamped to [0, 255] and truncated; greys floored (0.2989, 0.587, 0.114);
contrast around the mean floored grey; hue through HSV. Where it cannot be exact, and why that
is accepted (tests/test_cv_augment.py measures each against torchvision's own output):

- OpenCV's bilinear warp rounds coordinates to 1/32 pixel and weights to fixed point, so a
  pixel on a sharp edge can land a level or two away from torchvision's;
- torchvision darkens the ring of pixels that straddle the picture's edge (its fill blend
  multiplies by a warped plane of ones): done here by warping the plane as a fourth channel,
  skipped when the picture's outer frame is dark (<= ``DARK_FRAME`` levels: a whole fundus),
  where it would move those dark pixels by at most that much;
- greys come from a fixed-point transform, floored by rounding ``x - 0.499``;
- hue goes through OpenCV's float HSV, whose arithmetic differs from torchvision's in the last bits.

Parameters are drawn with torch's generator, as the batched path draws them.
"""

from __future__ import annotations

import numpy as np
import torch

from retinocli.engine.augment import LUMA, PRESETS, affine_theta, sample_params, whole_pixel_shifts
from retinocli.errors import RetinoError

DARK_FRAME = 10  # an outer frame no brighter than this is a fundus's black margin (JPEG noise included)
_FLOOR = -0.499  # rounding x + _FLOOR is floor(x) for every x not within 0.001 below an integer


def available() -> bool:
    """True when OpenCV imports (it is a dependency; a broken install falls back to torchvision)."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def pixel_matrix(theta: np.ndarray, size: int) -> np.ndarray:
    """A (2, 3) ``affine_grid`` matrix (output -> input, [-1, 1], align_corners=False) in pixels
    of a ``size`` square image, for ``cv2.warpAffine(..., WARP_INVERSE_MAP)``."""
    a = np.asarray(theta, np.float64)
    half = size / 2
    lin = a[:, :2]
    # in_pix = half * (lin @ (out_pix / half + 1 / size - 1) + c + 1) - 0.5
    offset = half * (lin.sum(1) * (1 / size - 1) + a[:, 2] + 1) - 0.5
    return np.concatenate([lin, offset[:, None]], 1)


def grey(img: np.ndarray, cv2) -> np.ndarray:
    """The grey of an RGB uint8 image, (H, W) uint8: OpenCV's fixed-point luma, rounded
    (0.299, 0.587, 0.114): within a level of torchvision's floored grey."""
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


def mean_grey(img: np.ndarray, cv2) -> float:
    """torchvision's mean floored grey, from the channel means: flooring takes half a level
    off every pixel that is not black, on average."""
    r, g, b, _ = cv2.mean(img)
    lit = cv2.countNonZero(grey(img, cv2)) / (img.shape[0] * img.shape[1])
    return LUMA[0] * r + LUMA[1] * g + LUMA[2] * b - 0.5 * lit


def brightness(img: np.ndarray, f: float, cv2) -> np.ndarray:
    lut = np.floor(np.clip(np.arange(256, dtype=np.float32) * np.float32(f), 0, 255)).astype(np.uint8)
    return cv2.LUT(img, lut)


def contrast(img: np.ndarray, f: float, cv2) -> np.ndarray:
    values = np.arange(256, dtype=np.float32) * np.float32(f) + np.float32(mean_grey(img, cv2)) * np.float32(1 - f)
    return cv2.LUT(img, np.floor(np.clip(values, 0, 255)).astype(np.uint8))


def saturation(img: np.ndarray, f: float, cv2) -> np.ndarray:
    g = cv2.cvtColor(grey(img, cv2), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(img, float(f), g, float(1 - f), _FLOOR)


def hue(img: np.ndarray, turn: float, cv2) -> np.ndarray:
    """torchvision's ``adjust_hue`` on uint8: through float HSV and back, truncated as its ``to_dtype``."""
    if turn == 0:
        return img
    hsv = cv2.cvtColor(img.astype(np.float32) * np.float32(1 / 255), cv2.COLOR_RGB2HSV)
    h = hsv[..., 0]
    np.add(h, np.float32(turn * 360), out=h)
    np.mod(h, np.float32(360), out=h)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return np.floor(np.clip(rgb * np.float32(255.999), 0, 255)).astype(np.uint8)


COLOUR_STEPS = (brightness, contrast, saturation, hue)


class CvAugment:
    """One preset on HWC uint8 numpy images, one at a time; ``aug(image, seed)``."""

    def __init__(self, preset: str):
        if preset not in PRESETS:
            raise RetinoError(f"unknown augmentation {preset!r}; choose none, light or strong")
        self.preset = PRESETS[preset]

    def params(self, seed: int) -> dict[str, float | list[int]]:
        """The parameters of one image under ``seed``, in :func:`sample_params`' terms."""
        p = sample_params(self.preset, 1, torch.Generator().manual_seed(int(seed)))
        return {k: (v[0].tolist()) for k, v in p.items()}

    def __call__(self, img: np.ndarray, seed: int) -> np.ndarray:
        if self.preset is None:
            return img
        return self.apply(img, self.params(seed))

    def apply(self, img: np.ndarray, p: dict) -> np.ndarray:
        """The preset with the given parameters (``whole_pixel_shifts`` applied here)."""
        import cv2

        cv2.setNumThreads(1)  # one image per worker core
        size = img.shape[1]
        if img.shape[0] != size:
            raise RetinoError(f"augmentation expects square images, got {img.shape[1]}x{img.shape[0]}")
        pr = self.preset
        out = self._warp(img, p, size, cv2)
        factors = (p["brightness"], p["contrast"], p["saturation"], p["hue"])
        active = (pr.brightness > 0, pr.contrast > 0, pr.saturation > 0, pr.hue > 0)
        for op in p["order"]:
            if active[op]:
                out = COLOUR_STEPS[op](out, factors[op], cv2)
        return out

    @staticmethod
    def _warp(img: np.ndarray, p: dict, size: int, cv2) -> np.ndarray:
        one = {k: torch.tensor([float(p[k])]) for k in ("flip_x", "flip_y", "angle", "scale", "tx", "ty")}
        m = pixel_matrix(affine_theta(whole_pixel_shifts(one, size))[0].double().numpy(), size)

        def warp(a: np.ndarray) -> np.ndarray:
            return cv2.warpAffine(a, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)

        if max(img[0].max(), img[-1].max(), img[:, 0].max(), img[:, -1].max()) <= DARK_FRAME:
            return warp(img)  # a whole fundus, dark all round: torchvision's edge fade changes ~nothing
        # torchvision also warps a plane of ones and multiplies by it, so the ring of pixels that
        # straddles the picture's edge fades toward the fill: the plane rides along as alpha
        out = warp(cv2.cvtColor(img, cv2.COLOR_RGB2RGBA))
        fade = cv2.cvtColor(np.ascontiguousarray(out[..., 3]), cv2.COLOR_GRAY2RGB)
        return cv2.multiply(cv2.cvtColor(out, cv2.COLOR_RGBA2RGB), fade, scale=1 / 255)
