"""Tests for retinocli.data.synth: layout, labels, determinism and that grades can be told apart."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retinocli import NUM_GRADES, RetinoError
from retinocli.data.synth import generate

N = 200
SIZE = 64


def read_labels(path: Path) -> list[tuple[str, int]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "level"]
    return [(name, int(level)) for name, level in rows[1:]]


def patient(name: str) -> int:
    pid, eye = name.split("_")
    assert eye in ("left", "right")
    return int(pid)


def load(out: Path, split: str, name: str) -> np.ndarray:
    return np.asarray(Image.open(out / split / f"{name}.jpeg"), dtype=np.float32)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One n=200 data set at 64 px, the size training later uses, shared by the tests."""
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, generate(out, n=N, size=SIZE, seed=0)


def test_layout_files_match_csv_rows(demo: tuple[Path, dict]) -> None:
    out, summary = demo
    owned = ["test", "testLabels.csv", "train", "trainLabels.csv"]
    assert sorted(p.name for p in out.iterdir()) == owned
    total = 0
    for split in ("train", "test"):
        rows = read_labels(out / f"{split}Labels.csv")
        files = sorted(p.name for p in (out / split).iterdir())
        assert files == sorted(f"{name}.jpeg" for name, _ in rows)
        assert all(0 <= level < NUM_GRADES for _, level in rows)
        counts = {g: sum(level == g for _, level in rows) for g in range(NUM_GRADES)}
        assert summary["splits"][split] == counts
        for name, _ in rows:
            with Image.open(out / split / f"{name}.jpeg") as im:
                assert im.format == "JPEG"
                assert im.mode == "RGB"
                assert im.size == (SIZE, SIZE)
        total += len(rows)
    assert total == N
    assert summary["out"] == str(out)
    assert (summary["n"], summary["size"], summary["seed"]) == (N, SIZE, 0)
    assert summary["patients"] == N // 2


