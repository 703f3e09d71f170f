from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from builders import write_image
from retinocli.events import Recorder
from retinocli.errors import RetinoError
from retinocli.data.layouts import load_dataset
from retinocli.imaging.cache import cache_name, prepare
from retinocli.imaging.preprocess import Preprocess, load_and_prepare


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


def by_key(records) -> dict:
    return {(r["split"], r["image"]): r for r in records.to_dict("records")}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """40 synthetic photos of 96 px in the Kaggle layout: 32 train, 8 test."""
    from retinocli.data.synth import generate

    out = tmp_path_factory.mktemp("prep-src") / "data"
    generate(out, n=40, size=96, seed=1)
    return out


@pytest.fixture(scope="module")
def png_cache(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep-png") / "cache"
    return prepare(src, out=out, size=48, mode="crop", fmt="png", workers=2)


def test_png_cache_holds_the_exact_pixels_and_every_record(src, png_cache):
    result, out = png_cache, png_cache.out
    assert (result.count, result.written, result.skipped, result.failed, result.missing) == (40, 40, 0, [], 0)
    assert result.images_per_second > 0
    assert json.loads(json.dumps(result.to_dict()))["out"] == str(out)
    files = sorted((out / "images").rglob("*.png"))
    assert len(files) == 40
    assert result.bytes == sum(f.stat().st_size for f in files) + sum(
        (out / n).stat().st_size for n in ("labels.csv", "retino-cache.json"))

    source, cache = load_dataset(src), load_dataset(out)
    assert cache.layout == "cache" and source.layout == "kaggle"
    assert cache.records["split"].value_counts().to_dict() == source.records["split"].value_counts().to_dict() \
        == {"train": 32, "test": 8}
    # same records in the same order: image, grade, split, patient and eye
    cols = ["image", "grade", "split", "patient", "eye"]
    assert cache.records[cols].equals(source.records[cols])
    assert cache.records["found"].all() and str(cache.records["grade"].dtype) == "Int64"
    assert any("--preprocess none --img-size 48" in n for n in cache.notes)

    crop, none = Preprocess(size=48, mode="crop"), Preprocess(size=48, mode="none")
    cached = by_key(cache.records)
    for rec in source.records.to_dict("records"):
        path = cached[(rec["split"], rec["image"])]["path"]
        assert Path(path).relative_to(out).as_posix() == f"images/{rec['split']}/{rec['image']}.png"
        want = load_and_prepare(rec["path"], crop)
        assert np.array_equal(pixels(path), want)
        # the cache read back with --preprocess none at the same size: the same pixels
        assert np.array_equal(load_and_prepare(path, none), want)

    meta = json.loads((out / "retino-cache.json").read_text())
    assert {k: meta[k] for k in ("format", "complete", "size", "mode", "fmt", "source", "layout", "count",
                                 "failed")} == {
        "format": 1, "complete": True, "size": 48, "mode": "crop", "fmt": "png", "source": str(src),
        "layout": "kaggle", "count": 40, "failed": []}
    labels = list(csv.DictReader(open(out / "labels.csv", encoding="utf-8")))
    assert list(labels[0]) == ["image", "file", "grade", "split", "patient", "eye", "source"]
    assert [int(r["grade"]) for r in labels] == source.records["grade"].tolist()


def test_jpeg_cache_is_within_two_grey_levels(src, tmp_path):
    from rich.console import Console

    from retinocli.reporting.render import event_bars

    console = Console(file=io.StringIO(), width=120)
    with event_bars(console, "img") as events:
        result = prepare(src, out=tmp_path / "jpeg", size=64, fmt="jpeg", quality=95, workers=1, events=events)
        (task,) = events.bar.tasks
        assert (task.description, task.completed, task.total) == ("prepare", 40, 40)
    assert result.written == 40
    cache = by_key(load_dataset(tmp_path / "jpeg").records)
    p = Preprocess(size=64, mode="crop")
    diffs = []
    for rec in load_dataset(src).records.to_dict("records"):
        path = cache[(rec["split"], rec["image"])]["path"]
        assert path.endswith(".jpg")
        got = pixels(path)
        assert got.shape == (64, 64, 3)
        diffs.append(np.abs(got.astype(int) - load_and_prepare(rec["path"], p)).mean())
    assert max(diffs) < 2, max(diffs)


def test_resume_writes_only_what_is_missing(src, tmp_path):
    out = tmp_path / "cache"
    prepare(src, out=out, size=32, fmt="png", workers=1)
    files = sorted((out / "images").rglob("*.png"))
    for f in files:  # an hour ago, so a rewrite could not keep the same time
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns - 3600 * 10**9))
    before = {f: f.stat().st_mtime_ns for f in files}
    gone = files[3:6]
    for f in gone:
        f.unlink()
    # a kill during a write leaves only the temporary file; the final name never appears
    partial = gone[0].with_name(gone[0].name + ".tmp")
    partial.write_bytes(b"\x89PNG\r\n\x1a\n half")
    seen = Recorder()
    result = prepare(src, out=out, size=32, fmt="png", workers=1, events=seen)
    assert (result.written, result.skipped, result.count) == (3, 37, 40)
    (start,) = seen.of("started", "prepare")
    assert (start.completed, start.total) == (37, 40)
    assert len(seen.of("advanced", "prepare")) == 3 and seen.completed("prepare") == 40
    assert len(seen.of("finished", "prepare")) == 1
    assert not list(out.rglob("*.tmp"))
    for f in files:
        if f in gone:
            assert f.stat().st_mtime_ns > before[f]
        else:
            assert f.stat().st_mtime_ns == before[f]
    cache = load_dataset(out)
    assert cache.records["found"].all() and len(cache.records) == 40
    rec = cache.records[cache.records["path"] == str(gone[0])].iloc[0]
    original = load_dataset(src).records.set_index(["split", "image"]).loc[(rec["split"], rec["image"]), "path"]
    assert np.array_equal(pixels(gone[0]), load_and_prepare(original, Preprocess(size=32, mode="crop")))


