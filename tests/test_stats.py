from __future__ import annotations

import pytest

from builders import leaky_dataset, write_lines
from retinocli.data.layouts import load_dataset
from retinocli.data.stats import balance_chart, dataset_stats, grade_balance, plot_balance, warnings


def test_grade_balance_numbers():
    b = grade_balance([0] * 147 + [1] * 14 + [2] * 30 + [3] * 5 + [4] * 4)
    assert b["counts"] == [147, 14, 30, 5, 4]
    assert b["labelled"] == 200
    assert b["majority_grade"] == 0
    assert b["majority_accuracy"] == pytest.approx(0.735)
    assert b["imbalance_ratio"] == pytest.approx(147 / 4)
    assert b["shares"][2] == pytest.approx(0.15)
    assert grade_balance([2, 2, None])["absent_grades"] == [0, 1, 3, 4]
    assert grade_balance([])["majority_accuracy"] is None


def test_stats_leakage_and_broken_files(tmp_path):
    ds = load_dataset(leaky_dataset(tmp_path / "lab"))
    s = dataset_stats(ds, sample=None)
    assert s["splits"]["train"]["counts"] == [5, 1, 1, 1, 0]
    assert s["splits"]["test"]["counts"] == [2, 0, 0, 1, 1]
    assert s["splits"]["test"]["majority_accuracy"] == pytest.approx(0.5)
    p = s["patients"]
    assert p["patients"] == 8
    assert p["straddling_splits"] == 2  # patients 1 and 2
    assert p["straddling_by_splits"] == {"test + train": 2}
    leak = s["leakage"]
    assert leak["same_image_across_splits"] == 1 and leak["same_image_examples"] == ["2_left.jpeg"]
    assert leak["duplicate_rows_within_split"] == 1 and leak["duplicate_row_examples"] == ["4_right"]
    assert leak["same_content_across_splits"] == 1
    assert leak["same_content_examples"] == [["5_left.jpeg", "6_left.jpeg"]]
    files = s["files"]
    assert files["missing"] == 0
    assert files["checked"] == 10 and files["checked_scope"] == "all"
    reasons = {r["path"].rsplit("/", 1)[1]: r["reason"] for r in files["unreadable"]}
    assert reasons["7_left.jpeg"] == "empty file"
    assert "truncated" in reasons["8_left.jpeg"] or "broken" in reasons["8_left.jpeg"]
    assert files["formats"] == {"JPEG": 8} and files["width"] == {"min": 40, "median": 40, "max": 40}
    lines = warnings(s)
    assert any("2 patient(s) have images in more than one split" in w for w in lines)
    assert any("1 image(s) appear in more than one split" in w for w in lines)
    assert any("2 image(s) cannot be read" in w for w in lines)
    assert any("train: no images of grade 4 Proliferative" in w for w in lines)


def test_stats_on_labels_alone(tmp_path):
    root = tmp_path / "labels-only"
    write_lines(root / "train_img.csv", ["1_left", "1_right", "2_left"])
    write_lines(root / "train_label.csv", ["0", "0", "2"])
    s = dataset_stats(load_dataset(root))
    assert s["files"]["missing"] == 3 and s["files"]["checked"] == 0
    assert s["splits"]["train"]["counts"] == [2, 0, 1, 0, 0]
    assert s["splits"]["train"]["majority_accuracy"] == pytest.approx(2 / 3)


def test_sample_limits_images_checked(tmp_path):
    root = leaky_dataset(tmp_path / "lab")
    s = dataset_stats(load_dataset(root), sample=3, seed=1)
    assert s["files"]["checked"] == 3 and s["files"]["checked_scope"] == "sample"


def test_balance_chart_is_the_report_chart(tmp_path):
    from PIL import Image

    from retinocli.reporting.figures import DPI, FIGSIZE, grade_label

    s = dataset_stats(load_dataset(leaky_dataset(tmp_path / "lab")), sample=0)
    fig = balance_chart(s)
    (ax,) = fig.axes
    assert ax.get_title() == "Images per DR grade, by split\nlab (course layout)"
    assert [t.get_text() for t in ax.get_xticklabels()] == [grade_label(g) for g in range(5)] == \
        ["0 No DR", "1 Mild", "2 Moderate", "3 Severe", "4 Proliferative"]
    assert [[bar.get_height() for bar in bars] for bars in ax.containers] == [[5, 1, 1, 1, 0], [2, 0, 0, 1, 1]]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "train: 8 images; always No DR scores 62.5%", "test: 4 images; always No DR scores 50.0%"]
    assert not fig.legends  # inside the axes
    out = plot_balance(s, tmp_path / "figs" / "balance.png")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == tuple(round(v * DPI) for v in FIGSIZE["balance"])


def test_complete_course_split(shared_data):
    s = dataset_stats(load_dataset(shared_data / "nycu-lab3-splits"))
    assert s["splits"]["train"]["counts"] == [20656, 1955, 4210, 698, 581]
    assert s["splits"]["test"]["counts"] == [5154, 488, 1082, 175, 127]
    assert s["splits"]["train"]["majority_accuracy"] == pytest.approx(20656 / 28100)
    assert s["patients"]["straddling_splits"] == 5618
    assert s["patients"]["patients"] == 17563
    assert s["files"]["missing"] == 35126


def test_full_size_photos(shared_data):
    s = dataset_stats(load_dataset(shared_data / "kaggle-sample10"), sample=None)
    assert s["files"]["checked"] == 10 and not s["files"]["unreadable"]
    assert s["files"]["width"]["min"] == 2592 and s["files"]["width"]["max"] == 4928
