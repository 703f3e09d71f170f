from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from retinocli.engine.checkpoints import MODEL_KEYS, RESUME_KEYS, load_checkpoint, save_checkpoint
from retinocli.cli import app
from retinocli.config import TrainConfig
from retinocli.errors import RetinoError
from retinocli.rundir import HISTORY_FIELDS
from retinocli.engine.placement import with_index
from retinocli.engine.trainer import is_out_of_memory, out_of_memory_error, train
from builders import put_imagenet_weights
from builders import train_config as cfg

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def test_training_beats_the_majority_baseline(trained_run):
    out = json.loads((trained_run.parent / "train-output.json").read_text())
    run = Path(out["run_dir"])
    assert run == trained_run and run.name == "train"
    split = list(csv.DictReader(open(run / "split.csv")))
    val = [r for r in split if r["split"] == "val"]
    majority = max(sum(r["grade"] == str(g) for r in val) for g in range(5)) / len(val)
    best = out["best"]
    assert best["accuracy"] > majority + 0.05, (best, majority)
    assert best["qwk"] > 0.5
    # everything the run folder promises
    config = json.loads((run / "config.json").read_text())
    assert config["arch"] == "resnet18" and config["img_size"] == 48 and config["versions"]["torch"] == torch.__version__
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert list(rows[0]) == list(HISTORY_FIELDS) and len(rows) == 5
    assert all(float(r["images_per_second"]) > 0 for r in rows)
    assert {r["split"] for r in split} == {"train", "val", "test"}
    assert len(split) == 300
    # both eyes of each patient on one side of the train/val line
    sides = {}
    for r in split:
        sides.setdefault(r["image"].split("_")[0], set()).add(r["split"])
    assert all(len(s) == 1 for s in sides.values())
    ckpt = load_checkpoint(run / "best.pt")
    assert tuple(ckpt) == MODEL_KEYS  # what evaluate and export need, no training state
    assert ckpt["preprocess"]["size"] == 48 and ckpt["class_names"][4] == "Proliferative"
    assert ckpt["metrics"]["qwk"] == pytest.approx(best["qwk"])
    last = load_checkpoint(run / "last.pt")
    assert tuple(last) == MODEL_KEYS + RESUME_KEYS and last["epoch"] == 5


def test_best_pt_is_the_model_only_and_checkpoints_follow_the_umask(trained_run):
    best, last = (trained_run / "best.pt").stat(), (trained_run / "last.pt").stat()
    # AdamW keeps two moments per weight: last.pt is about three times best.pt
    assert best.st_size < 0.45 * last.st_size, (best.st_size, last.st_size)
    assert "optimizer" not in load_checkpoint(trained_run / "best.pt")
    umask = os.umask(0)
    os.umask(umask)
    for st in (best, last):
        assert stat.S_IMODE(st.st_mode) == 0o666 & ~umask  # like config.json, not mkstemp's 0600
    assert stat.S_IMODE((trained_run / "config.json").stat().st_mode) == 0o666 & ~umask


def test_resuming_from_best_pt_is_refused(trained_run):
    with pytest.raises(RetinoError) as err:
        train(resume=trained_run / "best.pt")
    text = str(err.value)
    assert "cannot resume from it, it lacks optimizer" in text and "\n" not in text
    assert text.endswith(f"resume from {trained_run / 'last.pt'}")


