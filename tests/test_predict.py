"""Tests for retinocli.deploy.onnx_model and retinocli.deploy.predict: metadata, the grader, folders, resume.

The models are built here with onnx.helper, no torch: images -> GlobalAveragePool ->
Flatten -> Gemm (3 -> 5, fixed weights) -> logits -> Softmax -> probs, small enough to
recompute in numpy.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from retinocli import GRADE_NAMES
from retinocli.errors import RetinoError
from retinocli.deploy import schema
from retinocli.deploy.predict import PredictSummary, decode_batches, find_images, predict_folder
from retinocli.reporting.render import render_predict_summary
from retinocli.imaging.preprocess import Preprocess, load_and_prepare, to_batch
from retinocli.rundir import newest_model
from retinocli.deploy.metadata import (META_PREFIX, ModelInfo, load_model_file, metadata_props, parse_metadata,
                                       read_model_info, set_metadata)
from retinocli.deploy.onnx_model import OnnxGrader
from retinocli.deploy.providers import CPU, nvidia_gpu_present, provider_options, resolve_providers

from builders import B, INFO, SIZE, W, build_tiny_onnx, png_claiming, write_image

REPO = Path(__file__).resolve().parents[1]


def reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tiny graph in numpy, float64."""
    logits = x.astype(np.float64).mean(axis=(2, 3)) @ W.astype(np.float64) + B
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return logits, e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return build_tiny_onnx(tmp_path_factory.mktemp("model") / "model.onnx")


@pytest.fixture(scope="module")
def grader(model_path) -> OnnxGrader:
    return OnnxGrader(model_path, "cpu", threads=1)


def save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- metadata


def test_metadata_round_trip_is_exact(tmp_path):
    props = metadata_props(INFO)
    assert all(k.startswith(META_PREFIX) and isinstance(v, str) for k, v in props.items())
    assert props["retino.format"] == "1"
    assert props["retino.epoch"] == "7"
    assert json.loads(props["retino.grade_names"]) == list(GRADE_NAMES)
    info = parse_metadata(props, "m.onnx")
    assert info.to_dict() == {**INFO, "path": "m.onnx"}
    assert info.preprocess == Preprocess(size=SIZE, mode="none")
    assert info.grade_names == GRADE_NAMES and info.num_grades == 5
    assert metadata_props(info.to_dict()) == props

    # Through a file, next to metadata that is not ours, which survives.
    path = build_tiny_onnx(tmp_path / "m.onnx", info={"epoch": None, "metrics": {}})
    model = onnx.load(str(path))
    model.metadata_props.add(key="producer_note", value="kept")
    set_metadata(model, {**INFO, "weights": "none"})
    onnx.save(model, str(path))
    keys = [p.key for p in onnx.load(str(path)).metadata_props]
    assert keys.count("retino.format") == 1 and "producer_note" in keys
    assert read_model_info(path).to_dict() == {**INFO, "weights": "none", "path": str(path)}


def test_metadata_defaults_and_numpy_metrics():
    props = metadata_props({"grade_names": ["no", "yes"], "preprocess": Preprocess(size=32),
                            "metrics": {"n": np.int64(3), "f1": np.array([0.5, 0.25])}})
    info = parse_metadata(props, "x.onnx")
    assert info.metrics == {"n": 3, "f1": [0.5, 0.25]}
    assert (info.epoch, info.weights, info.precision, info.arch) == (None, "none", "fp32", "")
    assert info.version == "0.1.0" and info.exported[:2] == "20"
    with pytest.raises(ValueError, match="unknown field"):
        metadata_props({**INFO, "colour": "red"})
    with pytest.raises(ValueError, match="grade_names is required"):
        metadata_props({"preprocess": {}})


def test_metadata_names_no_paths():
    """A model travels: its metadata names the run and checkpoint, never where they were."""
    with pytest.raises(ValueError, match="run must be a name, not a path"):
        metadata_props({**INFO, "run": "/home/alice/runs/exp1"})
    with pytest.raises(ValueError, match="checkpoint must be a name, not a path"):
        metadata_props({**INFO, "checkpoint": "runs\\exp1\\best.pt"})
    # Models exported before kept absolute paths: only the names are read from them.
    old = _props(run="/home/alice/runs/exp1", checkpoint="/home/alice/runs/exp1/best.pt", checkpoint_sha256=None)
    info = parse_metadata(old, "m.onnx")
    assert (info.run, info.checkpoint, info.checkpoint_sha256) == ("exp1", "best.pt", "")


