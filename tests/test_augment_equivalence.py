"""The batched device augmentation is the per-image torchvision preset (``--augment-on workers``).

Each image goes through the real torchvision preset of ``dataset.augmentation`` under a seed;
replaying that seed gives the parameters it drew (flips, angle, shift, scale, colour order and
factors), and :meth:`BatchAugment.apply` with those parameters must give the same uint8
levels. Separately, the parameters :class:`BatchAugment` draws itself must follow the same
distributions as torchvision's (two-sample Kolmogorov-Smirnov, scipy).
"""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from retinocli.engine.augment import PRESETS, BatchAugment, sample_params, whole_pixel_shifts
from retinocli.engine.dataset import augmentation
from builders import replay_preset

SIZE = 40


def batch_of(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.long if k == "order" else torch.float32)
            for k in rows[0]}


@pytest.mark.parametrize("preset", ["light", "strong"])
def test_same_parameters_give_the_torchvision_images(preset):
    g = torch.Generator().manual_seed(11)
    # noise with saturated pixels: every clamp, rounding and edge of the warp shows on it
    images = torch.randint(0, 256, (24, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    images[:8, 0] = 255  # red at the top, as a fundus
    transform = augmentation(preset)
    reference, rows = [], []
    for i, image in enumerate(images):
        torch.manual_seed(100 + i)
        reference.append(transform(image))
        rows.append(replay_preset(preset, image, 100 + i))
    ours = BatchAugment(preset).apply(images.float(), batch_of(rows))
    diff = (ours - torch.stack(reference).float()).abs()
    # float32 rounding of the factors moves a rare pixel across a uint8 boundary
    assert diff.max() <= 2
    assert (diff > 0).float().mean() < 1e-3


def test_replayed_parameters_are_the_ones_the_preset_used():
    """The replay is itself checked: an image of one bright pixel lands where the angle says."""
    image = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
    image[:, 20, 30] = 255
    for seed in range(5):
        torch.manual_seed(seed)
        out = augmentation("light").transforms[2](image)  # the rotation alone
        torch.manual_seed(seed)
        angle = augmentation("light").transforms[2].make_params([image])["angle"]
        mine = BatchAugment("light").apply(image[None].float(), batch_of([{
            "flip_x": 1.0, "flip_y": 1.0, "angle": -angle, "tx": 0.0, "ty": 0.0, "scale": 1.0, "brightness": 1.0,
            "contrast": 1.0, "saturation": 1.0, "hue": 0.0, "order": [0, 1, 2, 3]}]))
        assert (mine[0] - out.float()).abs().max() <= 1


@pytest.mark.parametrize("preset", ["light", "strong"])
def test_parameter_distributions_match_torchvision(preset):
    n = 3000
    image = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
    theirs = batch_of([replay_preset(preset, image, 10_000 + i) for i in range(n)])
    ours = whole_pixel_shifts(sample_params(PRESETS[preset], n, torch.Generator().manual_seed(5)), SIZE)
    for key in ("angle", "tx", "ty", "scale", "brightness", "contrast", "saturation", "hue"):
        if theirs[key].std() == 0:
            assert torch.equal(ours[key], theirs[key]), key  # the same constant
            continue
        result = stats.ks_2samp(ours[key].numpy(), theirs[key].numpy())
        assert result.pvalue > 1e-3, (key, result)
    for key in ("flip_x", "flip_y"):
        assert abs(float((ours[key] < 0).float().mean() - (theirs[key] < 0).float().mean())) < 0.05
    # the colour order: each operation equally likely at each position, in both
    for op in range(4):
        a = (ours["order"] == op).float().mean(0)
        b = (theirs["order"] == op).float().mean(0)
        assert torch.allclose(a, b, atol=0.05) and torch.allclose(a, torch.full((4,), 0.25), atol=0.05)


def test_each_colour_step_clamps_and_truncates_as_torchvision():
    """Worked by hand on a saturated red: brightness clamps at 255 before contrast pulls it
    down; the first batched version clamped once at the end and landed 19 levels higher."""
    image = torch.full((1, 3, 4, 4), 250.0)
    image[:, 1:] = 20.0  # saturated red
    p = batch_of([{"flip_x": 1.0, "flip_y": 1.0, "angle": 0.0, "tx": 0.0, "ty": 0.0, "scale": 1.0, "brightness": 1.1,
                   "contrast": 0.9, "saturation": 1.0, "hue": 0.0, "order": [0, 1, 2, 3]}])
    ours = BatchAugment("light").apply(image, p)
    from torchvision.transforms.v2 import functional as TF

    clamped_first = TF.adjust_contrast(TF.adjust_brightness(image[0].to(torch.uint8), 1.1), 0.9).float()
    assert torch.equal(ours[0], clamped_first)
    grey = 0.2989 * 250 + (0.587 + 0.114) * 20
    unclamped = 0.9 * 1.1 * 250 + 0.1 * 1.1 * grey  # red after both steps, clamped only at the end
    assert unclamped > 255 and abs(float(ours[0, 0, 0, 0]) - unclamped) > 5