def test_resume_gives_the_same_weights(tiny_data, tmp_path):
    settings = dict(deterministic=True, augment="light", epochs=3, seed=7)
    full = train(cfg(tiny_data, tmp_path, name="full", **settings))
    # the default --augment-on auto is resolved when training starts: per image with OpenCV on a CPU
    assert json.loads((full.run_dir / "config.json").read_text())["augment_on"] == \
        ("device" if torch.cuda.is_available() else "opencv")

    def interrupt(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    cut = train(cfg(tiny_data, tmp_path, name="cut", **settings), on_epoch_end=interrupt)
    assert cut.stop == "interrupted" and cut.stopped.startswith("interrupted") and cut.epochs_done == 1
    assert load_checkpoint(cut.run_dir / "last.pt")["epoch"] == 1
    resumed = train(resume=cut.run_dir)
    assert resumed.run_dir == cut.run_dir and resumed.epochs_done == 3
    a = load_checkpoint(full.run_dir / "last.pt")["model"]
    b = load_checkpoint(cut.run_dir / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list(csv.DictReader(open(cut.run_dir / "history.csv")))) == 3
    with pytest.raises(RetinoError, match="already finished all 3 epochs"):
        train(resume=cut.run_dir)


def test_device_and_opencv_augmentation_do_not_depend_on_the_number_of_workers(tiny_data, tmp_path):
    settings = dict(deterministic=True, augment="strong", epochs=1, seed=3)
    runs = [train(cfg(tiny_data, tmp_path, name=f"w{w}", workers=w, augment_on="device", **settings))
            for w in (0, 2)]
    a, b = (load_checkpoint(r.run_dir / "last.pt")["model"] for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((runs[0].run_dir / "config.json").read_text())["augment_on"] == "device"
    # the old per-image way still trains, and what it sees differs from the batched way
    old = train(cfg(tiny_data, tmp_path, name="old", augment_on="workers", **settings))
    c = load_checkpoint(old.run_dir / "last.pt")["model"]
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # per image with OpenCV: each sample seeded by the sampler, so workers do not matter either
    cv = [train(cfg(tiny_data, tmp_path, name=f"cv{w}", workers=w, augment_on="opencv", **settings)) for w in (0, 2)]
    d, e = (load_checkpoint(r.run_dir / "last.pt")["model"] for r in cv)
    assert all(torch.equal(d[k], e[k]) for k in d)
    assert not all(torch.equal(c[k], d[k]) for k in c)


def test_a_config_from_before_batched_augmentation_keeps_the_per_image_way():
    old = {k: v for k, v in TrainConfig(augment="strong").to_dict().items() if k != "augment_on"}
    assert TrainConfig.from_dict(old).augment_on == "workers"
    assert TrainConfig.from_dict(TrainConfig(augment_on="device").to_dict()).augment_on == "device"
    assert TrainConfig().augment_on == "auto"  # device on CUDA, opencv elsewhere: resolved by train


def test_linear_mode_leaves_the_backbone_alone(tiny_data, tmp_path, torch_home):
    put_imagenet_weights("resnet18", "IMAGENET1K_V1", seed=11)
    from retinocli.models.registry import create_model

    start = create_model("resnet18", weights="IMAGENET1K_V1").state_dict()
    result = train(cfg(tiny_data, tmp_path, pretrained=True, mode="linear", img_size=40, augment="light"))
    end = load_checkpoint(result.run_dir / "last.pt")["model"]
    backbone = [k for k in start if not k.startswith("fc.")]
    assert backbone and all(torch.equal(start[k], end[k]) for k in backbone)  # weights and BN statistics
    assert not torch.equal(start["fc.weight"], end["fc.weight"])
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["weights"] == "DEFAULT" and config["small_stem"] is False


def test_two_stage_thaws_the_backbone(tiny_data, tmp_path, torch_home):
    put_imagenet_weights("resnet18", "IMAGENET1K_V1")
    from retinocli.models.registry import create_model

    start = create_model("resnet18", weights="IMAGENET1K_V1").state_dict()
    result = train(cfg(tiny_data, tmp_path, weights="IMAGENET1K_V1", mode="two-stage", head_epochs=1, epochs=2))
    end = load_checkpoint(result.run_dir / "last.pt")["model"]
    assert not torch.equal(start["layer1.0.conv1.weight"], end["layer1.0.conv1.weight"])


def test_nan_loss_stops_cleanly(tiny_data, tmp_path):
    result = train(cfg(tiny_data, tmp_path, lr=1e30, epochs=2))
    assert result.stop == "diverged" and "loss became nan" in result.stopped
    assert not (result.run_dir / "last.pt").exists() or load_checkpoint(result.run_dir / "last.pt")


def test_checkpoint_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(), "config": {}}, evil)
    with pytest.raises(RetinoError, match="refused or unreadable checkpoint"):
        load_checkpoint(evil)
    assert not marker.exists()
    good = save_checkpoint({"model": {"w": torch.ones(2)}, "config": {"arch": "resnet18"}}, tmp_path / "ok.pt")
    assert torch.equal(load_checkpoint(good)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    umask = os.umask(0o027)
    try:
        save_checkpoint({"model": {}, "config": {}}, tmp_path / "masked.pt")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "masked.pt").stat().st_mode) == 0o640


