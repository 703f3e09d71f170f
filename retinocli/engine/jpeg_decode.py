"""``--decode gpu``: loader workers read JPEG bytes only; the training device decodes them in batches.

A worker checks the file's header with PIL (a JPEG in RGB or grey, under the pixel guard)
and hands over its bytes; anything else (PNG, CMYK JPEG, an unreadable file) it decodes and
prepares on the CPU as :class:`retinocli.engine.dataset.FundusDataset` does, so a batch can mix
both. :class:`JpegBatch` moves to the device like a tensor: ``batch.to(device)`` decodes its
JPEGs with one ``torchvision.io.decode_jpeg`` call (nvJPEG on CUDA), squashes each to
``size x size`` (bilinear with antialiasing, per group of equal shapes, the ``none``
preprocess) and returns uint8 NCHW on the device, ready for
:class:`retinocli.engine.augment.BatchAugment`.

The pixels are close to, not bit-identical with, the CPU path's (PIL's reduced-size draft
decoding and resampling differ from nvJPEG + ``interpolate``); a run keeps one decoder from
start to resume, so its determinism on one machine is unaffected. ``decode_jpeg`` also runs
on the CPU, which is how the tests check this path on machines without a GPU.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from retinocli.engine.dataset import FundusDataset
from retinocli.errors import RetinoError
from retinocli.imaging.preprocess import Preprocess

DECODERS = ("cpu", "gpu")
MAX_PIXELS = 200_000_000  # load_image's decompression-bomb guard
_ORIENTATION = 0x0112  # the EXIF tag


def check_gpu_decode(device: torch.device, preprocess: Preprocess, augment: str, augment_on: str) -> None:
    """Raise RetinoError unless ``--decode gpu`` can run with these settings."""
    if device.type != "cuda":
        why = "CUDA is not available on this machine" if not torch.cuda.is_available() else f"the device is {device}"
        raise RetinoError(f"--decode gpu needs a CUDA device ({why}); use --decode cpu")
    if preprocess.mode != "none" or preprocess.interpolation not in ("bilinear", "bicubic"):
        raise RetinoError("--decode gpu squashes whole photos (--preprocess none, bilinear or bicubic); "
                          f"got --preprocess {preprocess.mode} with {preprocess.interpolation}: use --decode cpu")
    if augment != "none" and augment_on != "device":
        raise RetinoError("--decode gpu leaves the workers no pixels to augment: add --augment-on device")


def jpeg_bytes(path: str | Path) -> torch.Tensor | None:
    """The file's bytes as a uint8 tensor when nvJPEG can decode it as it is, else None.

    Raises RetinoError for a file that cannot be read at all (the CPU path then names it).
    """
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None  # load_and_prepare says why
    if not data.startswith(b"\xff\xd8\xff") or not data.rstrip(b"\0")[-2:] == b"\xff\xd9":
        return None  # not a JPEG, or a truncated one: the CPU path decodes what it can or names it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        w, h = im.size
    except Exception:  # noqa: BLE001 - a bad header: the CPU path reports it
        return None
    if im.format != "JPEG" or im.mode not in ("RGB", "L") or w * h > MAX_PIXELS:
        return None
    try:
        turned = im.getexif().get(_ORIENTATION, 1) not in (None, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF: load_image keeps the photo as stored, so may we
        turned = False
    if turned:  # nvJPEG ignores EXIF orientation; PIL on the CPU turns the photo upright
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class JpegBytesDataset(FundusDataset):
    """(JPEG bytes or prepared uint8 CHW image, grade) pairs; see the module doc."""

    def __init__(self, paths: list[str], grades: list[int], preprocess: Preprocess):
        super().__init__(paths, grades, preprocess, "none")

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        data = jpeg_bytes(self.paths[index])
        if data is not None:
            return data, self.grades[index]
        return super().__getitem__(index)


class JpegBatch:
    """A batch of JPEG bytes and already decoded images that decodes itself on ``.to(device)``."""

    def __init__(self, items: list[torch.Tensor], size: int, interpolation: str = "bilinear"):
        self.items, self.size, self.interpolation = items, size, interpolation
        self.failed: list[int] = []  # positions whose bytes nvJPEG refused: left black

    def __len__(self) -> int:
        return len(self.items)

    def pin_memory(self) -> JpegBatch:
        return JpegBatch([t.pin_memory() for t in self.items], self.size, self.interpolation)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        device = torch.device(device)
        out = torch.zeros(len(self.items), 3, self.size, self.size, dtype=torch.uint8, device=device)
        jpegs = [i for i, t in enumerate(self.items) if t.dim() == 1]
        for i, t in enumerate(self.items):
            if t.dim() == 3:
                out[i] = t.to(device, non_blocking=non_blocking)
        decoded = self._decode([self.items[i] for i in jpegs], device)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for k, image in enumerate(decoded):
            if image is not None:
                by_shape.setdefault(tuple(image.shape), []).append(k)
            else:
                self.failed.append(jpegs[k])
        for shape, ks in by_shape.items():
            group = torch.stack([decoded[k] for k in ks])
            out[[jpegs[k] for k in ks]] = squash(group, self.size, self.interpolation)
        return out

    @staticmethod
    def _decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
        """One batched decode; if the batch fails (a corrupt file), one by one."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if not data:
            return []
        if device.type == "cuda":
            # nvJPEG's hardware engine writes its outputs without waiting for the work queued on
            # the stream, and the caching allocator hands it blocks that queued kernels may still
            # be reading (freed earlier in the step): without this barrier the model's own
            # tensors were overwritten and training went to NaN within 20 steps on an H100.
            # pytorch/vision#9606, meta-pytorch/torchcodec#1634.
            torch.cuda.current_stream(device).synchronize()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 marks its decoders deprecated
            try:
                return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out: list[torch.Tensor | None] = []
                for d in data:
                    try:
                        out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                    except RuntimeError:
                        try:  # libjpeg on the CPU accepts some files nvJPEG refuses
                            out.append(decode_jpeg(d.cpu(), mode=ImageReadMode.RGB).to(device))
                        except RuntimeError:
                            out.append(None)
                return out


def squash(images: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """uint8 NCHW of one shape -> uint8 N x C x size x size, antialiased like PIL's resize."""
    if images.shape[-2:] == (size, size):
        return images
    x = F.interpolate(images.float(), size=(size, size), mode=interpolation, antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


class JpegCollate:
    """``collate_fn`` of the loaders under ``--decode gpu``: a :class:`JpegBatch` and the grades."""

    def __init__(self, size: int, interpolation: str = "bilinear"):
        self.size, self.interpolation = size, interpolation

    def __call__(self, samples: list[tuple[torch.Tensor, int]]) -> tuple[JpegBatch, torch.Tensor]:
        return (JpegBatch([s[0] for s in samples], self.size, self.interpolation),
                torch.tensor([s[1] for s in samples], dtype=torch.long))