def _props(**change) -> dict:
    props = metadata_props(INFO)
    for key, value in change.items():
        if value is None:
            props.pop(META_PREFIX + key)
        else:
            props[META_PREFIX + key] = value
    return props


@pytest.mark.parametrize("props, message", [
    ({}, "m.onnx has no retino metadata; export it with `retino export`"),
    ({"producer": "torch"}, "m.onnx has no retino metadata"),
    (_props(format=None), "m.onnx has no retino metadata"),
    (_props(format="2"), "format '2' is not supported"),
    (_props(preprocess=None), "m.onnx: the retino metadata lacks retino.preprocess"),
    (_props(grade_names=None), "lacks retino.grade_names"),
    (_props(grade_names='["No DR", "Mild"'), "m.onnx: retino.grade_names is not valid JSON"),
    (_props(grade_names="__import__('os').system('echo hi')"), "grade_names is not valid JSON"),
    (_props(grade_names="[]"), "grade_names must be a non-empty JSON list of strings"),
    (_props(grade_names="[1, 2]"), "grade_names must be a non-empty JSON list of strings"),
    (_props(preprocess="{size: 16}"), "m.onnx: retino.preprocess is not valid JSON"),
    (_props(preprocess='{"size": 2}'), "m.onnx: retino.preprocess: preprocess.size must be"),
    (_props(preprocess='{"mode": "blur"}'), "retino.preprocess: preprocess.mode must be one of"),
    (_props(preprocess="[16]"), "retino.preprocess: preprocess settings must be a mapping"),
    (_props(metrics="[0.5]"), "retino.metrics must be a JSON object"),
    (_props(epoch="seven"), "retino.epoch must be an integer"),
    (_props(precision="fp8"), "retino.precision must be one of fp32, fp16, int8"),
    (_props(checkpoint_sha256="not-a-hash"), "retino.checkpoint_sha256 must be 64 hex digits"),
])
def test_bad_metadata_is_one_clear_line(props, message):
    with pytest.raises(RetinoError) as err:
        parse_metadata(props, "m.onnx")
    text = str(err.value)
    assert message in text
    assert text.startswith("m.onnx") and "\n" not in text


def test_load_model_file_refuses_what_is_not_a_model(tmp_path, model_path):
    assert load_model_file(model_path).graph.name == "tiny"
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    photo = write_image(tmp_path / "photo.png")
    (tmp_path / "empty.onnx").write_bytes(b"")
    broken = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["nowhere"], ["y"])], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    broken.ir_version = 9
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    cases = {
        text: "notes.onnx is not an ONNX model file (",
        photo: "photo.png is not an ONNX model file (",
        tmp_path / "empty.onnx": "empty.onnx: empty file, not an ONNX model",
        tmp_path / "broken.onnx": "broken.onnx is not a valid ONNX model (",
        tmp_path / "missing.onnx": "missing.onnx: file not found",
        tmp_path: "is a folder, not an ONNX model file",
    }
    for path, message in cases.items():
        with pytest.raises(RetinoError) as err:
            load_model_file(path)
        assert message in str(err.value) and "\n" not in str(err.value)

    bare = build_tiny_onnx(tmp_path / "bare.onnx", info=False)
    with pytest.raises(RetinoError, match=r"bare\.onnx has no retino metadata; export it"):
        OnnxGrader(bare, "cpu")


def test_newest_model(tmp_path):
    with pytest.raises(RetinoError, match="no exported model under .*runs/; run `retino export` first"):
        newest_model(tmp_path / "runs")
    old = build_tiny_onnx(tmp_path / "runs" / "a" / "model.onnx")
    new = build_tiny_onnx(tmp_path / "runs" / "b" / "deep" / "model-fp16.onnx", fp16=True)
    os.utime(old, (1_000_000, 1_000_000))
    os.utime(new, (2_000_000, 2_000_000))
    assert newest_model(tmp_path / "runs") == new
    os.utime(old, (3_000_000, 3_000_000))
    assert newest_model(tmp_path / "runs") == old


