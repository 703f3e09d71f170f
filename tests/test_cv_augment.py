"""``--augment-on opencv`` gives torchvision's preset images, faster (engine/cv_augment.py).

Each fundus image goes through the real torchvision preset of ``dataset.augmentation`` under
a seed; the parameters it drew are replayed (``builders.replay_preset``) into
:meth:`CvAugment.apply`, and the uint8 levels are compared. OpenCV's fixed-point bilinear
weights and its rounded greys cannot be bit-exact, so the test bounds how far and how often
they differ; the colour rules that matter (clamp and truncate after each step, random order)
are checked by a worked example where getting them wrong moves a pixel by 19 levels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision.transforms.v2 import functional as TF

from retinocli.engine.augment import PRESETS, sample_params
from retinocli.engine.cv_augment import CvAugment, pixel_matrix
from retinocli.engine.dataset import FundusDataset, augmentation
from retinocli.imaging.preprocess import Preprocess
from builders import replay_preset

SIZE = 64


@pytest.fixture(scope="module")
def fundus_images(tmp_path_factory) -> list[np.ndarray]:
    """Sixteen generated fundus photographs at 64 px."""
    from retinocli.data.synth import generate

    out = tmp_path_factory.mktemp("cv") / "data"
    generate(out, n=16, size=SIZE, seed=3)
    files = sorted(out.rglob("*.png")) + sorted(out.rglob("*.jpg")) + sorted(out.rglob("*.jpeg"))
    images = [np.asarray(Image.open(f).convert("RGB").resize((SIZE, SIZE)), dtype=np.uint8).copy() for f in files[:16]]
    assert len(images) == 16
    return images


def black_frame(im: np.ndarray) -> np.ndarray:
    """A whole fundus: black all round its disc (the warp's fast path)."""
    im = im.copy()
    im[:2], im[-2:], im[:, :2], im[:, -2:] = 0, 0, 0, 0
    return im


def cut_disc(im: np.ndarray) -> np.ndarray:
    """The disc's middle, filling the frame (RetinaMNIST and EyePACS crops cut the disc)."""
    m = SIZE // 6
    out = np.array(Image.fromarray(im[m:-m, m:-m]).resize((SIZE, SIZE)), dtype=np.uint8)
    assert out[0].mean() > 20 and out[:, 0].mean() > 20
    return out


@pytest.mark.parametrize("framed", [True, False], ids=["black-frame", "cut-disc"])
@pytest.mark.parametrize("preset", ["light", "strong"])
def test_same_parameters_give_the_torchvision_images(preset, framed, fundus_images):
    transform, cv = augmentation(preset), CvAugment(preset)
    diffs, moved = [], []
    for i, im in enumerate(black_frame(im) if framed else cut_disc(im) for im in fundus_images):
        tensor = torch.from_numpy(im).permute(2, 0, 1).contiguous()
        torch.manual_seed(200 + i)
        reference = transform(tensor).permute(1, 2, 0).numpy().astype(np.int16)
        ours = cv.apply(im, replay_preset(preset, tensor, 200 + i)).astype(np.int16)
        diffs.append(np.abs(ours - reference))
        moved.append(np.abs(im.astype(np.int16) - reference).mean())
    d = np.stack(diffs)
    # measured: light about 3 % of levels off by one and 0.1 % by more; strong 7 % and 0.3 %.
    # Without torchvision's edge fade, 1 % of a cut disc's levels were 5-40 off at 28 px.
    assert d.max() <= 6
    assert d.mean() < 0.15
    assert (d > 1).mean() < 0.005
    # and the images were really turned: the untouched input is far from torchvision's output
    assert np.mean(moved) > 50 * d.mean()


def test_a_single_bright_pixel_lands_where_torchvision_puts_it():
    """The warp's matrix, pixel centres included: the rotation alone, against torchvision's."""
    image = np.zeros((40, 40, 3), np.uint8)
    image[9, 30] = 255
    tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    rotation = augmentation("light").transforms[2]
    for seed in range(6):
        torch.manual_seed(seed)
        theirs = rotation(tensor).permute(1, 2, 0).numpy()
        torch.manual_seed(seed)
        angle = rotation.make_params([tensor])["angle"]
        p = {"flip_x": 1.0, "flip_y": 1.0, "angle": -angle, "tx": 0.0, "ty": 0.0, "scale": 1.0, "brightness": 1.0,
             "contrast": 1.0, "saturation": 1.0, "hue": 0.0, "order": [0, 1, 2, 3]}
        ours = CvAugment("light").apply(image, p)
        assert np.unravel_index(ours[..., 0].argmax(), (40, 40)) == np.unravel_index(theirs[..., 0].argmax(), (40, 40))
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 3


def test_pixel_matrix_of_a_flip_and_a_shift():
    """Worked by hand: x-flip maps output column c to input column size-1-c; a shift of
    +0.25 (in [-1, 1] units, a quarter of the half-width) moves 2 pixels on a 16-wide image."""
    m = pixel_matrix(np.array([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.25]]), 16)
    assert np.allclose(m, [[-1, 0, 15], [0, 1, 2]])