def test_an_interrupted_run_is_unfinished_until_run_again(src, tmp_path):
    out = tmp_path / "cache"

    seen = Recorder()

    def stop(event):
        seen(event)
        if seen.completed("prepare") == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(src, out=out, size=32, fmt="jpeg", workers=2, events=stop)
    assert json.loads((out / "retino-cache.json").read_text())["complete"] is False
    assert not (out / "labels.csv").exists()
    with pytest.raises(RetinoError, match="unfinished retino cache .* run the same retino prepare command again"):
        load_dataset(out)
    result = prepare(src, out=out, size=32, fmt="jpeg", workers=2)
    assert result.skipped >= 5 and result.written + result.skipped == 40 and result.count == 40
    assert not list(out.rglob("*.tmp"))
    assert len(load_dataset(out).records) == 40


def test_broken_and_missing_images_are_listed_not_fatal(src, tmp_path):
    from retinocli.data.stats import dataset_stats

    data = tmp_path / "data"
    shutil.copytree(src, data)
    victims = sorted((data / "train").glob("*.jpeg"))[:3]
    victims[0].write_bytes(b"")
    victims[1].write_bytes(victims[1].read_bytes()[:300])
    victims[2].unlink()
    result = prepare(data, out=tmp_path / "cache", size=32, fmt="png", workers=2)
    assert (result.count, result.written, result.missing) == (37, 37, 1)
    assert [(f["image"], f["split"]) for f in result.failed] == [(victims[0].stem, "train"), (victims[1].stem, "train")]
    assert result.failed[0]["reason"] == "empty file" and "truncated" in result.failed[1]["reason"]
    assert all("\n" not in f["reason"] for f in result.failed)
    meta = json.loads((tmp_path / "cache" / "retino-cache.json").read_text())
    assert meta["failed"] == result.failed and meta["missing"] == 1 and meta["count"] == 37

    ds = load_dataset(tmp_path / "cache")
    assert victims[0].stem not in set(ds.records["image"]) and len(ds.records) == 37
    assert any("2 source image(s) could not be read" in n for n in ds.notes)
    stats = dataset_stats(ds, sample=None)
    assert stats["layout"] == "cache"
    assert stats["splits"]["train"]["images"] == 29 and stats["splits"]["test"]["images"] == 8
    assert stats["files"]["checked"] == 37 and stats["files"]["unreadable"] == []
    assert stats["files"]["formats"] == {"PNG": 37}
    assert stats["files"]["width"]["min"] == stats["files"]["width"]["max"] == 32
    assert stats["patients"]["straddling_splits"] == 0