# --------------------------------------------------------------------------- the grader


@pytest.mark.parametrize("n", [1, 7])
def test_grader_equals_numpy(grader, n):
    x = np.random.default_rng(n).normal(0, 1.5, (n, 3, SIZE, SIZE)).astype(np.float32)
    logits, probs = grader.run(x)
    want_logits, want_probs = reference(x)
    assert logits.dtype == probs.dtype == np.float32
    assert logits.shape == probs.shape == (n, 5)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5)
    np.testing.assert_allclose(probs, want_probs, atol=1e-5)
    # uint8 images in, through the model's own preprocessing.
    images = [np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
              for i in range(n)]
    want = reference(to_batch(images, grader.info.preprocess))[1]
    np.testing.assert_allclose(grader.predict(images), want, atol=1e-5)
    np.testing.assert_allclose(grader.predict(np.stack(images)), want, atol=1e-5)


def test_grader_attributes_and_edges(grader, model_path):
    assert grader.provider == CPU and grader.notes == []
    assert grader.info.path == model_path and grader.grade_names == GRADE_NAMES
    assert grader.input_dtype == np.float32
    assert grader.predict([]).shape == (0, 5)
    assert grader.run(np.zeros((0, 3, SIZE, SIZE), np.float32))[1].shape == (0, 5)
    with pytest.raises(ValueError, match=r"shape \(n, 3, 16, 16\)"):
        grader.run(np.zeros((1, 3, 8, 8), np.float32))


def test_fp16_model_casts_in_and_out(tmp_path):
    g = OnnxGrader(build_tiny_onnx(tmp_path / "half.onnx", fp16=True), "cpu")
    assert g.input_dtype == np.float16 and g.info.precision == "fp16"
    x = np.random.default_rng(0).normal(0, 1, (3, 3, SIZE, SIZE)).astype(np.float32)
    logits, probs = g.run(x)
    assert logits.dtype == probs.dtype == np.float32
    want_logits, want_probs = reference(x.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(logits, want_logits, atol=2e-2)
    np.testing.assert_allclose(probs, want_probs, atol=2e-3)


def test_grader_checks_the_graph_against_its_metadata(tmp_path):
    renamed = build_tiny_onnx(tmp_path / "renamed.onnx", input_name="x")
    with pytest.raises(RetinoError, match="expected one input 'images' and outputs 'logits' and 'probs'"):
        OnnxGrader(renamed, "cpu")
    # The graph takes 32 px while the metadata says 16.
    mismatch = build_tiny_onnx(tmp_path / "mismatch.onnx", size=32, info={"preprocess": {"size": 16}})
    with pytest.raises(RetinoError, match=r"asks for \[batch, 3, 16, 16\]"):
        OnnxGrader(mismatch, "cpu")
    # A dynamic side is fine.
    assert OnnxGrader(build_tiny_onnx(tmp_path / "dyn.onnx", static_size=False), "cpu").provider == CPU


def test_model_onnxruntime_cannot_load_is_one_line(tmp_path):
    path = build_tiny_onnx(tmp_path / "new.onnx")
    model = onnx.load(str(path))
    model.ir_version = 14  # onnx 1.23's default, which onnxruntime 1.31 cannot read (max 13)
    onnx.save(model, str(path))
    try:
        OnnxGrader(path, "cpu")
        pytest.skip("this onnxruntime reads IR version 14")
    except RetinoError as exc:
        text = str(exc)
    assert text.startswith(f"{path}: ") and "IR version" in text and "\n" not in text
    assert "onnxruntime_src" not in text


def test_providers_on_this_machine(model_path):
    assert resolve_providers("cpu") == [CPU]
    assert resolve_providers(" CPU ") == [CPU]
    with pytest.raises(RetinoError, match="unknown provider 'gpu'; choose from auto, tensorrt, cuda, cpu"):
        resolve_providers("gpu")
    if nvidia_gpu_present():
        pytest.skip("this machine has an NVIDIA GPU; the CPU-only behaviour cannot be checked")
    # No GPU: auto goes straight to the CPU, without trying (and logging) CUDA.
    assert resolve_providers("auto") == [CPU]
    auto = OnnxGrader(model_path, "auto")
    assert auto.provider == CPU and auto.notes == []
    for request in ("cuda", "tensorrt"):
        with pytest.raises(RetinoError) as err:
            OnnxGrader(model_path, request)
        text = str(err.value)
        assert f"provider {request}" in text and "\n" not in text
        assert "needs an NVIDIA GPU" in text or "is not available in onnxruntime" in text


def test_gpu_provider_options(tmp_path):
    path = build_tiny_onnx(tmp_path / "m.onnx", fp16=True)
    info = read_model_info(path)
    providers, notes = provider_options(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU], info)
    (trt, trt_opts), (cuda, cuda_opts), cpu = providers
    assert (trt, cuda, cpu, notes) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", CPU, [])
    cache = Path(trt_opts["trt_engine_cache_path"])
    assert cache.is_dir() and cache.parent == tmp_path / ".trt-cache"
    assert trt_opts["trt_engine_cache_enable"] == "True" and trt_opts["trt_fp16_enable"] == "True"
    assert cuda_opts == {"cudnn_conv_algo_search": "HEURISTIC"}