def test_both_eyes_per_patient_and_no_patient_in_both_splits(demo: tuple[Path, dict]) -> None:
    out, _ = demo
    patients = {}
    for split in ("train", "test"):
        names = [name for name, _ in read_labels(out / f"{split}Labels.csv")]
        ids = {patient(name) for name in names}
        assert sorted(names) == sorted(f"{pid}_{eye}" for pid in ids for eye in ("left", "right"))
        patients[split] = ids
    assert not patients["train"] & patients["test"]
    assert len(patients["train"]) + len(patients["test"]) == N // 2
    # test_fraction is a share of patients.
    assert len(patients["test"]) == round(0.2 * (N // 2))


def test_grades_are_imbalanced_like_kaggle(demo: tuple[Path, dict]) -> None:
    _, summary = demo
    train = summary["splits"]["train"]
    total = {g: train[g] + summary["splits"]["test"][g] for g in range(NUM_GRADES)}
    assert total[0] >= 0.5 * N
    assert max(train, key=train.get) == 0
    # Every grade is in train a few times, so a model can learn each one.
    assert all(train[g] >= 3 for g in range(NUM_GRADES))


def test_optic_disc_is_on_the_nasal_side(demo: tuple[Path, dict]) -> None:
    # Left eyes show the disc on the left of the picture, right eyes on the right.
    out, _ = demo
    checked = 0
    for name, level in read_labels(out / "trainLabels.csv"):
        if level != 0:
            continue
        brightness = load(out, "train", name).sum(-1)
        ys, xs = np.nonzero(brightness >= np.quantile(brightness, 0.995))
        on_left = xs.mean() < SIZE / 2
        assert on_left == name.endswith("_left"), name
        checked += 1
    assert checked >= 50


def lesion_fraction(image: np.ndarray) -> float:
    """Share of fundus pixels that are deep red (blood) or yellow (exudate)."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    inside = image.sum(-1) > 60
    dark_red = g < 0.15 * r
    yellow = (g > 0.8 * r) & (b < 0.55 * g)
    return float(((dark_red | yellow) & inside).sum() / inside.sum())


def test_grades_are_visually_separable(demo: tuple[Path, dict]) -> None:
    # Without torch: a one-number hand feature already orders the grades, so a small CNN
    # has a signal to learn well above the majority baseline.
    out, _ = demo
    features: dict[int, list[float]] = {g: [] for g in range(NUM_GRADES)}
    for split in ("train", "test"):
        for name, level in read_labels(out / f"{split}Labels.csv"):
            features[level].append(lesion_fraction(load(out, split, name)))
    mean = [float(np.mean(features[g])) for g in range(NUM_GRADES)]
    assert mean[0] < 0.005
    assert mean[0] < mean[1] < mean[2] < mean[3]
    assert mean[4] > mean[2]
    # Grade 0 and grade >= 2 barely overlap on this feature alone.
    assert max(features[0]) < np.median(features[2])
    assert max(features[0]) < min(features[3])


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    def files(out: Path) -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    first = files(Path(generate(tmp_path / "a", n=20, size=32, seed=7)["out"]))
    second = files(Path(generate(tmp_path / "b", n=20, size=32, seed=7)["out"]))
    other = files(Path(generate(tmp_path / "c", n=20, size=32, seed=8)["out"]))
    assert len(first) == 20 + 2
    assert first == second
    assert first["trainLabels.csv"] != other["trainLabels.csv"]
    # Not one image is shared between the two seeds.
    assert not {v for k, v in first.items() if k.endswith(".jpeg")} & set(other.values())



def test_masks_mark_the_lesions_and_leave_the_images_unchanged(tmp_path: Path) -> None:
    """masks/<image>.png has lesion pixels exactly when the grade is above 0, and those pixels are
    where the photo has local detail: a lesion differs from its 9x9 median ~4x more than the
    retina around it does (measured ~100 vs ~23, summed over RGB, on seed 1 at 64 px)."""
    from PIL import ImageFilter

    plain = generate(tmp_path / "plain", n=40, size=SIZE, seed=1)
    summary = generate(tmp_path / "masked", n=40, size=SIZE, seed=1, masks=True)
    assert plain["masks"] is None and summary["masks"] == str(tmp_path / "masked" / "masks")
    masks = tmp_path / "masked" / "masks"
    yy, xx = np.mgrid[:SIZE, :SIZE]
    retina = (xx - (SIZE - 1) / 2) ** 2 + (yy - (SIZE - 1) / 2) ** 2 < (0.8 * SIZE / 2) ** 2
    names = []
    for split in ("train", "test"):
        for name, grade in read_labels(tmp_path / "masked" / f"{split}Labels.csv"):
            names.append(name)
            image = tmp_path / "masked" / split / f"{name}.jpeg"
            assert image.read_bytes() == (tmp_path / "plain" / split / f"{name}.jpeg").read_bytes()
            with Image.open(masks / f"{name}.png") as m:
                assert m.mode == "L" and m.size == (SIZE, SIZE)
                lesion = np.asarray(m)
            assert set(np.unique(lesion)) <= {0, 255}
            assert lesion.any() == (grade > 0), (name, grade)
            if grade == 0:
                continue
            with Image.open(image) as im:
                detail = np.abs(np.asarray(im, np.float32)
                                - np.asarray(im.filter(ImageFilter.MedianFilter(9)), np.float32)).sum(2)
            inside, around = detail[lesion > 0].mean(), detail[retina & (lesion == 0)].mean()
            assert inside > 2.5 * around, (name, inside, around)
    assert sorted(p.stem for p in masks.iterdir()) == sorted(names)

def test_progress_counts_every_image(tmp_path: Path) -> None:
    from retinocli.events import Recorder

    seen = Recorder()
    generate(tmp_path / "data", n=12, size=16, events=seen)
    assert [e.kind for e in seen.events] == ["started"] + ["advanced"] * 12 + ["finished"]
    assert seen.events[0].total == 12 and seen.completed("drawing fundus images") == 12


def test_zero_test_fraction_writes_an_empty_test_split(tmp_path: Path) -> None:
    summary = generate(tmp_path / "data", n=10, size=16, test_fraction=0.0)
    assert read_labels(tmp_path / "data" / "testLabels.csv") == []
    assert not any((tmp_path / "data" / "test").iterdir())
    assert sum(summary["splits"]["train"].values()) == 10


def test_refuses_non_empty_folder_without_force(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RetinoError, match="--force"):
        generate(tmp_path, n=10, size=16)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_force_replaces_only_its_own_files(tmp_path: Path) -> None:
    generate(tmp_path, n=20, size=16, seed=1)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "runs").mkdir()
    summary = generate(tmp_path, n=10, size=16, seed=2, force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "runs").is_dir()
    images = list((tmp_path / "train").iterdir()) + list((tmp_path / "test").iterdir())
    assert len(images) == 10 == summary["n"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 8}, "--n"),
        ({"n": 11}, "--n"),
        ({"n": 10.0}, "--n"),
        ({"size": 8}, "--size"),
        ({"size": 64.5}, "--size"),
        ({"test_fraction": 0.95}, "--test-fraction"),
        ({"test_fraction": -0.1}, "--test-fraction"),
    ],
)
def test_bad_arguments_are_user_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(RetinoError, match=message):
        generate(tmp_path / "data", **{"n": 10, "size": 16, **kwargs})
    assert not (tmp_path / "data").exists()


def test_out_that_is_a_file_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("")
    with pytest.raises(RetinoError, match="not a folder"):
        generate(tmp_path / "data", n=10, size=16)


def test_does_not_import_torch() -> None:
    code = "import sys, retinocli.data.synth; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
