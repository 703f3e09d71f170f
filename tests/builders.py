"""Things tests build: tiny images and label files, data sets with known faults, run folders,
a tiny ONNX grader and ImageNet weights in torchvision's cache. Shared by the test files, so no
test file imports from another."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from retinocli import GRADE_NAMES
from retinocli.config import TrainConfig
from retinocli.imaging.preprocess import Preprocess
from retinocli.reporting import metrics

def write_image(path: Path, *, size: int = 32, seed: int = 0, fmt: str | None = None) -> Path:
    """A small random RGB image; the format follows the extension unless ``fmt`` says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def write_lines(path: Path, lines: list[str], *, bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def course_tree(root: Path) -> Path:
    write_lines(root / "train_img.csv", ["1_left", "1_right", "2_left", "2_right"])
    write_lines(root / "train_label.csv", ["0", "2", "4", "4"])
    write_lines(root / "test_img.csv", ["3_left", "3_right", "2_left"])
    write_lines(root / "test_label.csv", ["1", "0", "3"])
    for i, name in enumerate(["1_left.jpeg", "1_right.jpg", "2_left.png", "2_right.jpeg", "3_left.jpeg"]):
        write_image(root / "data" / name, seed=i)
    return root


def leaky_dataset(root):
    # patient 1 has one eye in each split; 2_left is listed in both splits; 4_right twice in train;
    # 5_left and 6_left are byte-identical files in different splits.
    write_lines(root / "train_img.csv", ["1_left", "2_left", "3_left", "3_right", "4_right", "4_right", "5_left", "7_left"])
    write_lines(root / "train_label.csv", ["0", "0", "1", "2", "0", "0", "3", "0"])
    write_lines(root / "test_img.csv", ["1_right", "2_left", "6_left", "8_left"])
    write_lines(root / "test_label.csv", ["0", "0", "3", "4"])
    for i, name in enumerate(["1_left", "1_right", "2_left", "3_left", "3_right", "4_right", "5_left"]):
        write_image(root / "data" / f"{name}.jpeg", seed=i, size=40)
    (root / "data" / "6_left.jpeg").write_bytes((root / "data" / "5_left.jpeg").read_bytes())
    (root / "data" / "7_left.jpeg").write_bytes(b"")  # zero bytes
    good = (root / "data" / "3_left.jpeg").read_bytes()
    (root / "data" / "8_left.jpeg").write_bytes(good[: len(good) // 2])  # truncated
    return root


def put_imagenet_weights(arch: str, name: str, seed: int = 0) -> dict:
    """Write a state dict (1000-class head) under the file name torchvision's cache expects."""
    import torch

    from retinocli.models.registry import cached_weight_file
    from torchvision.models import get_model

    torch.manual_seed(seed)
    state = get_model(arch, weights=None).state_dict()
    target = cached_weight_file(arch, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return state


SIZE = 16

# Channel means of a normalised image lie in about [-2.1, 2.6]; these weights make the
# five grades each win for some colour.
W = np.array([[3.0, -2.0, 0.5, 1.0, -3.0],
              [-1.0, 2.5, -2.0, 0.0, 2.0],
              [0.0, -1.0, 3.0, -2.5, 1.0]], np.float32)

B = np.array([0.1, -0.2, 0.0, 0.3, -0.1], np.float32)

INFO = {
    "grade_names": list(GRADE_NAMES),
    "preprocess": Preprocess(size=SIZE, mode="none").to_dict(),
    "arch": "resnet18", "weights": "imagenet", "mode": "finetune",
    "run": "exp1", "checkpoint": "best.pt", "checkpoint_sha256": "0123456789abcdef" * 4, "epoch": 7,
    "metrics": {"qwk": 0.8125, "accuracy": 0.7, "per_class_f1": [0.9, 0.1, 0.5, 0.0, 0.25],
                "note": "Ünïcode ok"},
    "precision": "fp32", "version": "0.1.0", "exported": "2024-05-01T12:00:00+00:00",
}

def build_tiny_onnx(path: Path, *, size: int = SIZE, fp16: bool = False, info: dict | None = None,
                input_name: str = "images", static_size: bool = True) -> Path:
    """Save the tiny grader; fp16 takes and returns float16 like a half-precision export.

    images -> GlobalAveragePool -> Flatten -> Gemm (3 -> 5, weights W, B) -> logits -> Softmax -> probs:
    small enough to recompute in numpy.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from retinocli.deploy.metadata import set_metadata
    dtype = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    side = size if static_size else "side"
    x = helper.make_tensor_value_info(input_name, dtype, ["batch", 3, side, side])
    outs = [helper.make_tensor_value_info(n, dtype, ["batch", 5]) for n in ("logits", "probs")]
    first = input_name
    nodes = []
    if fp16:
        nodes.append(helper.make_node("Cast", [input_name], ["x32"], to=TensorProto.FLOAT))
        first = "x32"
    last = ("logits32", "probs32") if fp16 else ("logits", "probs")
    nodes += [helper.make_node("GlobalAveragePool", [first], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
              helper.make_node("Gemm", ["flat", "W", "B"], [last[0]]),
              helper.make_node("Softmax", [last[0]], [last[1]], axis=1)]
    if fp16:
        nodes += [helper.make_node("Cast", ["logits32"], ["logits"], to=TensorProto.FLOAT16),
                  helper.make_node("Cast", ["probs32"], ["probs"], to=TensorProto.FLOAT16)]
    graph = helper.make_graph(nodes, "tiny", [x], outs,
                              [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # onnx 1.23 writes IR 14 by default; onnxruntime 1.31 reads up to 13
    if info is not False:
        set_metadata(model, {**INFO, "preprocess": Preprocess(size=size, mode="none").to_dict(),
                             "precision": "fp16" if fp16 else "fp32", **(info or {})})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A real 1x1 PNG whose IHDR (with a valid CRC) claims width x height."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


# val split: 74 % grade 0, so always answering No DR scores 74.0 % on validation
VAL_GRADES = [0] * 37 + [1] * 4 + [2] * 6 + [3] * 2 + [4] * 1

TEST_GRADES = [0] * 73 + [1] * 7 + [2] * 12 + [3] * 5 + [4] * 3  # majority 73.0 %

def history(val_acc, val_qwk, *, train_acc=None, seconds=2.0) -> list[dict]:
    n = len(val_acc)
    train_acc = train_acc or [min(0.99, a + 0.05) for a in val_acc]
    return [{"epoch": e + 1, "seconds": seconds + e % 2, "lr": 1e-3, "train_loss": 1.2 - 0.08 * e,
             "train_accuracy": train_acc[e], "val_loss": 1.0 - 0.05 * e, "val_accuracy": val_acc[e],
             "val_qwk": val_qwk[e], "val_balanced_accuracy": 0.3 + 0.02 * e, "images_per_second": 500.0}
            for e in range(n)]


def predictions(skill: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true, predicted, probs) over TEST_GRADES; skill 0 answers grade 0 for every image."""
    rng = np.random.default_rng(seed)
    y = np.array(TEST_GRADES)
    logits = rng.normal(0, 1, (len(y), 5)) + skill * np.eye(5)[y]
    logits[:, 0] += 1.0 if skill else 50.0
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return y, probs.argmax(1), probs


def make_run(root: Path, name: str, *, arch="resnet18", weights="DEFAULT", mode="finetune", hist=None,
             skill: float | None = None, select_metric="qwk", parameters: int | None = 11_689_512,
             epochs: int | None = None, val_grades=VAL_GRADES, eval_split="test") -> Path:
    """A run folder as retino train (and, when skill is given, retino evaluate) would leave it.

    ``eval_split`` only names the split in metrics.json; the scores are always over TEST_GRADES.
    """
    run = root / name
    run.mkdir(parents=True)
    hist = hist or history([0.70, 0.76, 0.78], [0.20, 0.55, 0.50])
    config = {"arch": arch, "weights": weights, "pretrained": weights is not None, "mode": mode, "img_size": 224,
              "epochs": epochs or len(hist), "batch_size": 32, "name": name, "select_metric": select_metric,
              "learning_rate": 3e-4, "versions": {"device": "cpu"},
              "dataset": {"root": str(root / "data"), "layout": "course"}}
    if parameters is not None:
        config["parameters"] = parameters
    (run / "config.json").write_text(json.dumps(config))
    pd.DataFrame(hist).to_csv(run / "history.csv", index=False)
    rows = [(f"tr{i}", g, "train") for i, g in enumerate(VAL_GRADES * 4)]
    rows += [(f"va{i}", g, "val") for i, g in enumerate(val_grades)]
    rows += [(f"te{i}", g, "test") for i, g in enumerate(TEST_GRADES)]
    pd.DataFrame([{"image": i, "path": f"/data/{i}.jpeg", "grade": g, "split": s, "patient": i, "eye": "left"}
                  for i, g, s in rows]).to_csv(run / "split.csv", index=False)
    if skill is not None:
        y, pred, probs = predictions(skill, seed=len(name))
        fpr, tpr, _ = metrics.roc_curve(y >= 2, probs[:, 2:].sum(1))
        (run / "metrics.json").write_text(json.dumps({
            "model": str(run / "best.pt"), "kind": "checkpoint", "run": str(run), "arch": arch, "weights": weights,
            "mode": mode, "epoch": 2, "data": "data", "split": eval_split, "tta": False, "runtime": "cpu",
            "n_images": len(y), "n_unreadable": 0, "seconds": 1.5,
            "grade_names": ["No DR", "Mild", "Moderate", "Severe", "Proliferative"],
            "metrics": metrics.summarize(y, pred, probs),
            "referable_roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}}))
    return run


def train_config(data, tmp_path, **kw) -> TrainConfig:
    """A TrainConfig for a tiny, quick CPU run (32 px, 2 epochs, no augmentation) into tmp_path/runs."""
    base = dict(data=str(data), img_size=32, epochs=2, batch_size=16, workers=0, project=str(tmp_path / "runs"),
                augment="none")
    base.update(kw)
    return TrainConfig(**base)




def replay_preset(preset: str, image, seed: int) -> dict:
    """The parameters torchvision's augmentation preset (``dataset.augmentation``) draws for a
    square CHW ``image`` under ``torch.manual_seed(seed)``, in ``augment.sample_params``' terms:
    drawn again in the order the preset's transforms draw them, shifts as fractions of the size,
    RandomRotation's angle turned to RandomAffine's sense."""
    import torch
    from torchvision.transforms import v2 as T

    from retinocli.engine.augment import COLOUR_OPS
    from retinocli.engine.dataset import augmentation

    size = image.shape[-1]
    flip_h, flip_v, geometry, jitter = augmentation(preset).transforms
    torch.manual_seed(seed)
    p: dict = {"flip_x": -1.0 if torch.rand(1) < flip_h.p else 1.0, "flip_y": -1.0 if torch.rand(1) < flip_v.p else 1.0}
    g = geometry.make_params([image])
    if isinstance(geometry, T.RandomAffine):
        p.update(angle=g["angle"], tx=g["translate"][0] / size, ty=g["translate"][1] / size, scale=g["scale"])
    else:
        p.update(angle=-g["angle"], tx=0.0, ty=0.0, scale=1.0)
    c = jitter.make_params([image])
    neutral = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
    p.update({k: c[f"{k}_factor"] if c[f"{k}_factor"] is not None else neutral[k] for k in COLOUR_OPS})
    p["order"] = c["fn_idx"].tolist()
    return p