# --------------------------------------------------------------------------- find_images


def test_find_images_tree_with_links_and_a_loop(tmp_path):
    root = tmp_path / "photos"
    for name in ("a.JPG", "b.png", "c.TiFf", "sub/e.Jpeg", "sub/deeper/f.bmp", ".git/x.png",
                 "sub/.hidden.jpg"):
        write_image(root / name, fmt="PNG")
    (root / "notes.txt").write_text("x")
    (root / "d.jpeg.bak").write_text("x")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # an ancestor
    (root / "alias").symlink_to(root / "sub", target_is_directory=True)  # a sibling
    (root / "link.png").symlink_to(root / "b.png")
    outside = write_image(tmp_path / "elsewhere" / "g.png").parent
    (outside / "back").symlink_to(root, target_is_directory=True)
    (root / "ext").symlink_to(outside, target_is_directory=True)

    expected = ["a.JPG", "b.png", "c.TiFf", "ext/g.png", "link.png", "sub/deeper/f.bmp",
                "sub/e.Jpeg"]
    assert find_images(root) == [root / p for p in expected]
    assert [str(p) for p in find_images(root, include_hidden=True)] == [
        str(root / p) for p in [".git/x.png", *expected[:5], "sub/.hidden.jpg", *expected[5:]]]
    # A relative spelling stays relative, and a single image is a list of one.
    rel = os.path.relpath(root, Path.cwd())
    assert find_images(rel)[0] == Path(rel) / "a.JPG"
    assert find_images(root / "b.png") == [root / "b.png"]
    with pytest.raises(RetinoError, match="no such folder"):
        find_images(tmp_path / "nope")
    with pytest.raises(RetinoError, match="notes.txt is neither a folder nor an image file"):
        find_images(root / "notes.txt")


# --------------------------------------------------------------------------- decoding


def test_decode_batches_keeps_order_and_survives_bad_files(tmp_path):
    p = Preprocess(size=SIZE)
    paths = [write_image(tmp_path / f"{i}.png", seed=i) for i in range(5)]
    (tmp_path / "bad.jpg").write_text("not a jpeg")
    paths.insert(2, tmp_path / "bad.jpg")
    paths.append(tmp_path / "missing.png")
    batches = list(decode_batches(paths, p, batch_size=3, threads=2, prefetch=1))
    assert [len(b.paths) for b in batches] == [3, 3, 1]
    assert [q for b in batches for q in b.paths] == paths
    assert batches[0].good == [paths[0], paths[1]]
    assert batches[0].errors == [(paths[2], "cannot identify image file")]
    assert batches[2].errors == [(paths[6], "file not found")]
    assert batches[2].images.shape == (0, SIZE, SIZE, 3) and batches[2].images.dtype == np.uint8
    assert batches[1].images.shape == (3, SIZE, SIZE, 3)
    for b in batches:
        for arr, q in zip(b.images, b.good):
            np.testing.assert_array_equal(arr, load_and_prepare(q, p))
    # Stopping early does not hang or leak work.
    gen = decode_batches(paths * 20, p, batch_size=2, threads=2)
    assert len(next(gen).paths) == 2
    gen.close()


