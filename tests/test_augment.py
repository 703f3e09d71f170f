"""Batched device augmentation: the maths against torch and torchvision, and its seeds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from retinocli.engine.augment import PRESETS, BatchAugment, affine_theta, batch_seed, sample_params, sampling_grid
from retinocli.errors import RetinoError


def images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Float images in [0, 1] that hold uint8 levels, as ``to_input`` hands them over."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255


def params(n: int, **over) -> dict[str, torch.Tensor]:
    base = {"flip_x": 1.0, "flip_y": 1.0, "angle": 0.0, "tx": 0.0, "ty": 0.0, "scale": 1.0, "brightness": 1.0,
            "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
    return {k: torch.full((n,), float(over.get(k, v))) for k, v in base.items()}


def warp(x: torch.Tensor, p: dict) -> torch.Tensor:
    n, _, h, w = x.shape
    return F.grid_sample(x, sampling_grid(affine_theta(p), n, h, w), align_corners=False)


def test_sampling_grid_equals_affine_grid():
    p = sample_params(PRESETS["strong"], 5, torch.Generator().manual_seed(3))
    theta = affine_theta(p)
    ours = sampling_grid(theta, 5, 12, 12)
    assert torch.allclose(ours, F.affine_grid(theta, [5, 3, 12, 12], align_corners=False), atol=1e-6)


def test_flips_and_quarter_turns_move_pixels_exactly():
    x = images()
    assert torch.allclose(warp(x, params(4, flip_x=-1)), x.flip(3), atol=1e-5)
    assert torch.allclose(warp(x, params(4, flip_y=-1)), x.flip(2), atol=1e-5)
    assert torch.allclose(warp(x, params(4, flip_x=-1, flip_y=-1)), x.flip(2, 3), atol=1e-5)
    turned = warp(x, params(4, angle=90))
    # a quarter turn either way is a transposition plus a flip: compare with both and pick
    assert min((turned - torch.rot90(x, k, (2, 3))).abs().max() for k in (1, -1)) < 1e-5
    assert torch.allclose(warp(x, params(4, angle=180)), x.flip(2, 3), atol=1e-5)


def test_shift_moves_by_the_fraction_of_the_size():
    x = images(size=20)
    shifted = warp(x, params(4, tx=0.1))  # 2 pixels to the right
    assert torch.allclose(shifted[..., 2:], x[..., :-2], atol=1e-5)
    assert shifted[..., :2].abs().max() == 0  # zero fill, as torchvision's fill=0


def test_parameters_come_from_seed_epoch_step_rank_only():
    aug = BatchAugment("strong", seed=7)
    aug.set_epoch(2)
    first = aug.params(8, step=5)
    torch.manual_seed(123)  # the global RNG plays no part
    again = BatchAugment("strong", seed=7)
    again.set_epoch(2)
    assert all(torch.equal(first[k], v) for k, v in again.params(8, step=5).items())
    keys = {batch_seed(7, 2, 5, 0), batch_seed(7, 2, 6, 0), batch_seed(7, 3, 5, 0), batch_seed(8, 2, 5, 0),
            batch_seed(7, 2, 5, 1)}
    assert len(keys) == 5
    # the ranges of the presets: full-circle rotation, +-5 % shift, 0.9-1.1 scale, colour +-0.2, hue +-0.02
    p = aug.params(4000, step=1)
    assert -180 <= p["angle"].min() < -170 and 170 < p["angle"].max() <= 180
    assert p["tx"].abs().max() <= 0.05 and 0.9 <= p["scale"].min() and p["scale"].max() <= 1.1
    assert 0.8 <= p["brightness"].min() and p["brightness"].max() <= 1.2 and p["hue"].abs().max() <= 0.02
    assert 0.45 < (p["flip_x"] < 0).float().mean() < 0.55
    light = BatchAugment("light").params(4000, step=1)
    assert light["tx"].abs().max() == 0 and light["scale"].eq(1).all() and light["hue"].eq(0).all()
    assert 0.9 <= light["contrast"].min() and light["contrast"].max() <= 1.1


def test_a_batch_is_augmented_the_same_way_every_time_and_stays_in_range():
    x = images(6, 32)
    a = BatchAugment("light", seed=1)
    out = a(x.clone(), step=3)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, BatchAugment("light", seed=1)(x.clone(), step=3))
    assert not torch.equal(out, a(x.clone(), step=4))
    assert torch.equal(BatchAugment("none")(x, step=3), x)
    as_bytes = (x * 255).round().to(torch.uint8)  # uint8 in, the same levels out
    assert torch.equal(BatchAugment("light", seed=1)(as_bytes, step=3), out)
    with pytest.raises(RetinoError, match="unknown augmentation"):
        BatchAugment("wild")