@pytest.mark.parametrize("args, message", [
    (["--arch", "resnet19"], "unknown architecture 'resnet19'"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--img-size", "-5"], "--img-size must be at least 8"),
    (["--mode", "frozen"], "--mode must be one of finetune, linear, two-stage"),
    (["--pretrained"], "put resnet18-f37072fd.pth"),
    (["--device", "cuda:3"], "--device cuda:3"),
    (["--data", "/nonexistent/data"], "no such folder"),
])
def test_bad_options(synth_data, tmp_path, torch_home, args, message):
    base = ["train", "--data", str(synth_data), "--epochs", "1", "--img-size", "32", "--workers", "0",
            "--project", str(tmp_path / "runs")]
    result = runner.invoke(app, base + args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_list_archs():
    result = runner.invoke(app, ["train", "--list-archs", "--json"])
    rows = json.loads(result.stdout)
    assert [r["arch"] for r in rows][:2] == ["resnet18", "resnet34"]
    assert rows[0]["parameters"] == 11_179_077


def test_torchrun_two_processes_on_cpu(tiny_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "retinocli", "train", "--data", str(tiny_data), "--img-size", "32", "--epochs", "1",
           "--batch-size", "16", "--workers", "0", "--device", "cpu", "--project", str(tmp_path / "runs")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    runs = list((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == ["train"]  # only rank 0 wrote
    ckpt = load_checkpoint(runs[0] / "last.pt")
    assert ckpt["epoch"] == 1 and not any(k.startswith("module.") for k in ckpt["model"])
    assert json.loads((runs[0] / "config.json").read_text())["world_size"] == 2


def test_a_broken_image_does_not_stop_training(synth_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    victims = sorted((data / "train").glob("*.jpeg"))[:3]
    victims[0].write_bytes(b"")
    victims[1].write_bytes(victims[2].read_bytes()[:200])
    result = train(cfg(data, tmp_path, epochs=1))
    assert result.stop == "completed" and result.stopped == "completed" and result.epochs_done == 1
    assert result.notes and result.notes[0].startswith("2 image(s) per epoch could not be read")


def test_torchrun_one_process_still_runs_distributed(tiny_data, tmp_path):
    """One GPU can try the DDP path: torchrun with one process wraps the model all the same."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "retinocli", "train", "--data", str(tiny_data), "--img-size", "32", "--epochs", "1",
           "--batch-size", "16", "--workers", "0", "--device", "cpu", "--project", str(tmp_path / "runs")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    config = json.loads((tmp_path / "runs" / "train" / "config.json").read_text())
    assert config["distributed"] is True and config["world_size"] == 1
    ckpt = load_checkpoint(tmp_path / "runs" / "train" / "last.pt")
    assert not any(k.startswith("module.") for k in ckpt["model"])


def test_plain_run_is_not_distributed(trained_run):
    config = json.loads((trained_run / "config.json").read_text())
    assert config["distributed"] is False and config["world_size"] == 1


def test_cuda_without_an_index_means_this_ranks_gpu():
    # torch.cuda.set_device(torch.device("cuda")) raises; the H100 run found it
    assert with_index(torch.device("cuda")) == torch.device("cuda", 0)
    assert with_index(torch.device("cuda"), local_rank=3) == torch.device("cuda", 3)
    assert with_index(torch.device("cuda", 1), local_rank=0) == torch.device("cuda", 1)
    assert with_index(torch.device("cpu")) == torch.device("cpu")


def test_out_of_memory_is_recognised_however_it_surfaces():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    try:  # torch.compile wraps the allocator's error in its own
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("backend compiler failed") from inner
    except RuntimeError as wrapped:
        assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an error torch raises


def test_out_of_memory_message_suggests_half_the_batch(tmp_path):
    config = TrainConfig(arch="resnet152", img_size=1024, batch_size=384)
    first = str(out_of_memory_error(config, 0, tmp_path))
    assert first == ("CUDA ran out of memory at --batch-size 384 (resnet152, 1024px); "
                     "try --batch-size 192 or a smaller --img-size")
    later = str(out_of_memory_error(config, 3, tmp_path))
    assert later.startswith(first) and f"{tmp_path}/last.pt keeps epoch 3" in later


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_optimizer_is_the_fused_one_where_torch_has_it(optimizer):
    """One kernel over every parameter: a ResNet18 AdamW step on one CPU core 894 ms -> 12 ms."""
    import torchvision

    from retinocli.engine.parts import build_optimizer

    model = torchvision.models.resnet18(num_classes=5)
    opt = build_optimizer(TrainConfig(optimizer=optimizer, weight_decay=0.05), model)
    kind = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
    try:
        kind([torch.zeros(1, requires_grad=True)], lr=0.1, fused=True)
        has_fused = True
    except (RuntimeError, TypeError, ValueError):
        has_fused = False
    assert isinstance(opt, kind) and bool(opt.defaults.get("fused")) == has_fused
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]  # no decay on biases and norms
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
