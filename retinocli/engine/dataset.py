"""Torch side of the data: splits, the Dataset, augmentation presets, samplers, loaders.

Images are decoded and resized by :mod:`retinocli.imaging.preprocess` (numpy/PIL, shared with the
ONNX predictor) and leave the workers as uint8 tensors; normalisation happens on the
training device, which moves four times fewer bytes than float32 would.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from retinocli import NUM_GRADES
from retinocli.errors import RetinoError
from retinocli.imaging.preprocess import Preprocess, load_and_prepare

if TYPE_CHECKING:
    import pandas as pd

IGNORE = -100  # target of an image that could not be read: the loss and metrics skip it


# ---------------------------------------------------------------------------- splits


def carve_validation(records: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Move a stratified, patient-grouped ``fraction`` of the train split to ``val``.

    Both eyes of a patient stay on one side (a fellow eye in validation would flatter the
    model); groups are stratified by their highest grade so rare grades reach validation.
    Images with no patient id are their own group.
    """
    out = records.copy()
    train = out[out["split"] == "train"]
    if fraction <= 0 or train.empty:
        return out
    group = train["patient"].astype("object").where(train["patient"].notna(), "img:" + train["path"])
    worst = train.groupby(group)["grade"].max()
    rng = np.random.default_rng(seed)
    val_groups: set = set()
    for grade in sorted(worst.unique()):
        members = sorted(worst.index[worst == grade])
        rng.shuffle(members)
        take = int(round(fraction * len(members)))
        if take == 0 and len(members) >= 2 and rng.random() < fraction * len(members):
            take = 1
        val_groups.update(members[:take])
    out.loc[train.index[group.isin(val_groups).to_numpy()], "split"] = "val"
    return out


def training_split(records: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, list[str]]:
    """Records ready to train on: labelled, on disk, with train and val splits.

    Returns the table (test rows kept, for split.csv) and the notes worth printing.
    """
    notes = []
    missing = int((~records["found"]).sum())
    if missing:
        notes.append(f"skipping {missing} listed image(s) missing on disk")
    unlabelled = int(records["grade"].isna().sum())
    if unlabelled:
        notes.append(f"skipping {unlabelled} unlabelled image(s)")
    usable = records[records["found"] & records["grade"].notna()].reset_index(drop=True)
    if (usable["split"] == "train").sum() == 0:
        raise RetinoError("the dataset has no labelled training images on disk")
    if (usable["split"] == "val").sum() == 0:
        if val_fraction <= 0:
            raise RetinoError("the dataset has no val split; give --val-fraction > 0 to carve one")
        usable = carve_validation(usable, val_fraction, seed)
        unit = "patients" if usable["patient"].notna().any() else "images"  # IDRiD has no patient ids
        notes.append(f"carved a validation split: {(usable['split'] == 'val').sum()} images "
                     f"({val_fraction:.0%} of training {unit}, stratified by grade)")
    return usable, notes


# ---------------------------------------------------------------------------- transforms


def augmentation(preset: str):
    """Per-image augmentation presets on uint8 CHW tensors, run in the loader workers.

    A fundus has no up: rotate the full circle. ``retino train`` uses these with
    ``--augment-on workers`` (the ``auto`` choice on a CPU); on the device
    :class:`retinocli.engine.augment.BatchAugment` reproduces them a whole batch at a time
    (tests/test_augment_equivalence.py).
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    bilinear = InterpolationMode.BILINEAR
    if preset == "none":
        return None
    if preset == "light":
        return T.Compose([T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
                          T.RandomRotation(180, interpolation=bilinear),
                          T.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1)])
    if preset == "strong":
        return T.Compose([T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
                          T.RandomAffine(180, translate=(0.05, 0.05), scale=(0.9, 1.1), interpolation=bilinear),
                          T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)])
    raise RetinoError(f"unknown augmentation {preset!r}; choose none, light or strong")


class FundusDataset(torch.utils.data.Dataset):
    """(uint8 CHW image, grade) pairs; an unreadable file yields a black image and IGNORE.

    Keys are indices or ``(index, seed)`` pairs from :class:`EpochSampler`: seeding each
    sample's augmentation from the sampler makes an epoch the same whatever the number of
    workers and whether training was resumed. ``engine`` turns each image with the torchvision
    preset (:func:`augmentation`) or with OpenCV (:class:`retinocli.engine.cv_augment.CvAugment`,
    3-4x faster on a CPU core, the same presets).
    """

    def __init__(self, paths: list[str], grades: list[int], preprocess: Preprocess, augment: str = "none",
                 engine: str = "torchvision"):
        self.paths = list(paths)
        self.grades = [int(g) for g in grades]
        self.preprocess = preprocess
        self.transform = augmentation(augment) if engine == "torchvision" else None
        self.cv = None
        if engine == "opencv" and augment != "none":
            from retinocli.engine.cv_augment import CvAugment

            self.cv = CvAugment(augment)
        self.failures: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        target = self.grades[index]
        try:
            arr = load_and_prepare(self.paths[index], self.preprocess)
        except RetinoError as exc:
            self.failures.append((self.paths[index], str(exc)))
            size = self.preprocess.size
            arr, target = np.zeros((size, size, 3), np.uint8), IGNORE
        if self.cv is not None:
            arr = self.cv(arr, seed if seed is not None else int(torch.randint(2**62, (1,))))
        image = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                image = self.transform(image)
        return image, target


class EpochSampler(Sampler):
    """Shuffled (optionally class-balanced) indices whose order depends only on seed and epoch.

    Shards across ``world`` ranks like DistributedSampler; yields ``(index, sample_seed)``.
    """

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True, weights: list[float] | None = None,
                 rank: int = 0, world: int = 1, pad: bool = True):
        self.n, self.seed, self.shuffle, self.rank, self.world, self.pad = n, seed, shuffle, rank, world, pad
        self.weights = torch.as_tensor(weights, dtype=torch.double) if weights is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.n / self.world)
        return len(range(self.rank, self.n, self.world))

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        elif self.shuffle:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g)
        if self.pad and self.n % self.world:
            extra = self.world - self.n % self.world
            order, seeds = torch.cat([order, order[:extra]]), torch.cat([seeds, seeds[:extra]])
        order, seeds = order[self.rank::self.world], seeds[self.rank::self.world]
        return iter(zip(order.tolist(), seeds.tolist()))


def class_counts(grades: list[int]) -> np.ndarray:
    return np.bincount(np.asarray(grades, dtype=np.int64), minlength=NUM_GRADES)[:NUM_GRADES]


def class_weights(grades: list[int], scheme: str) -> torch.Tensor | None:
    """Loss weights per grade: ``balanced`` = n / (k * count), ``sqrt`` = its square root.

    Scaled to average 1 over the grades present, so the loss keeps its usual size.
    """
    if scheme == "none":
        return None
    counts = class_counts(grades).astype(np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = counts.sum() / (present.sum() * counts[present])
    if scheme == "sqrt":
        w = np.sqrt(w)
    w[present] /= w[present].mean()
    return torch.tensor(w, dtype=torch.float32)


def sample_weights(grades: list[int]) -> list[float]:
    """Per-image weights that make every grade equally likely to be drawn."""
    counts = class_counts(grades)
    return [1.0 / counts[g] for g in grades]


def make_loader(dataset: FundusDataset, sampler: EpochSampler, *, batch_size: int, workers: int,
                pin_memory: bool, drop_last: bool = False, collate_fn=None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=drop_last, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None, collate_fn=collate_fn)