def test_out_folder_rules(src, png_cache, tmp_path):
    with pytest.raises(RetinoError, match=r"is a cache with size 48, not size 40; .* --force"):
        prepare(src, out=png_cache.out, size=40, fmt="png")
    with pytest.raises(RetinoError, match="fmt png, not fmt jpeg"):
        prepare(src, out=png_cache.out, size=48, fmt="jpeg")
    # --force rebuilds a cache of other settings
    out = tmp_path / "cache"
    prepare(src, out=out, size=32, fmt="png", workers=1)
    result = prepare(src, out=out, size=24, fmt="jpeg", workers=1, force=True)
    assert result.written == 40 and not list(out.rglob("*.png"))
    assert pixels(next(out.rglob("*.jpg"))).shape == (24, 24, 3)

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(RetinoError, match="not empty and not a retino cache"):
        prepare(src, out=foreign, size=32)
    assert prepare(src, out=foreign, size=32, workers=1, force=True).count == 40
    assert (foreign / "todo.txt").read_text() == "mine"

    with pytest.raises(RetinoError, match="is or contains the dataset folder"):
        prepare(src, out=src, size=32, force=True)
    with pytest.raises(RetinoError, match="is or contains the dataset folder"):
        prepare(src, out=src.parent, size=32, force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RetinoError, match="is a file"):
        prepare(src, out=tmp_path / "file", size=32)
    empty = tmp_path / "listed-only"
    empty.mkdir()
    (empty / "trainLabels.csv").write_text("image,level\n1_left,0\n")
    with pytest.raises(RetinoError, match="none of the 1 listed images is on disk"):
        prepare(empty, out=tmp_path / "new")
    for kw, message in (({"fmt": "gif"}, "unknown image format 'gif'"), ({"quality": 0}, "--quality"),
                        ({"mode": "blur"}, "preprocess.mode"), ({"size": 4}, "preprocess.size")):
        with pytest.raises(RetinoError, match=message):
            prepare(src, out=tmp_path / "new", **kw)
    assert not (tmp_path / "new").exists()


