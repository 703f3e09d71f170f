"""Tests for retinocli.imaging.preprocess: settings, safe loading, fundus crop, Graham, normalisation."""

from __future__ import annotations

import io
import json
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retinocli.data.files import IMAGE_EXTENSIONS
from retinocli.errors import RetinoError
from retinocli.imaging.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODES,
    Preprocess,
    crop_fundus,
    fundus_bbox,
    graham,
    load_and_prepare,
    load_image,
    normalize,
    prepare,
    to_batch,
)

DATA = Path(__file__).parents[1].parent / "shared" / "data"
KAGGLE = DATA / "kaggle-sample10" / "train"
IDRID = DATA / "idrid" / "B. Disease Grading" / "1. Original Images" / "a. Training Set"


def disc_frame(w: int, h: int, cx: int, cy: int, r: int, colour=(180, 90, 40)) -> np.ndarray:
    """Black HxWx3 frame with a flat disc; pixel centres within r of (cx, cy) are lit."""
    y, x = np.ogrid[:h, :w]
    arr = np.zeros((h, w, 3), np.uint8)
    arr[(x - cx) ** 2 + (y - cy) ** 2 <= r * r] = colour
    return arr


def content_bbox(arr: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(arr.max(axis=2) > 0)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# --------------------------------------------------------------------------- Preprocess


def test_preprocess_defaults_and_json_round_trip():
    p = Preprocess()
    assert (p.size, p.mode, p.interpolation) == (512, "none", "bilinear")
    assert p.mean == IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert p.std == IMAGENET_STD == (0.229, 0.224, 0.225)

    q = Preprocess(
        size=384, mode="graham", mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1), interpolation="bicubic"
    )
    back = Preprocess.from_dict(json.loads(json.dumps(q.to_dict())))
    assert back == q
    assert back.std == (0.25, 0.5, 1.0)
    assert q.to_dict() == {
        "size": 384,
        "mode": "graham",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.5, 1.0],
        "interpolation": "bicubic",
    }


def test_from_dict_ignores_unknown_keys_and_fills_defaults():
    p = Preprocess.from_dict({"size": 256, "mode": "crop", "arch": "resnet50", "future": 1})
    assert p == Preprocess(size=256, mode="crop")


@pytest.mark.parametrize(
    ("d", "field"),
    [
        ({"size": 4}, "preprocess.size"),
        ({"size": "512"}, "preprocess.size"),
        ({"size": True}, "preprocess.size"),
        ({"mode": "clahe"}, "preprocess.mode"),
        ({"std": [0.2, 0.0, 0.2]}, "preprocess.std"),
        ({"std": [0.2, -1, 0.2]}, "preprocess.std"),
        ({"mean": [0.5, 0.5]}, "preprocess.mean"),
        ({"mean": "abc"}, "preprocess.mean"),
        ({"interpolation": "cubic"}, "preprocess.interpolation"),
    ],
)
def test_from_dict_rejects_bad_values_naming_the_field(d, field):
    with pytest.raises(RetinoError) as err:
        Preprocess.from_dict(d)
    msg = str(err.value)
    assert msg.startswith(field) and "\n" not in msg


