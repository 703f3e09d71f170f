from __future__ import annotations

from pathlib import Path

import pytest

from builders import course_tree, write_image, write_lines
from retinocli.errors import RetinoError
from retinocli.data.files import parse_patient_eye
from retinocli.data.layouts import detect_layout, load_dataset


def test_course_layout_keeps_every_row_and_finds_extensions(tmp_path):
    ds = load_dataset(course_tree(tmp_path / "lab"))
    rec = ds.records
    assert ds.layout == "course"
    # The first row of each split is kept (the course's loader drops it).
    assert rec[rec.split == "train"]["image"].tolist() == ["1_left", "1_right", "2_left", "2_right"]
    assert rec[rec.split == "train"]["grade"].tolist() == [0, 2, 4, 4]
    assert rec[rec.split == "test"]["grade"].tolist() == [1, 0, 3]
    paths = dict(zip(rec["image"] + "@" + rec["split"], rec["path"]))
    assert paths["1_right@train"].endswith("1_right.jpg")
    assert paths["2_left@train"].endswith("2_left.png")
    assert rec["found"].tolist() == [True, True, True, True, True, False, True]
    assert rec["patient"].tolist()[:3] == ["1", "1", "2"]
    assert rec["eye"].tolist()[:2] == ["left", "right"]


def test_course_layout_images_option_and_link_file(tmp_path):
    root = course_tree(tmp_path / "lab")
    moved = root.rename(tmp_path / "elsewhere")
    lab = tmp_path / "lab2"
    for name in ("train_img.csv", "train_label.csv", "test_img.csv", "test_label.csv"):
        (lab / name).parent.mkdir(exist_ok=True)
        (lab / name).write_text((moved / name).read_text())
    ds = load_dataset(lab, images=moved / "data")
    assert ds.records["found"].sum() == 6
    # A symlink checked out as a text file holding its target is followed, with a note.
    (lab / "data").write_text("../elsewhere/data")
    ds = load_dataset(lab)
    assert ds.records["found"].sum() == 6
    assert "link target" in ds.notes[0]


def test_course_layout_errors(tmp_path):
    root = course_tree(tmp_path / "lab")
    write_lines(root / "test_label.csv", ["1", "0"])
    with pytest.raises(RetinoError, match="test_img.csv lists 3 images but test_label.csv has 2 labels"):
        load_dataset(root)
    write_lines(root / "test_label.csv", ["1", "7", "-1"])
    with pytest.raises(RetinoError, match=r"2 grade\(s\) are not 0-4 \(line 2: '7', line 3: '-1'\)"):
        load_dataset(root)
    write_lines(root / "test_label.csv", ["level", "1", "0", "2"])
    write_lines(root / "test_img.csv", ["image", "3_left", "3_right", "2_left"])
    ds = load_dataset(root)
    assert ds.records[ds.records.split == "test"]["grade"].tolist() == [1, 0, 2]
    assert any("header row" in n for n in ds.notes)


def test_kaggle_layout_with_test_labels(tmp_path):
    root = tmp_path / "kaggle"
    write_lines(root / "trainLabels.csv", ["image,level", "10_left,0", "10_right,1", "13_left,4"])
    write_lines(root / "testLabels.csv", ["image,level,Usage", "1_left,2,Public", "1_right,3,Private"])
    for name in ("10_left", "10_right", "13_left"):
        write_image(root / "train" / f"{name}.jpeg")
    write_image(root / "test" / "1_left.jpeg")
    ds = load_dataset(root)
    assert ds.layout == "kaggle"
    assert ds.records.groupby("split")["grade"].apply(list).to_dict() == {"test": [2, 3], "train": [0, 1, 4]}
    assert ds.records["found"].sum() == 4
    write_lines(root / "trainLabels.csv", ["name,grade", "10_left,0"])
    with pytest.raises(RetinoError, match="expected columns image,level; found name,grade"):
        load_dataset(root)


def test_aptos_layout(tmp_path):
    root = tmp_path / "aptos"
    write_lines(root / "train.csv", ["id_code,diagnosis", "000c1434d8d7,2", "001639a390f0,4", "0024cdab0c1e,1"])
    write_lines(root / "test.csv", ["id_code", "0005cfc8afb6"])
    for name in ("000c1434d8d7", "001639a390f0", "0024cdab0c1e"):
        write_image(root / "train_images" / f"{name}.png")
    write_image(root / "test_images" / "0005cfc8afb6.png")
    ds = load_dataset(root)
    assert ds.layout == "aptos"
    train = ds.records[ds.records.split == "train"]
    assert train["grade"].tolist() == [2, 4, 1] and train["found"].all()
    test = ds.records[ds.records.split == "test"]
    assert len(test) == 1 and test["grade"].isna().all() and test["found"].all()
    assert ds.records["patient"].isna().all()


def idrid_tree(root: Path) -> Path:
    base = root / "B. Disease Grading"
    header = "Image name,Retinopathy grade,Risk of macular edema ,,,,,,,,,"
    write_lines(base / "2. Groundtruths" / "a. IDRiD_Disease Grading_Training Labels.csv",
                [header, "IDRiD_001,3,2,,,,,,,,,", "IDRiD_002,0,0,,,,,,,,,", "IDRiD_003,2,1,,,,,,,,,"], bom=True)
    write_lines(base / "2. Groundtruths" / "b. IDRiD_Disease Grading_Testing Labels.csv",
                ["Image name,Retinopathy grade,Risk of macular edema ", "IDRiD_001,4,2", "IDRiD_002,1,0"])
    for i in (1, 2, 3):
        write_image(base / "1. Original Images" / "a. Training Set" / f"IDRiD_{i:03d}.jpg", seed=i)
    for i in (1, 2):
        write_image(base / "1. Original Images" / "b. Testing Set" / f"IDRiD_{i:03d}.jpg", seed=10 + i)
    return root