def test_cache_layout_wins_detection_and_refuses_garbage(png_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(png_cache.out, cache)
    # a label file of another layout beside it does not make the folder ambiguous
    (cache / "trainLabels.csv").write_text("image,level\nx,0\n")
    assert load_dataset(cache).layout == "cache"
    with pytest.raises(RetinoError, match="drop --images"):
        load_dataset(cache, images=cache / "images")

    manifest, labels = cache / "retino-cache.json", cache / "labels.csv"
    good_manifest, good_labels = manifest.read_text(), labels.read_text()
    for text, message in (("{not json", "not a readable retino cache manifest"),
                          ('{"format": 9}', "not a retino cache manifest of format 1"),
                          ('{"format": 1, "complete": true}', "no valid size and mode")):
        manifest.write_text(text)
        with pytest.raises(RetinoError, match=message) as err:
            load_dataset(cache)
        assert "\n" not in str(err.value)
    manifest.write_text(good_manifest)
    lines = good_labels.splitlines()
    for bad_line, message in ((lines[1].replace("images/train/", "../../"), "is not a path inside the cache"),
                              (lines[1].replace("images/train/", "/etc/"), "is not a path inside the cache"),
                              (lines[1].replace(",train,", ",holdout,"), "unknown split 'holdout'"),
                              (lines[1].replace(",0,train", ",7,train"), "not 0-4")):
        labels.write_text("\n".join([lines[0], bad_line] + lines[2:]) + "\n")
        with pytest.raises(RetinoError, match=message):
            load_dataset(cache)
    labels.write_bytes(b"image,file\n\xff\xfe,x\n")
    with pytest.raises(RetinoError, match="labels.csv: not a readable CSV file"):
        load_dataset(cache)
    labels.write_text("image,file\nx,images/x.png\n")
    with pytest.raises(RetinoError, match="expected columns image,file,grade,split"):
        load_dataset(cache)
    # an image deleted from the cache is reported missing, like any layout's
    labels.write_text(good_labels)
    first = cache / lines[1].split(",")[1]
    first.unlink()
    rec = load_dataset(cache).records
    assert rec["found"].sum() == 39 and not rec.loc[0, "found"]


def test_names_stay_unique_across_folders_case_and_extension(tmp_path):
    data = tmp_path / "folders"
    names = ["train/0/a b.png", "train/1/a b.png", "train/2/é 1.jpeg", "train/2/A.png", "train/2/a.png",
             "train/3/x.png", "train/3/x.jpeg", "test/0/a b.png"]
    for i, name in enumerate(names):
        write_image(data / name, size=40, seed=i)
    result = prepare(data, out=tmp_path / "cache", size=16, fmt="png", workers=1)
    assert result.count == len(names)
    ds = load_dataset(tmp_path / "cache")
    files = [Path(p).relative_to(tmp_path / "cache").as_posix() for p in ds.records["path"]]
    assert sorted(files) == sorted([
        "images/train/0/a b.png", "images/train/1/a b.png", "images/train/2/é 1.png", "images/train/2/A.png",
        "images/train/2/a~2.png", "images/train/3/x.png", "images/train/3/x~2.png", "images/test/0/a b.png"])
    assert len({f.casefold() for f in files}) == len(names)
    source = by_key(load_dataset(data).records)
    for rec in ds.records.to_dict("records"):
        orig = source[(rec["split"], rec["image"])]
        assert rec["grade"] == orig["grade"]
        assert np.array_equal(pixels(rec["path"]), load_and_prepare(orig["path"], Preprocess(size=16, mode="crop")))
    assert cache_name("../../etc/passwd") == "etc/passwd" and cache_name("10_left.JPEG") == "10_left"
    assert cache_name("scan.v2") == "scan.v2" and cache_name("..") == "image"


def test_training_on_the_png_cache_is_bit_identical(src, tmp_path):
    import torch

    from retinocli.engine.checkpoints import load_checkpoint
    from retinocli.engine.trainer import train
    from builders import train_config as cfg

    cache = prepare(src, out=tmp_path / "cache", size=32, mode="crop", fmt="png", workers=1).out
    settings = dict(epochs=1, deterministic=True, augment="none", img_size=32, batch_size=8)
    a = train(cfg(src, tmp_path, name="originals", preprocess="crop", **settings))
    b = train(cfg(cache, tmp_path, name="cache", preprocess="none", **settings))
    split_a = [(r["image"], r["grade"], r["split"]) for r in csv.DictReader(open(a.run_dir / "split.csv"))]
    split_b = [(r["image"], r["grade"], r["split"]) for r in csv.DictReader(open(b.run_dir / "split.csv"))]
    assert split_a == split_b and {s for _, _, s in split_a} == {"train", "val", "test"}
    assert a.history[0]["train_loss"] == b.history[0]["train_loss"]
    wa, wb = load_checkpoint(a.run_dir / "best.pt")["model"], load_checkpoint(b.run_dir / "best.pt")["model"]
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_full_size_photos(shared_data, tmp_path):
    src = shared_data / "kaggle-sample10"
    result = prepare(src, out=tmp_path / "cache", size=128, mode="crop", workers=2)
    assert (result.written, result.count, result.failed) == (10, 10, [])
    ds = load_dataset(tmp_path / "cache")
    assert ds.records["grade"].tolist() == load_dataset(src).records["grade"].tolist()
    for path in ds.records["path"]:
        with Image.open(path) as im:
            assert (im.format, im.size) == ("JPEG", (128, 128))


def test_prepare_needs_no_torch(src, tmp_path):
    code = ("import sys; sys.modules['torch'] = None\n"
            "from retinocli.imaging.cache import prepare\n"
            f"print(prepare({str(src)!r}, out={str(tmp_path / 'cache')!r}, size=16, workers=2).count)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "40"


def test_cli_prepare_then_stats(tmp_path):
    from typer.testing import CliRunner

    from retinocli.cli import app
    from retinocli.data.synth import generate

    src = tmp_path / "src"
    generate(src, n=20, size=96, seed=3)
    runner = CliRunner()
    result = runner.invoke(app, ["prepare", str(src), "--out", str(tmp_path / "cache"), "--size", "48",
                                 "--workers", "1", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["count"] == 20 and d["written"] == 20 and d["failed"] == []
    again = runner.invoke(app, ["prepare", str(src), "--out", str(tmp_path / "cache"), "--size", "48", "--workers", "1"])
    assert again.exit_code == 0 and "0 written now, 20 already there" in " ".join(again.output.split())
    other = runner.invoke(app, ["prepare", str(src), "--out", str(tmp_path / "cache"), "--size", "64"])
    assert other.exit_code == 2 and "--force" in other.output
    stats = runner.invoke(app, ["stats", str(tmp_path / "cache"), "--json"])
    assert stats.exit_code == 0 and json.loads(stats.stdout)["layout"] == "cache"


def test_progress_bar_and_summary_give_one_rate(src, tmp_path):
    """The rate counts the images this run decoded (written or unreadable), not those already
    there, over the time spent on them, not the start-up; the bar ends on that same number."""
    from rich.console import Console

    from retinocli.reporting.render import event_bars

    data = tmp_path / "data"
    shutil.copytree(src, data)
    sorted((data / "train").glob("*.jpeg"))[0].write_bytes(b"")  # one unreadable photo
    out = tmp_path / "cache"
    prepare(data, out=out, size=32, fmt="png", workers=1)
    for f in sorted((out / "images").rglob("*.png"))[:10]:
        f.unlink()
    console = Console(file=io.StringIO(), width=200, force_terminal=True)  # the live bar
    with event_bars(console, "img") as events:
        result = prepare(data, out=out, size=32, fmt="png", workers=1, events=events)
        bar = events.bar
        (task,) = bar.tasks
    assert (result.written, result.skipped, len(result.failed)) == (10, 29, 1)
    assert 0 < result.work_seconds <= result.seconds
    assert result.images_per_second == pytest.approx((10 + 1) / result.work_seconds, rel=1e-3, abs=0.01)
    assert task.fields["rate"] == result.images_per_second
    assert bar.columns[3].render(task).plain == f"{result.images_per_second:,.1f} img/s"


def test_cli_prepare_prints_the_bars_rate(src, tmp_path):
    from typer.testing import CliRunner

    from retinocli.cli import app

    result = CliRunner().invoke(app, ["prepare", str(src), "--out", str(tmp_path / "cache"), "--size", "32",
                                      "--workers", "2"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    rates = re.findall(r"([\d,.]+) img/s", text)
    assert len(rates) == 2 and rates[0] == rates[1], text  # the bar's last state, then the summary
    meta = json.loads((tmp_path / "cache" / "retino-cache.json").read_text())
    assert meta["count"] == 40 and "40 decoded in " in text