def test_constants():
    assert set(IMAGE_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
    assert MODES == ("none", "crop", "graham")


# --------------------------------------------------------------------------- load_image: modes


def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_load_grey_l(tmp_path):
    out = load_image(save(Image.new("L", (8, 6), 100), tmp_path / "l.png"))
    assert out.mode == "RGB" and out.size == (8, 6)
    assert out.getpixel((3, 3)) == (100, 100, 100)


def test_load_la_composites_on_black(tmp_path):
    arr = np.zeros((4, 3, 2), np.uint8)
    arr[..., 0] = 200
    arr[:, 0, 1], arr[:, 1, 1], arr[:, 2, 1] = 255, 0, 128
    out = load_image(save(Image.fromarray(arr, "LA"), tmp_path / "la.png"))
    assert out.getpixel((0, 0)) == (200, 200, 200)
    assert out.getpixel((1, 0)) == (0, 0, 0)
    assert all(abs(v - 100) <= 1 for v in out.getpixel((2, 0)))


def test_load_rgba_composites_on_black(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[...] = (200, 100, 50, 128)
    arr[0, 0] = (255, 255, 255, 0)
    out = load_image(save(Image.fromarray(arr, "RGBA"), tmp_path / "rgba.png"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (0, 0, 0)
    assert np.allclose(out.getpixel((2, 2)), (100, 50, 25), atol=1)


def test_load_palette_with_transparency(tmp_path):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([255, 255, 255, 10, 200, 30] + [0] * (254 * 3))
    im.putpixel((0, 0), 0)
    path = save(im, tmp_path / "p.png", transparency=0)  # white index 0 is transparent
    assert Image.open(path).info.get("transparency") == 0
    out = load_image(path)
    assert out.getpixel((0, 0)) == (0, 0, 0)
    assert out.getpixel((1, 1)) == (10, 200, 30)


def test_load_palette_without_transparency(tmp_path):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([255, 255, 255, 10, 200, 30] + [0] * (254 * 3))
    out = load_image(save(im, tmp_path / "p.bmp"))
    assert out.getpixel((2, 2)) == (10, 200, 30)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ((0, 2048, 4095), (0, 128, 255)),  # a 12-bit sensor: scaled by 4095, not clipped at 255
        ((0, 32768, 65535), (0, 128, 255)),  # full 16 bits
        ((0, 100, 255), (0, 100, 255)),  # 8-bit values stored in 16 bits stay as they are
    ],
)
def test_load_16bit_png_scales_by_bit_range(tmp_path, values, expected):
    arr = np.array([values] * 2, dtype=np.uint16)
    path = save(Image.fromarray(arr), tmp_path / "g16.png")
    assert Image.open(path).mode in ("I;16", "I")
    out = np.asarray(load_image(path))
    assert out.shape == (2, 3, 3)
    assert tuple(out[0, :, 0]) == expected
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_load_16bit_big_endian_tiff(tmp_path):
    arr = np.array([[0, 1023, 4095]], dtype=">u2")
    im = Image.frombuffer("I;16B", (3, 1), arr.tobytes(), "raw", "I;16B", 0, 1)
    path = save(im, tmp_path / "g16b.tif")
    assert tuple(np.asarray(load_image(path))[0, :, 0]) == (0, 64, 255)


def test_load_float_tiff(tmp_path):
    im = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    path = save(im, tmp_path / "f.tif")
    assert tuple(np.asarray(load_image(path))[0, :, 0]) == (0, 128, 255)


def test_load_cmyk_jpeg(tmp_path):
    path = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    out = load_image(path)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((8, 8))
    assert r > 240 and g < 15 and b < 15


def test_load_ycbcr_and_bilevel(tmp_path):
    ycc = Image.new("RGB", (8, 8), (10, 200, 30)).convert("YCbCr")
    out = load_image(save(ycc, tmp_path / "ycc.tif"))
    assert np.allclose(out.getpixel((4, 4)), (10, 200, 30), atol=3)
    bi = Image.new("1", (8, 8), 1)
    assert load_image(save(bi, tmp_path / "bi.png")).getpixel((0, 0)) == (255, 255, 255)


def test_load_applies_exif_orientation(tmp_path):
    # 40 wide x 20 high, a red 8x8 block in the stored top-left corner.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = save(Image.fromarray(arr), tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)  # turned upright: now 20 wide, 40 high
    # Rotating 90 degrees clockwise moves the top-left corner to the top-right.
    r, g, b = out.getpixel((16, 3))
    assert r > 200 and g < 40 and b < 40
    assert max(out.getpixel((3, 3))) < 40
    assert max(out.getpixel((16, 36))) < 40


# --------------------------------------------------------------------------- load_image: refusals


def png_claiming(tmp_path: Path, width: int, height: int) -> Path:
    """A real 1x1 PNG whose IHDR is patched to claim width x height (with a valid CRC)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(data))
    return path


def test_decompression_bomb_header_refused(tmp_path):
    path = png_claiming(tmp_path, 100_000, 100_000)
    with pytest.raises(RetinoError, match="image too large.*decompression bomb"):
        load_image(path)


def test_max_pixels_checked_before_decoding(tmp_path):
    # The header claims 20000 x 1000 = 20 M pixels (under PIL's own limit) but no pixel
    # data follows: a decoder would report a truncated or broken file, our guard must
    # answer first.
    path = png_claiming(tmp_path, 20_000, 1_000)
    msg = r"image too large: 20000 x 1000 pixels \(decompression bomb guard\)"
    with pytest.raises(RetinoError, match=msg):
        load_image(path, max_pixels=10_000_000)
    with pytest.raises(RetinoError) as err:
        load_image(path)  # allowed size, so decoding starts and fails
    assert "image too large" not in str(err.value)


def test_max_pixels_on_small_image(tmp_path):
    path = save(Image.new("RGB", (64, 48)), tmp_path / "small.png")
    with pytest.raises(RetinoError, match="64 x 48 pixels"):
        load_image(path, max_pixels=1000)
    assert load_image(path, max_pixels=64 * 48).size == (64, 48)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(RetinoError, match="empty file"):
        load_image(path)


def test_text_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("grade 2, left eye\n")
    with pytest.raises(RetinoError, match="cannot identify image file"):
        load_image(path)


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    whole = save(noisy, tmp_path / "whole.jpg", quality=90).read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(RetinoError, match="truncated image"):
        load_image(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(RetinoError, match="file not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(RetinoError, match="not a file"):
        load_image(tmp_path)


def test_draft_decodes_large_jpeg_at_reduced_size(tmp_path):
    path = save(Image.new("RGB", (3000, 2000), (120, 60, 30)), tmp_path / "big.jpg")
    drafted = load_image(path, target=256)
    assert drafted.size[0] < 3000
    assert min(drafted.size) >= 512
    assert drafted.size == (1500, 1000)
    assert load_image(path).size == (3000, 2000)
    assert load_image(path, target=1500).size == (3000, 2000)  # not much larger: full decode


# --------------------------------------------------------------------------- fundus crop


def test_fundus_bbox_disc_with_noise_and_label():
    arr = disc_frame(400, 300, cx=250, cy=140, r=100)
    rng = np.random.default_rng(1)
    arr = np.maximum(arr, rng.integers(0, 10, arr.shape, dtype=np.uint8))  # sensor noise
    ys, xs = rng.integers(0, 300, 100), rng.integers(0, 400, 100)
    arr[ys, xs] = 255  # hot pixels
    arr[285:291, 5:15] = 255  # a small text label in a corner
    x0, y0, x1, y1 = fundus_bbox(arr)
    assert np.allclose((x0, y0, x1, y1), (150, 40, 351, 241), atol=2)


def test_fundus_bbox_nothing_bright_is_whole_image():
    assert fundus_bbox(np.zeros((30, 50, 3), np.uint8)) == (0, 0, 50, 30)
    assert fundus_bbox(np.full((30, 50), 5, np.uint8)) == (0, 0, 50, 30)


def test_crop_fundus_off_centre_disc_becomes_centred_square():
    img = Image.fromarray(disc_frame(400, 300, cx=250, cy=140, r=100))
    out = crop_fundus(img)
    assert out.size[0] == out.size[1]
    assert abs(out.size[0] - 201) <= 2
    assert np.allclose(content_bbox(np.asarray(out)), (0, 0, 201, 201), atol=2)


def test_crop_fundus_pads_a_circle_cut_top_and_bottom():
    # Kaggle style: the circle is wider than the photo is high.
    img = Image.fromarray(disc_frame(400, 200, cx=200, cy=100, r=120))
    out = crop_fundus(img)
    side = out.size[0]
    assert out.size == (side, side) and abs(side - 241) <= 2  # a 1-pixel tip may be trimmed
    x0, y0, x1, y1 = content_bbox(np.asarray(out))
    assert (x0, x1) == (0, side)
    assert (y0, y1) == ((side - 200) // 2, (side - 200) // 2 + 200)  # 200 rows, centred


def test_crop_fundus_large_image_uses_reduced_copy_within_factor():
    img = Image.fromarray(disc_frame(2400, 1600, cx=1300, cy=800, r=700))
    out = crop_fundus(img)
    assert abs(out.size[0] - 1401) <= 4 and out.size[0] == out.size[1]


# --------------------------------------------------------------------------- Graham


def test_graham_flat_image_is_mid_grey_inside_black_outside():
    size = 96
    out = graham(np.full((size, size, 3), 120, np.uint8), size)
    assert out.dtype == np.uint8 and out.shape == (size, size, 3)
    y, x = np.ogrid[:size, :size]
    d2 = (x - (size - 1) / 2) ** 2 + (y - (size - 1) / 2) ** 2
    inside, outside = d2 <= (0.85 * size / 2) ** 2, d2 > (0.9 * size / 2) ** 2
    assert abs(out[inside].mean() - 128) <= 10
    assert (out[outside] == 0).all()
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[size // 2, size // 2].tolist() == [128, 128, 128]


def test_graham_amplifies_local_contrast():
    size = 96
    arr = np.full((size, size, 3), 100, np.uint8)
    arr[44:52, 44:52] = 140  # a small bright lesion
    out = graham(arr, size)
    assert out[48, 48, 0] > 180  # 4 * (140 - blurred) + 128, blurred about 124
    assert abs(int(out[20, 48, 0]) - 128) <= 8


# --------------------------------------------------------------------------- prepare / normalize


@pytest.mark.parametrize("mode", MODES)
def test_prepare_shapes_every_mode(mode):
    img = Image.fromarray(disc_frame(300, 200, cx=140, cy=100, r=90))
    out = prepare(img, Preprocess(size=64, mode=mode))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out.flags.writeable


def test_prepare_none_squashes_and_crop_fills():
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :100] = (255, 0, 0)
    arr[:, 100:] = (0, 0, 255)
    out = prepare(Image.fromarray(arr), Preprocess(size=32, mode="none"))
    assert out[16, 2].tolist() == [255, 0, 0] and out[16, 29].tolist() == [0, 0, 255]

    disc = Image.fromarray(disc_frame(300, 200, cx=100, cy=100, r=60))
    crop = prepare(disc, Preprocess(size=64, mode="crop"))
    assert np.allclose(content_bbox(crop), (0, 0, 64, 64), atol=1)


def test_normalize_known_pixel_and_layout():
    arr = np.zeros((2, 3, 3), np.uint8)
    arr[1, 2] = (255, 0, 128)
    out = normalize(arr, Preprocess())
    assert out.dtype == np.float32 and out.shape == (3, 2, 3) and out.flags.c_contiguous
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert np.allclose(out[:, 1, 2], expected, atol=1e-5)
    assert np.allclose(out[:, 0, 0], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], atol=1e-5)

    p = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert np.allclose(normalize(arr, p)[:, 1, 2], [1.0, -1.0, 128 / 255 * 2 - 1], atol=1e-5)


def test_to_batch_matches_normalize():
    rng = np.random.default_rng(2)
    imgs = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    p = Preprocess(mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))
    batch = to_batch(imgs, p)
    assert batch.dtype == np.float32 and batch.shape == (3, 3, 8, 8) and batch.flags.c_contiguous
    for i, im in enumerate(imgs):
        assert np.allclose(batch[i], normalize(im, p), atol=1e-6)
    assert np.allclose(to_batch(imgs), np.stack([normalize(im, Preprocess()) for im in imgs]))


def test_preprocess_module_does_not_import_torch():
    import subprocess

    code = "import sys, retinocli.imaging.preprocess; print('torch' in sys.modules)"
    repo = Path(__file__).parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo
    )
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- real photos + speed


def images_per_second(paths: list[Path], p: Preprocess, repeats: int = 1) -> float:
    load_and_prepare(paths[0], p)  # warm caches and lazy imports
    start = time.perf_counter()
    for _ in range(repeats):
        for path in paths:
            load_and_prepare(path, p)
    return repeats * len(paths) / (time.perf_counter() - start)


def make_512_jpegs(tmp_path: Path, n: int = 24) -> list[Path]:
    """512x512 fundus JPEGs: from IDRiD photos when present, else textured synthetic discs."""
    sources = sorted(IDRID.glob("*.jpg"))[:n] if IDRID.is_dir() else []
    rng = np.random.default_rng(3)
    paths = []
    for i in range(n):
        if sources:
            img = Image.open(sources[i % len(sources)]).convert("RGB").resize((512, 512))
        else:
            arr = disc_frame(512, 512, 256, 256, 240).astype(np.int16)
            arr += rng.integers(-20, 20, arr.shape, dtype=np.int16) * (arr > 0)
            img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        paths.append(save(img, tmp_path / f"{i}.jpeg", quality=90))
    return paths


def test_throughput_512px_jpegs(tmp_path, capsys):
    paths = make_512_jpegs(tmp_path)
    rates = {m: images_per_second(paths, Preprocess(size=512, mode=m), repeats=3) for m in MODES}
    for m in MODES:
        assert load_and_prepare(paths[0], Preprocess(size=512, mode=m)).shape == (512, 512, 3)
    with capsys.disabled():
        print(
            "\nload_and_prepare, 512 px JPEGs, one core: "
            + ", ".join(f"{m} {r:.0f} img/s" for m, r in rates.items())
        )


@pytest.mark.skipif(not KAGGLE.is_dir(), reason="shared Kaggle sample photos not present")
def test_kaggle_full_size_photos(capsys):
    paths = sorted(KAGGLE.glob("*.jpeg"))
    p = Preprocess(size=512, mode="crop")
    for path in paths[:2]:
        out = load_and_prepare(path, p)
        assert out.shape == (512, 512, 3)
        assert out[:8, :8].max() < 20  # corners are background
        assert out[256, 256].max() > 40  # the centre is retina
    rates = {m: images_per_second(paths, Preprocess(size=512, mode=m)) for m in ("none", "crop")}
    with capsys.disabled():
        print("\nload_and_prepare, Kaggle 2592x1944-4928x3264 photos, target 512, one core: "
              + ", ".join(f"{m} {r:.1f} img/s" for m, r in rates.items()))


@pytest.mark.skipif(not IDRID.is_dir(), reason="shared IDRiD photos not present")
def test_idrid_crop_is_a_round_fundus():
    path = sorted(IDRID.glob("*.jpg"))[0]
    img = load_image(path, target=512)
    assert img.size == (1024, 680)
    out = crop_fundus(img)
    assert out.size[0] == out.size[1] and 780 <= out.size[0] <= 880  # the circle, not the frame
