"""``--decode gpu``: workers hand over JPEG bytes and the device decodes each batch.

``torchvision.io.decode_jpeg`` also runs on the CPU, so the whole bytes path (which files go
as bytes, the batched decode, the resize, the mixed batches) is checked here against the CPU
path; only nvJPEG itself needs a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from retinocli.cli import app
from retinocli.engine.dataset import IGNORE, EpochSampler, FundusDataset, make_loader
from retinocli.engine.jpeg_decode import JpegBatch, JpegBytesDataset, JpegCollate, check_gpu_decode, jpeg_bytes, squash
from retinocli.errors import RetinoError
from retinocli.imaging.preprocess import Preprocess, load_and_prepare

SIZE = 32


def fundus_like(size: int, seed: int) -> np.ndarray:
    """A smooth photo (a lit disc with a gradient), so resampling filters agree on it."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    disc = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.2).astype(np.float64)
    rng = np.random.default_rng(seed)
    out = np.stack([disc * (150 + 80 * xx), disc * (60 + 60 * yy), disc * 30 + 10 * rng.random()], -1)
    return out.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    paths = {}
    for i, size in enumerate((96, 96, 128, 64)):
        paths[f"jpeg{i}"] = root / f"p{i}.jpg"
        Image.fromarray(fundus_like(size, i)).save(paths[f"jpeg{i}"], quality=95)
    paths["png"] = root / "p.png"
    Image.fromarray(fundus_like(80, 9)).save(paths["png"])
    paths["grey"] = root / "g.jpg"
    Image.fromarray(fundus_like(96, 5)[..., 0]).save(paths["grey"], quality=95)
    paths["cmyk"] = root / "c.jpg"
    Image.fromarray(fundus_like(96, 6)).convert("CMYK").save(paths["cmyk"], quality=95)
    paths["turned"] = root / "t.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(fundus_like(96, 7)[:, :80]).save(paths["turned"], quality=95, exif=exif)
    data = paths["jpeg0"].read_bytes()
    paths["truncated"] = root / "cut.jpg"
    paths["truncated"].write_bytes(data[: len(data) // 2])
    return paths


def test_only_plain_jpegs_travel_as_bytes(photos):
    for key in ("jpeg0", "jpeg2", "grey"):
        data = jpeg_bytes(photos[key])
        assert data is not None and data.dtype == torch.uint8 and bytes(data.numpy()) == photos[key].read_bytes()
    for key in ("png", "cmyk", "turned", "truncated"):
        assert jpeg_bytes(photos[key]) is None, key  # PIL on the CPU handles these


def test_a_batch_decodes_to_what_the_cpu_path_makes(photos):
    prep = Preprocess(size=SIZE)
    keys = ["jpeg0", "png", "jpeg1", "jpeg2", "grey", "cmyk", "turned", "jpeg3", "truncated"]
    paths = [str(photos[k]) for k in keys]
    dataset = JpegBytesDataset(paths, list(range(len(keys))), prep)
    loader = make_loader(dataset, EpochSampler(len(keys), shuffle=False), batch_size=len(keys), workers=0,
                         pin_memory=False, collate_fn=JpegCollate(SIZE))
    batch, targets = next(iter(loader))
    assert isinstance(batch, JpegBatch) and len(batch) == len(keys)
    assert targets.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, IGNORE]  # the truncated file, as FundusDataset says
    images = batch.to("cpu")
    assert images.shape == (len(keys), 3, SIZE, SIZE) and images.dtype == torch.uint8 and batch.failed == []
    reference = FundusDataset(paths, [0] * len(keys), prep)
    for i, key in enumerate(keys):
        expected = reference[i][0]
        diff = (images[i].int() - expected.int()).abs()
        if key in ("png", "cmyk", "turned", "truncated"):  # decoded by the worker: the very same pixels
            assert torch.equal(images[i], expected), key
        else:  # libjpeg + antialiased interpolate against PIL's decode + resize of a smooth photo
            assert diff.float().mean() < 2.0 and diff.max() <= 40, (key, diff.float().mean(), diff.max())
    # the grey JPEG comes out as three equal channels, as PIL's convert("RGB") gives
    grey = images[keys.index("grey")]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_squash_matches_pil_on_a_smooth_image():
    """The GPU resize (antialiased bilinear) against PIL's bilinear resize, worked independently."""
    arr = fundus_like(128, 0)
    ours = squash(torch.from_numpy(arr).permute(2, 0, 1)[None], SIZE)[0].permute(1, 2, 0).numpy()
    pil = np.asarray(Image.fromarray(arr).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
    assert np.abs(ours.astype(int) - pil.astype(int)).mean() < 1.5
    same = torch.from_numpy(arr[:SIZE, :SIZE]).permute(2, 0, 1)[None]
    assert squash(same, SIZE) is same  # already the size: untouched


def test_a_jpeg_the_decoder_refuses_is_left_black_and_the_rest_decoded(photos):
    """One bad member must not lose the batch: the batched call fails, then each is tried alone."""
    garbage = torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"\xff\xd9"), dtype=torch.uint8)
    good = jpeg_bytes(photos["jpeg1"])
    assert good is not None
    batch = JpegBatch([good, garbage], SIZE)
    out = batch.to("cpu")
    ref = torch.from_numpy(load_and_prepare(photos["jpeg1"], Preprocess(size=SIZE))).permute(2, 0, 1)
    assert (out[0].int() - ref.int()).abs().float().mean() < 2.0
    assert batch.failed == [1] and out[1].eq(0).all()


def test_gpu_decoding_needs_cuda_and_the_batched_device_path():
    prep = Preprocess(size=SIZE)
    with pytest.raises(RetinoError, match="--decode gpu needs a CUDA device"):
        check_gpu_decode(torch.device("cpu"), prep, "light", "device")
    cuda = torch.device("cuda", 0)
    with pytest.raises(RetinoError, match="--preprocess none"):
        check_gpu_decode(cuda, Preprocess(size=SIZE, mode="crop"), "light", "device")
    with pytest.raises(RetinoError, match="add --augment-on device"):
        check_gpu_decode(cuda, prep, "light", "workers")
    check_gpu_decode(cuda, prep, "none", "workers")  # nothing to augment: fine
    check_gpu_decode(cuda, prep, "strong", "device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_train_decode_gpu_without_cuda_is_one_error_line(synth_data, tmp_path):
    result = CliRunner().invoke(app, ["train", "--data", str(synth_data), "--img-size", "32", "--epochs", "1",
                                      "--decode", "gpu", "--augment-on", "device", "--project", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --decode gpu needs a CUDA device")
    assert "CUDA is not available" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_nvjpeg_decodes_like_the_cpu(photos):
    keys = ["jpeg0", "jpeg1", "jpeg2", "grey", "png"]
    items = [jpeg_bytes(photos[k]) for k in keys[:-1]]
    items.append(torch.from_numpy(load_and_prepare(photos["png"], Preprocess(size=SIZE))).permute(2, 0, 1))
    on_gpu = JpegBatch(items, SIZE).to("cuda").cpu()
    on_cpu = JpegBatch(items, SIZE).to("cpu")
    assert on_gpu.shape == on_cpu.shape
    assert (on_gpu.int() - on_cpu.int()).abs().float().mean() < 1.5  # nvJPEG's IDCT is not libjpeg's