def test_decoding_equals_training_input(tmp_path):
    """Prediction's pixels and floats are training's: FundusDataset, then train.to_input."""
    torch = pytest.importorskip("torch")
    from retinocli.engine.dataset import FundusDataset
    from retinocli.engine.trainer import to_input

    paths = []
    rng = np.random.default_rng(5)
    for i, (w, h) in enumerate([(120, 90), (64, 64), (75, 110)]):
        arr = np.zeros((h, w, 3), np.uint8)
        y, x = np.ogrid[:h, :w]
        disc = (x - w / 2 - i) ** 2 + (y - h / 2) ** 2 <= (0.4 * min(w, h)) ** 2
        arr[disc] = rng.integers(40, 255, (int(disc.sum()), 3))
        paths.append(save(Image.fromarray(arr), tmp_path / f"{i}.{'jpg' if i else 'png'}", quality=92))
    for mode in ("none", "crop", "graham"):
        p = Preprocess(size=24, mode=mode)
        (batch,) = decode_batches(paths, p, batch_size=8, threads=2)
        ds = FundusDataset([str(q) for q in paths], [0] * len(paths), p, "none")
        chw = torch.stack([ds[(i, 0)][0] for i in range(len(paths))])
        np.testing.assert_array_equal(batch.images, chw.permute(0, 2, 3, 1).numpy())
        mean = torch.tensor(p.mean).view(1, 3, 1, 1)
        std = torch.tensor(p.std).view(1, 3, 1, 1)
        trained = to_input(chw, torch.device("cpu"), mean, std, channels_last=False).numpy()
        np.testing.assert_allclose(to_batch(batch.images, p), trained, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- predict_folder


def zoo(folder: Path) -> dict[str, str]:
    """Every kind of file a real folder holds -> the status predict must give it."""
    rng = np.random.default_rng(7)

    def colour(c):  # a noisy image dominated by one colour, so grades differ
        base = np.array(c, np.int16) + rng.integers(-30, 30, (40, 50, 3))
        return Image.fromarray(base.clip(0, 255).astype(np.uint8))

    save(colour((230, 40, 40)), folder / "red.jpg", quality=90)
    save(colour((40, 230, 40)), folder / "green.png")
    save(colour((40, 40, 230)), folder / "blue.JPG", format="JPEG")
    save(colour((200, 200, 30)), folder / "nested" / "yellow.tif")
    save(colour((128, 0, 128)).convert("L"), folder / "grey.png")
    rgba = colour((20, 200, 200)).convert("RGBA")
    rgba.putalpha(128)
    save(rgba, folder / "rgba.png")
    save(colour((250, 120, 0)).convert("P", palette=Image.Palette.ADAPTIVE), folder / "palette.png")
    save(Image.fromarray((np.arange(40 * 50).reshape(40, 50) * 30).astype(np.uint16)),
         folder / "deep16.png")
    save(Image.new("CMYK", (30, 20), (0, 200, 200, 0)), folder / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    save(colour((90, 160, 220)), folder / "rotated.jpg", exif=exif, quality=90)
    save(colour((10, 90, 40)), folder / "png_named.jpeg", format="PNG")
    whole = (folder / "red.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("grade 2, left eye\n")
    png_claiming(folder / "nested" / "bomb.png", 100_000, 100_000)
    (folder / "labels.csv").write_text("image,level\n")
    good = ["red.jpg", "green.png", "blue.JPG", "nested/yellow.tif", "grey.png", "rgba.png",
            "palette.png", "deep16.png", "cmyk.jpg", "rotated.jpg", "png_named.jpeg"]
    bad = {"truncated.jpg": "truncated image", "empty.jpg": "empty file",
           "text.jpg": "cannot identify image file", "nested/bomb.png": "image too large"}
    return {**{str(folder / g): "ok" for g in good}, **{str(folder / b): r for b, r in bad.items()}}


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("zoo") / "photos"
    return folder, zoo(folder)


def check_rows(rows: list[dict], expected: dict[str, str], p: Preprocess, folder: Path) -> None:
    assert sorted(r["path"] for r in rows) == sorted(expected)
    for row in rows:
        assert row["image"] == Path(row["path"]).relative_to(folder).as_posix()
        want = expected[row["path"]]
        if want != "ok":
            assert row["status"] == "error" and want in row["error"], row
            assert row["predicted_grade"] in ("", None) and row["prob_0"] in ("", None)
            continue
        assert row["status"] == "ok" and row["error"] == ""
        probs = np.array([float(row[f"prob_{g}"]) for g in range(5)])
        assert abs(probs.sum() - 1) < 1e-5
        grade = int(row["predicted_grade"])
        assert grade == int(np.argmax(probs)) and row["grade_name"] == GRADE_NAMES[grade]
        assert float(row["confidence"]) == probs[grade]
        assert float(row["referable_prob"]) == pytest.approx(probs[2:].sum(), abs=1e-6)
        arr = load_and_prepare(row["path"], p)
        np.testing.assert_allclose(probs, reference(to_batch([arr], p))[1][0], atol=1e-5)


def test_predict_folder_statuses_probs_and_summary(tmp_path, grader, photo_folder, monkeypatch):
    from retinocli.events import Recorder

    folder, expected = photo_folder
    # The output under a 150+ character folder, rendered 60 columns wide: a path is never cut.
    out = tmp_path / ("a-long-folder-name-" * 8) / "preds" / "predictions.csv"
    assert len(str(out)) > 150
    seen = Recorder()
    summary = predict_folder(folder, grader, out=out, batch_size=4, threads=2, events=seen)
    rows = read_rows(out)
    assert tuple(rows[0]) == schema.PREDICT_COLUMNS == schema.columns(5, labelled=False)
    assert [r["path"] for r in rows] == [str(q) for q in find_images(folder)]
    check_rows(rows, expected, grader.info.preprocess, folder)
    assert len(rows) == 15
    assert {r["path"]: r["status"] for r in rows} == {
        k: "ok" if v == "ok" else "error" for k, v in expected.items()}

    counts = [sum(r["predicted_grade"] == str(g) for r in rows) for g in range(5)]
    assert sum(c > 0 for c in counts) >= 3  # the colours reach several grades
    assert isinstance(summary, PredictSummary)
    d = json.loads(json.dumps(summary.to_dict()))
    # one set of counts: the folder is graded + unreadable, and read now + kept
    assert {k: d[k] for k in ("out", "total", "graded", "errors", "done_now", "kept", "retried")} == {
        "out": str(out), "total": 15, "graded": 11, "errors": 4, "done_now": 15, "kept": 0, "retried": 0}
    assert d["counts"] == counts and sum(counts) == 11 and d["referable"] == sum(counts[2:])
    assert summary.provider == CPU and summary.images_per_second == pytest.approx(15 / summary.seconds)
    assert [p for p, _ in summary.error_examples] == [
        r["path"] for r in rows if r["status"] == "error"]
    assert seen.of("started", "predict")[0].total == 15 and seen.completed("predict") == 15
    assert seen.of("advanced", "predict")[-1].fields["postfix"] == "4 unreadable"

    from rich.console import Console

    monkeypatch.setenv("COLUMNS", "60")
    console = Console(file=io.StringIO(), record=True)
    assert console.width == 60
    render_predict_summary(summary, GRADE_NAMES, console)
    text = console.export_text()
    assert f"Predictions: {out}" in text.splitlines()  # the path whole, on its own line
    words = " ".join(text.split())  # other lines may wrap at 60 columns
    assert "15 images: 11 graded, 4 unreadable" in words and words.count("graded") == 1  # stated once


def test_predict_summary_shows_a_rate_only_when_it_means_something(tmp_path, grader):
    from rich.console import Console

    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "empty.jpg").write_bytes(b"")
    summary = predict_folder(tmp_path / "one", grader, out=tmp_path / "p.csv")
    assert (summary.total, summary.graded, summary.errors, summary.done_now) == (1, 0, 1, 1)
    assert summary.images_per_second is None
    console = Console(file=io.StringIO(), record=True, width=100)
    render_predict_summary(summary, GRADE_NAMES, console)
    text = console.export_text()
    assert "img/s" not in text and "on CPUExecutionProvider" in text
    assert "1 images: 0 graded, 1 unreadable" in text


def test_resume_after_a_kill_writes_every_image_once(tmp_path, grader, photo_folder):
    folder, expected = photo_folder
    full = tmp_path / "full.csv"
    predict_folder(folder, grader, out=full, batch_size=4, threads=2)
    lines = full.read_text().splitlines(keepends=True)
    assert len(lines) == 16
    by_path = {r["path"]: r for r in read_rows(full)}

    # Killed mid-write: header, five rows (one of them an unreadable file), half of the sixth.
    out = tmp_path / "partial.csv"
    first = lines[1:6]
    assert sum(",error," in line for line in first) == 1
    out.write_text(lines[0] + "".join(first) + lines[6][: len(lines[6]) // 2])
    with pytest.raises(RetinoError, match="partial.csv exists; pass --resume to continue it or --force"):
        predict_folder(folder, grader, out=out)
    summary = predict_folder(folder, grader, out=out, batch_size=3, threads=2, resume=True)
    assert (summary.total, summary.kept, summary.done_now, summary.retried) == (15, 4, 11, 1)
    assert (summary.graded, summary.errors) == (11, 4)
    text = out.read_text()
    graded_first = [line for line in first if ",error," not in line]
    assert text.startswith(lines[0] + "".join(graded_first))  # graded rows untouched
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(by_path)  # every image exactly once
    check_rows(rows, expected, grader.info.preprocess, folder)
    for got in rows:
        want = by_path[got["path"]]
        assert got["status"] == want["status"] and got["predicted_grade"] == want["predicted_grade"]
        for g in range(5):
            assert float(got[f"prob_{g}"] or 0) == pytest.approx(float(want[f"prob_{g}"] or 0), abs=1e-6)

    # Resuming a finished file reads again only what could not be read; --force starts over.
    again = predict_folder(folder, grader, out=out, resume=True)
    assert (again.kept, again.done_now, again.retried, again.errors) == (11, 4, 4, 4)
    assert again.counts == summary.counts
    assert sorted(out.read_text().splitlines()) == sorted(text.splitlines())
    forced = predict_folder(folder, grader, out=out, force=True, batch_size=4)
    assert forced.done_now == 15 and len(read_rows(out)) == 15
    with pytest.raises(RetinoError, match="pass one"):
        predict_folder(folder, grader, out=out, force=True, resume=True)
    with pytest.raises(RetinoError, match="holds CSV; resume it without --json"):
        predict_folder(folder, grader, out=out, resume=True, json_lines=True)
    # A kill before the header was complete leaves nothing to keep.
    out.write_text("image,path,predicted_gra")
    assert predict_folder(folder, grader, out=out, resume=True).done_now == 15
    assert len(read_rows(out)) == 15
    # A file someone else wrote is refused as it is, even its incomplete last line.
    for foreign in ("path,grade\n/x.png,2", "notes without a newline"):
        out.write_text(foreign)
        with pytest.raises(RetinoError, match="pass --force to start over"):
            predict_folder(folder, grader, out=out, resume=True)
        assert out.read_text() == foreign


def test_resume_reads_again_the_files_that_were_fixed(tmp_path, grader):
    folder = tmp_path / "photos"
    for i in range(4):
        write_image(folder / f"{i}.png", seed=i)
    (folder / "2.png").write_bytes(b"")  # broken in the first run
    (folder / "3.png").write_bytes(b"still broken")
    out = tmp_path / "p.csv"
    first = predict_folder(folder, grader, out=out)
    assert (first.graded, first.errors) == (2, 2)
    write_image(folder / "2.png", seed=2)  # fixed since
    again = predict_folder(folder, grader, out=out, resume=True)
    assert (again.kept, again.done_now, again.retried, again.graded, again.errors) == (2, 2, 2, 3, 1)
    rows = {r["path"]: r for r in read_rows(out)}
    assert len(rows) == 4 == len(read_rows(out))  # no image twice
    assert rows[str(folder / "2.png")]["status"] == "ok" and rows[str(folder / "2.png")]["error"] == ""
    assert rows[str(folder / "3.png")]["status"] == "error"


def test_json_lines_output_and_resume(tmp_path, grader, photo_folder):
    folder, expected = photo_folder
    out = tmp_path / "predictions.jsonl"
    predict_folder(folder, grader, out=out, json_lines=True, batch_size=5)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 15 and all(tuple(r) == schema.PREDICT_COLUMNS for r in rows)
    check_rows(rows, expected, grader.info.preprocess, folder)
    errors = [r for r in rows if r["status"] == "error"]
    assert all(r["predicted_grade"] is None and r["referable_prob"] is None for r in errors)
    assert all(isinstance(r["predicted_grade"], int) for r in rows if r["status"] == "ok")
    csv_out = tmp_path / "p.csv"
    predict_folder(folder, grader, out=csv_out, batch_size=5)
    for j, c in zip(rows, read_rows(csv_out)):
        assert set(j) == set(c)
        assert str(j["predicted_grade"] if j["predicted_grade"] is not None else "") == c["predicted_grade"]
        assert str(j["prob_3"] if j["prob_3"] is not None else "") == c["prob_3"]

    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:9]) + lines[9][:20])
    summary = predict_folder(folder, grader, out=out, json_lines=True, resume=True)
    assert (summary.kept, summary.done_now, summary.retried) == (7, 8, 2)
    resumed = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["path"] for r in resumed) == sorted(r["path"] for r in rows)
    with pytest.raises(RetinoError, match="holds JSON lines; resume it with --json"):
        predict_folder(folder, grader, out=out, resume=True)