def test_idrid_layout_keys_by_split_and_name(tmp_path):
    ds = load_dataset(idrid_tree(tmp_path / "idrid"))
    assert ds.layout == "idrid"
    rec = ds.records
    assert rec.groupby("split")["grade"].apply(list).to_dict() == {"test": [4, 1], "train": [3, 0, 2]}
    assert rec["found"].all()
    # Same names in train and test are different files, and not patients.
    assert rec["path"].nunique() == 5
    assert rec["patient"].isna().all()
    # Pointing straight at the 'B. Disease Grading' folder works too.
    assert len(load_dataset(tmp_path / "idrid" / "B. Disease Grading").records) == 5


def test_folder_layouts(tmp_path):
    flat = tmp_path / "flat"
    for grade, folder in enumerate(["No_DR", "Mild", "Moderate", "Severe", "Proliferate_DR"]):
        for k in range(grade + 1):
            write_image(flat / folder / f"{k}_{'left' if k % 2 else 'right'}.png", seed=k)
    (flat / "Mild" / "notes.txt").write_text("not an image")
    ds = load_dataset(flat)
    assert ds.layout == "folders"
    assert ds.records["grade"].value_counts().sort_index().tolist() == [1, 2, 3, 4, 5]
    assert set(ds.records["split"]) == {"train"}

    split = tmp_path / "split"
    for s, n in (("train", 3), ("valid", 2), ("test", 1)):
        for g in range(5):
            for k in range(n):
                write_image(split / s / str(g) / f"{s}_{g}_{k}.png", seed=k)
    ds = load_dataset(split)
    assert ds.records.groupby("split").size().to_dict() == {"test": 5, "train": 15, "val": 10}


def test_csv_layout(tmp_path):
    write_image(tmp_path / "imgs" / "a.png")
    write_image(tmp_path / "imgs" / "b.jpg")
    csv = write_lines(tmp_path / "labels.csv", ["file,dr", "a.png,3", "b,1", "c.png,0"])
    ds = load_dataset(csv=csv, image_col="file", label_col="dr", images=tmp_path / "imgs")
    assert ds.layout == "csv"
    assert ds.records["grade"].tolist() == [3, 1, 0]
    assert ds.records["found"].tolist() == [True, True, False]
    with pytest.raises(RetinoError, match="expected columns img,dr; found file,dr"):
        load_dataset(csv=csv, image_col="img", label_col="dr", images=tmp_path / "imgs")


def test_paths_cannot_escape_the_images_folder(tmp_path):
    root = tmp_path / "kaggle"
    write_lines(root / "trainLabels.csv", ["image,level", "../../etc/passwd,0"])
    (root / "train").mkdir()
    with pytest.raises(RetinoError, match="points outside the images folder"):
        load_dataset(root)


def test_detection_errors(tmp_path):
    with pytest.raises(RetinoError, match="no such folder"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(RetinoError, match=r"no dataset layout recognised; looked for course .* found readme.txt"):
        load_dataset(tmp_path / "empty")
    both = course_tree(tmp_path / "both")
    write_lines(both / "trainLabels.csv", ["image,level", "1_left,0"])
    with pytest.raises(RetinoError, match="ambiguous layout, it looks like course and kaggle"):
        detect_layout(both)
    assert load_dataset(both, layout="kaggle").layout == "kaggle"
    with pytest.raises(RetinoError, match="unknown layout 'coco'"):
        load_dataset(both, layout="coco")
    write_lines(tmp_path / "k2" / "trainLabels.csv", ["image,level"])
    with pytest.raises(RetinoError, match="lists no images"):
        load_dataset(tmp_path / "k2")


def test_parse_patient_eye():
    assert parse_patient_eye("10_left") == ("10", "left")
    assert parse_patient_eye("44_RIGHT.jpeg") == ("44", "right")
    assert parse_patient_eye("IDRiD_001") == (None, None)
    assert parse_patient_eye("train_0001") == (None, None)


REAL = {
    "nycu-lab3-splits": ("course", {"train": [20656, 1955, 4210, 698, 581], "test": [5154, 488, 1082, 175, 127]}, 0),
    "eyepacs-256-lab": ("course", {"train": [372, 270, 622, 102, 83], "test": [88, 71, 148, 30, 16]}, 1802),
    "eyepacs-256": ("kaggle", {"train": [460, 341, 770, 132, 99]}, 1802),
    "idrid": ("idrid", {"train": [134, 20, 136, 74, 49]}, 413),
    "retinamnist": ("folders", {"train": [486, 128, 206, 194, 66], "val": [54, 12, 28, 20, 6]}, 1200),
    "kaggle-sample10": ("kaggle", {"train": [5, 2, 1, 0, 2]}, 10),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_datasets(shared_data, name):
    layout, counts, found = REAL[name]
    ds = load_dataset(shared_data / name)
    assert ds.layout == layout
    for split, expected in counts.items():
        got = ds.records[ds.records.split == split]["grade"].value_counts().reindex(range(5), fill_value=0)
        assert got.tolist() == expected
    assert int(ds.records["found"].sum()) == found
