from __future__ import annotations

import pandas as pd
import pytest
import torch

from retinocli.engine.dataset import EpochSampler, FundusDataset, IGNORE, carve_validation, class_weights, training_split
from retinocli.errors import RetinoError
from retinocli.data.layouts import load_dataset
from retinocli.imaging.preprocess import Preprocess


def table(n_patients: int) -> pd.DataFrame:
    rows = []
    for p in range(n_patients):
        grade = [0, 0, 0, 1, 2, 2, 3, 4][p % 8]
        for eye in ("left", "right"):
            rows.append({"image": f"{p}_{eye}", "path": f"/x/{p}_{eye}.jpeg", "found": True, "grade": grade,
                         "split": "train", "patient": str(p), "eye": eye})
    df = pd.DataFrame(rows)
    df["grade"] = df["grade"].astype("Int64")
    df["patient"] = df["patient"].astype("string")
    return df


def test_carved_validation_is_grouped_stratified_and_seeded():
    df = carve_validation(table(200), 0.1, seed=0)
    val = df[df.split == "val"]
    # 200 patients by worst grade: 75/25/50/25/25; 10 % of each, rounded -> 8/2/5/2/2 patients
    assert len(val) == 2 * 19
    # both eyes of a patient always land on the same side
    assert df.groupby("patient")["split"].nunique().max() == 1
    # stratified: each grade's share of val patients matches its share overall
    per_grade = val.drop_duplicates("patient")["grade"].value_counts().sort_index().tolist()
    assert per_grade == [8, 2, 5, 2, 2]
    assert df.equals(carve_validation(table(200), 0.1, seed=0))
    assert not df.equals(carve_validation(table(200), 0.1, seed=1))


def test_training_split_skips_missing_and_needs_training_images():
    df = table(20)
    df.loc[0, "found"] = False
    usable, notes = training_split(df, 0.1, 0)
    assert len(usable) == 39 and "skipping 1 listed image(s) missing on disk" in notes
    assert (usable.split == "val").sum() > 0
    with pytest.raises(RetinoError, match="no labelled training images"):
        training_split(df.assign(found=False), 0.1, 0)


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    a = EpochSampler(10, seed=5)
    a.set_epoch(3)
    b = EpochSampler(10, seed=5)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert sorted(i for i, _ in a) == list(range(10))
    shards = [list(EpochSampler(11, seed=5, rank=r, world=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6
    balanced = EpochSampler(1000, seed=0, weights=[1.0] * 900 + [9.0] * 100)
    rare = sum(i >= 900 for i, _ in balanced)
    assert 400 < rare < 600  # half the draws come from the rare 10 %


def test_class_weights():
    grades = [0] * 6 + [1] * 2 + [2] * 2 + [4] * 0
    w = class_weights(grades, "balanced")
    # n / (k * count) = 10/(3*6), 10/(3*2), 10/(3*2) -> 0.556, 1.667, 1.667, normalised to mean 1
    assert torch.allclose(w, torch.tensor([0.4286, 1.2857, 1.2857, 0.0, 0.0]), atol=1e-4)
    s = class_weights(grades, "sqrt")
    assert s[1] / s[0] == pytest.approx(3 ** 0.5, rel=1e-5)
    assert class_weights(grades, "none") is None


def test_dataset_yields_uint8_and_survives_broken_files(synth_data, tmp_path):
    rec = load_dataset(synth_data).records
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    ds = FundusDataset(rec.path.tolist()[:2] + [str(broken)], [0, 1, 2], Preprocess(size=32), augment="light")
    x, y = ds[(0, 123)]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and y == 0
    assert torch.equal(ds[(0, 123)][0], x)  # the same seed gives the same augmentation
    assert not torch.equal(ds[(0, 124)][0], x)
    x, y = ds[2]
    assert y == IGNORE and x.sum() == 0 and ds.failures[0][0] == str(broken)
