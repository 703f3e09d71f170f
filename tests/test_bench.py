from __future__ import annotations

import json

from typer.testing import CliRunner

from retinocli.reporting.bench import Row, _ratios, timed
from retinocli.cli import app

runner = CliRunner()


JARGON = ("reports' way", "NCHW", "eager", "autocast", "channels_last", "onnxruntime")


def test_bench_quick_has_every_row_and_positive_speeds():
    result = runner.invoke(app, ["bench", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    rows = d["rows"]
    names = {(r["section"], r["name"], r["batch"]) for r in rows}
    base = "PIL + torchvision transforms, one image at a time, "
    photo_label = next(r["name"] for r in rows if r["name"].startswith(base) and "512 px" not in r["name"])
    label = photo_label.removeprefix(base)
    assert label == "generated 1536x1024 photos" or label == "full-size photos"
    for what in ("512 px JPEG", label):
        for who in ("PIL + torchvision transforms, one image at a time",
                    "retino loader (JPEG decoded at the size it needs, uint8)", "retino loader + crop to the fundus"):
            assert ("data", f"{who}, {what}", 1) in names, (who, what)
    for augment in ("no", "light", "strong"):  # the whole training input, old way and batched way
        old = f"retino loader + {augment} augmentation per image in the worker (torchvision), 512 px JPEG"
        new = f"retino loader + {augment} augmentation batched on the CPU, transfer included, 512 px JPEG"
        assert ("data", old, 4) in names and ("data", new, 4) in names
        assert next(r for r in rows if r["name"] == new)["baseline"] == old
        if augment != "no":  # the CPU default, OpenCV per image, against the same baseline
            cv = f"retino loader + {augment} augmentation per image in the worker (OpenCV), 512 px JPEG"
            assert next(r for r in rows if r["name"] == cv)["baseline"] == old
    for variant in ("PyTorch, fp32, standard memory layout", "mixed precision, channels-last memory layout"):
        assert ("train", f"resnet18, {variant}", 4) in names
    for augment in ("no augmentation", "light augmentation"):
        assert ("pipeline", "resnet18, mixed precision, channels-last memory layout, fed by the real input pipeline "
                f"({augment})", 4) in names
    for batch in (1, 8):
        assert ("infer", "resnet18, PyTorch fp32, CPU", batch) in names
        for precision in ("fp32", "fp16", "int8"):
            assert ("infer", f"resnet18, ONNX Runtime {precision}, CPU", batch) in names
    assert ("infer", "retino predict end to end, JPEG folder (CPU, fp32)", 8) in names
    assert len(rows) == 6 + 6 + 2 + 2 + 2 + 2 * 4 + 1
    assert all(r["images_per_second"] > 0 for r in rows), [r for r in rows if r["images_per_second"] <= 0]
    # plain words, and every baseline names a row of the same batch and size, so every ratio is filled
    assert not [r["name"] for r in rows if any(word in r["name"] for word in JARGON)]
    compared = [r for r in rows if r["baseline"]]
    assert len(compared) == 4 + 3 + 2 + 1 + 2 + 2 * 3
    for r in compared:
        assert any(b["name"] == r["baseline"] and (b["batch"], b["size"]) == (r["batch"], r["size"]) for b in rows)
        assert r["ratio"] and r["ratio"] > 0
    assert {r["baseline"] for r in compared if r["section"] == "pipeline"} == \
        {"resnet18, mixed precision, channels-last memory layout"}
    assert d["environment"]["torch"] and d["environment"]["onnxruntime"] and d["environment"]["device"] == "cpu"
    # GPU JPEG decoding (#16): no row without CUDA, a note instead
    assert "GPU JPEG decoding (retino train --decode gpu): skipped, it needs a CUDA device" in d["notes"]
    assert not [r for r in rows if "decoded on the GPU" in r["name"]]


def test_ratio_uses_the_baseline_of_the_same_batch_and_size():
    rows = [Row("infer", "eager", "cpu", 2, 1, 32, 10.0), Row("infer", "eager", "cpu", 2, 8, 32, 40.0),
            Row("infer", "ort", "cpu", 2, 1, 32, 25.0, baseline="eager"),
            Row("infer", "ort", "cpu", 2, 8, 32, 60.0, baseline="eager")]
    _ratios(rows)
    assert rows[2].ratio == 2.5 and rows[3].ratio == 1.5 and rows[0].ratio is None


def test_timed_counts_items_per_second():
    calls = []

    def work() -> int:
        calls.append(1)
        return 5

    rate = timed(work, min_seconds=0.05, warmup=2)
    assert len(calls) >= 3 and rate > 5  # thousands per second for a no-op, counted in items


def test_bench_bad_options():
    for args, text in ((["--size", "4"], "--size"), (["--batch-size", "0"], "--batch-size"),
                       (["--photos", "/no/such/folder"], "--photos")):
        result = runner.invoke(app, ["bench", *args])
        assert result.exit_code == 2 and text in result.output, result.output


def test_bench_only_pipeline_brings_its_baseline_and_reads_the_cache(tmp_path):
    """--only pipeline times its synthetic baseline too; --data images are re-encoded at the training size."""
    from builders import write_image

    for i in range(3):
        write_image(tmp_path / "cache" / f"{i}.png", size=20, seed=i)
    result = runner.invoke(app, ["bench", "--quick", "--only", "pipeline", "--data", str(tmp_path / "cache"),
                                 "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["section"] for r in rows] == ["train", "pipeline", "pipeline"]
    assert rows[0]["name"] == "resnet18, mixed precision, channels-last memory layout"
    assert all(r["note"] == "3 JPEGs" and r["threads"] == 0 for r in rows[1:])
    for r in rows[1:]:  # the ratio is the pipeline's rate over the synthetic one
        assert abs(r["ratio"] - r["images_per_second"] / rows[0]["images_per_second"]) < 1e-9


def test_bench_only_refuses_an_unknown_section():
    result = runner.invoke(app, ["bench", "--quick", "--only", "train,gpu"])
    assert result.exit_code == 2 and "--only takes data, train, pipeline, infer, predict; got gpu" in result.output