def test_each_colour_step_clamps_and_truncates_as_torchvision():
    image = np.full((4, 4, 3), 20, np.uint8)
    image[..., 0] = 250  # saturated red
    p = {"flip_x": 1.0, "flip_y": 1.0, "angle": 0.0, "tx": 0.0, "ty": 0.0, "scale": 1.0, "brightness": 1.1,
         "contrast": 0.9, "saturation": 1.0, "hue": 0.0, "order": [0, 1, 2, 3]}
    ours = CvAugment("light").apply(image, p)
    tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    theirs = TF.adjust_contrast(TF.adjust_brightness(tensor, 1.1), 0.9).permute(1, 2, 0).numpy()
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    grey = 0.2989 * 250 + (0.587 + 0.114) * 20
    unclamped = 0.9 * 1.1 * 250 + 0.1 * 1.1 * grey  # clamped only at the end: 19 levels higher
    assert unclamped > 255 and abs(float(ours[0, 0, 0]) - unclamped) > 5
    # the order matters: contrast first, then brightness, is another picture
    other = CvAugment("light").apply(image, {**p, "order": [1, 0, 2, 3]})
    assert not np.array_equal(other, ours)


@pytest.mark.parametrize("preset", ["light", "strong"])
def test_parameters_per_seed_follow_torchvision(preset):
    n = 1500
    image = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
    cv = CvAugment(preset)
    ours = [cv.params(seed) for seed in range(n)]
    theirs = [replay_preset(preset, image, 50_000 + i) for i in range(n)]
    for key in ("angle", "brightness", "contrast", "saturation", "hue", "scale"):
        a, b = np.array([p[key] for p in ours]), np.array([p[key] for p in theirs])
        if b.std() == 0:
            assert np.allclose(a, b[0]), key
            continue
        assert stats.ks_2samp(a, b).pvalue > 1e-3, key
    # one image's draw is the first row of the batched path's draw under the same seed
    first = sample_params(PRESETS[preset], 1, torch.Generator().manual_seed(17))
    assert cv.params(17)["angle"] == pytest.approx(float(first["angle"][0]))


def test_the_dataset_turns_each_sample_by_its_own_seed(fundus_images, tmp_path):
    paths = []
    for i, im in enumerate(fundus_images[:3]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(im).save(paths[-1])
    ds = FundusDataset(paths, [0, 1, 2], Preprocess(size=SIZE), "light", engine="opencv")
    a, b, c = ds[(1, 5)][0], ds[(1, 5)][0], ds[(1, 6)][0]
    assert a.dtype == torch.uint8 and a.shape == (3, SIZE, SIZE)
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain = FundusDataset(paths, [0, 1, 2], Preprocess(size=SIZE), "none", engine="opencv")[(1, 5)][0]
    assert not torch.equal(a, plain)