def test_predict_rows_to_a_stream(tmp_path, grader, photo_folder):
    folder, expected = photo_folder
    stream = io.StringIO()
    summary = predict_folder(folder, grader, out=stream, json_lines=True)
    rows = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(rows) == 15 and summary.out == "-" and summary.graded == 11
    check_rows(rows, expected, grader.info.preprocess, folder)
    with pytest.raises(RetinoError, match="not stdout; name the file with --out"):
        predict_folder(folder, grader, out=io.StringIO(), resume=True)
    assert not list(tmp_path.iterdir())  # nothing written beside


def test_predict_without_torch(tmp_path, model_path):
    """predict runs in a Python where torch cannot be imported."""
    folder = tmp_path / "photos"
    for i in range(5):
        write_image(folder / f"{i}.png", seed=i)
    out = tmp_path / "p.csv"
    code = (
        "import json, sys\n"
        "sys.modules['torch'] = None\n"
        "from retinocli.deploy.predict import predict_folder\n"
        "from retinocli.deploy.onnx_model import OnnxGrader\n"
        "s = predict_folder(sys.argv[1], OnnxGrader(sys.argv[2], 'auto'), out=sys.argv[3])\n"
        "real = sorted(m for m, v in sys.modules.items()\n"
        "              if v is not None and m.split('.')[0] in ('torch', 'torchvision'))\n"
        "print(json.dumps({'total': s.total, 'errors': s.errors, 'torch': real}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(folder), str(model_path), str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"total": 5, "errors": 0, "torch": []}
    assert len(read_rows(out)) == 5


def test_predict_folder_needs_images(tmp_path, grader):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetinoError, match="no images .* under"):
        predict_folder(tmp_path / "empty", grader, out=tmp_path / "p.csv")
    with pytest.raises(RetinoError, match="is a folder; give a file name"):
        predict_folder(tmp_path, grader, out=tmp_path / "empty")


def test_full_size_kaggle_photos(tmp_path, shared_data):
    images = shared_data / "kaggle-sample10" / "train"
    if not images.is_dir():
        pytest.skip("kaggle-sample10/train is not present")
    n = len(find_images(images))
    assert n == len([p for p in images.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png")])
    info = {"preprocess": Preprocess(size=64, mode="crop").to_dict()}
    g = OnnxGrader(build_tiny_onnx(tmp_path / "m64.onnx", size=64, info=info), "cpu")
    assert g.info.preprocess.mode == "crop"
    summary = predict_folder(images, g, out=tmp_path / "kaggle.csv", batch_size=4)
    rows = read_rows(tmp_path / "kaggle.csv")
    assert len(rows) == n == summary.total == 10 and summary.errors == 0
    assert all(r["status"] == "ok" for r in rows)
    assert sum(summary.counts) == n


def test_model_info_is_frozen(grader):
    assert isinstance(grader.info, ModelInfo)
    with pytest.raises(AttributeError):
        grader.info.arch = "other"  # type: ignore[misc]
