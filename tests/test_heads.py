"""Issue #14: grading heads, cut points, probabilities, EMA, GeM, mixup and --config files."""

from __future__ import annotations

import csv
import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score
from torch import nn
from typer.testing import CliRunner

from retinocli.engine.checkpoints import load_checkpoint, load_trained
from retinocli.cli import app
from retinocli.config import TrainConfig
from retinocli.models.cutpoints import fit_cutpoints, fit_scale, frequency_cutpoints, qwk
from retinocli.errors import RetinoError
from retinocli.models.grading import Grader, cut, default_cutpoints, ordinal_probs, scores
from retinocli.engine.regularize import BatchMix, make_ema
from retinocli.models.heads import GeM
from retinocli.rundir import RunDir
from retinocli.engine.trainer import train

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """60 synthetic images of 32 px: enough for 1-2 epochs of every head in seconds."""
    from retinocli.data.synth import generate

    out = tmp_path_factory.mktemp("tiny") / "data"
    generate(out, n=60, size=32, seed=1)
    return out


def cfg(data, tmp_path, **kw) -> TrainConfig:
    base = dict(data=str(data), img_size=16, epochs=1, batch_size=8, workers=0, project=str(tmp_path / "runs"),
                augment="none", val_fraction=0.3)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------- numpy post-processing


def test_qwk_equals_sklearn():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    assert qwk(y, p, 5) == pytest.approx(cohen_kappa_score(y, p, weights="quadratic"), abs=1e-12)


def test_ordinal_probabilities_are_a_distribution_even_from_crossing_logits():
    rng = np.random.default_rng(1)
    raw = rng.normal(0, 4, (500, 4))  # unsorted: P(y>k) would increase with k without the running minimum
    p = ordinal_probs(raw)
    assert p.shape == (500, 5) and (p >= 0).all()
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
    # sorted logits: exactly the differences of the cumulative sigmoids
    s = np.sort(raw, axis=1)[:, ::-1]
    cum = 1 / (1 + np.exp(-s))
    expected = np.column_stack([1 - cum[:, 0], cum[:, :-1] - cum[:, 1:], cum[:, -1]])
    np.testing.assert_allclose(ordinal_probs(s), expected, atol=1e-12)
    # the expected grade the cut points threshold is sum_k P(y > k)
    np.testing.assert_allclose(p @ np.arange(5), scores("ordinal", raw), atol=1e-12)


def test_regression_grade_is_the_argmax_of_its_probabilities():
    g = Grader("regression", 5, (0.3, 1.2, 2.9, 3.1), scale=0.4)
    x = np.linspace(-2, 6, 801)
    probs = g.probabilities(x[:, None])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    assert (probs >= 0).all()
    off_cut = np.all(np.abs(x[:, None] - np.array(g.cutpoints)) > 1e-6, axis=1)
    np.testing.assert_array_equal(g.grades(probs)[off_cut], cut(x, g.cuts)[off_cut])


def test_fitted_cut_points_beat_rounding_on_a_squeezed_score():
    # a model that learnt the order but predicts grade / 2: rounding puts nearly all in grades 0-2
    rng = np.random.default_rng(2)
    y = rng.integers(0, 5, 400)
    s = 0.5 * y + rng.normal(0, 0.15, 400)
    default = cohen_kappa_score(y, cut(s, default_cutpoints(5)), weights="quadratic")
    cuts = fit_cutpoints(s, y, 5)
    fitted = cohen_kappa_score(y, cut(s, cuts), weights="quadratic")
    assert np.all(np.diff(cuts) >= 0)
    assert fitted > default + 0.05 and fitted > 0.95
    np.testing.assert_allclose(cuts, [0.25, 0.75, 1.25, 1.75], atol=0.15)


def test_cut_points_match_a_brute_force_grid_on_a_tiny_case():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 14)
    s = y + rng.normal(0, 0.8, 14)
    u = np.unique(s)
    grid = np.concatenate([[u[0] - 1], (u[:-1] + u[1:]) / 2, [u[-1] + 1]])
    brute = max(cohen_kappa_score(y, cut(s, np.array(c)), weights="quadratic", labels=[0, 1, 2])
                for c in itertools.combinations_with_replacement(grid, 2))
    cuts = fit_cutpoints(s, y, 3, strength=0.0)
    assert cohen_kappa_score(y, cut(s, cuts), weights="quadratic", labels=[0, 1, 2]) == pytest.approx(brute)


def test_cut_points_stay_home_on_tiny_noisy_validation():
    # 10 images of pure noise: the regularisation keeps the rounding thresholds
    rng = np.random.default_rng(4)
    cuts = fit_cutpoints(rng.normal(2, 1, 10), rng.integers(0, 5, 10), 5)
    assert np.abs(cuts - default_cutpoints(5)).max() < 1.0
    assert np.array_equal(fit_cutpoints(np.zeros(3), np.zeros(3, int), 5), default_cutpoints(5))


def test_frequency_cut_points_give_each_grade_its_share():
    """Worked by hand: ten scores 0..9 and grades 4/3/2/1/0 of ten: the thresholds are the
    0.4, 0.7, 0.9 and 1.0 quantiles, so cutting gives back exactly those counts."""
    s = np.arange(10.0)
    y = np.array([0] * 4 + [1] * 3 + [2] * 2 + [3])
    cuts = frequency_cutpoints(s, y, 5)
    np.testing.assert_allclose(cuts, np.quantile(s, [0.4, 0.7, 0.9, 1.0]))
    assert np.bincount(cut(s - 0.01, cuts), minlength=5).tolist() == [4, 3, 2, 1, 0]
    # pulled toward them instead of toward rounding, a noisy fit lands nearer them
    rng = np.random.default_rng(6)
    noisy_s, noisy_y = rng.normal(1, 0.3, 40), rng.integers(0, 5, 40)
    to_freq = fit_cutpoints(noisy_s, noisy_y, 5, strength=50.0, prior="frequencies")
    to_round = fit_cutpoints(noisy_s, noisy_y, 5, strength=50.0)
    home = frequency_cutpoints(noisy_s, noisy_y, 5)
    assert np.abs(to_freq - home).sum() < np.abs(to_round - home).sum()


def test_regression_scale_is_the_grid_point_of_least_nll():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 5, 300)
    tight, loose = (fit_scale(y + rng.normal(0, sd, 300), y, default_cutpoints(5)) for sd in (0.1, 1.5))
    assert tight < loose


# ---------------------------------------------------------------------------- torch pieces


def test_gem_with_p_one_is_average_pooling():
    x = torch.rand(2, 8, 5, 7)
    gem = GeM(p=1.0)
    torch.testing.assert_close(gem(x), nn.AdaptiveAvgPool2d(1)(x))
    assert GeM().p.item() == 3.0 and GeM().p.requires_grad


def test_ema_equals_a_hand_computed_average_after_two_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = make_ema(model, 0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    snapshots = []
    for _ in range(2):
        loss = model(torch.randn(6, 3)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update_parameters(model)
        snapshots.append({k: v.detach().clone().float() for k, v in model.state_dict().items()})
    for key, value in ema.module.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        expected = 0.9 * snapshots[0][key] + 0.1 * snapshots[1][key]  # the first update copies
        torch.testing.assert_close(value.float(), expected, msg=key)


def test_mixing_is_deterministic_from_seed_epoch_and_step():
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8)
    for kind in ({"mixup": 0.4}, {"cutmix": 1.0}, {"mixup": 0.4, "cutmix": 1.0}):
        a, b = BatchMix(seed=3, **kind), BatchMix(seed=3, **kind)
        a.set_epoch(2)
        b.set_epoch(2)
        xa, ya, pa, la = a(x, y, 5)
        xb, yb, pb, lb = b(x, y, 5)
        assert torch.equal(xa, xb) and torch.equal(pa, pb) and la == lb and 0 <= la <= 1
        xc, _, _, lc = a(x, y, 6)
        assert not torch.equal(xa, xc)
    xm, _, partner, lam = BatchMix(mixup=0.4, seed=0)(x, y, 1)
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x[partner])  # partner labels index the images


# ---------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("head", ["regression", "ordinal", "classification"])
def test_each_head_trains_and_evaluate_and_predict_agree(head, tiny_data, tmp_path):
    from retinocli.reporting.evaluate import evaluate
    from retinocli.deploy.export import export
    from retinocli.deploy.predict import predict_folder
    from retinocli.deploy.metadata import read_model_info
    from retinocli.deploy.onnx_model import OnnxGrader

    result = train(cfg(tiny_data, tmp_path, head=head, epochs=2, pool="gem" if head == "ordinal" else "avg",
                       ema=0.5 if head == "regression" else 0.0))
    assert result.epochs_done == 2 and np.isfinite(result.best_metrics["qwk"])
    best = load_checkpoint(RunDir(result.run_dir).best)
    grader = Grader.from_dict(best["grader"])
    assert grader.head == head
    if head != "classification":
        assert len(grader.cutpoints) == 4 and list(grader.cutpoints) == sorted(grader.cutpoints)
    exported = export(result.run_dir)
    info = read_model_info(exported.path)
    assert info.grading == grader
    assert exported.parity["max_abs_diff_probs"] < 1e-4

    ev = evaluate(exported.path, split="val", out=tmp_path / "eval")
    ev_ckpt = evaluate(result.run_dir, split="val", out=tmp_path / "eval-ckpt")
    assert ev.report["metrics"]["qwk"] == pytest.approx(ev_ckpt.report["metrics"]["qwk"], abs=1e-9)
    rows = list(csv.DictReader(open(ev.predictions_path)))
    probs = np.array([[float(r[f"prob_{g}"]) for g in range(5)] for r in rows])
    assert (probs >= 0).all() and np.allclose(probs.sum(1), 1, atol=1e-5)
    y = np.array([int(r["true_grade"]) for r in rows])
    pred = np.array([int(r["predicted_grade"]) for r in rows])
    assert ev.report["metrics"]["qwk"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"), abs=1e-9)

    folder = tmp_path / "images"
    folder.mkdir()
    for r in rows:
        shutil.copy(r["path"], folder / Path(r["path"]).name)
    predict_folder(folder, OnnxGrader(exported.path, "cpu", threads=1), out=tmp_path / "pred.csv")
    predicted = {r["image"]: int(r["predicted_grade"]) for r in csv.DictReader(open(tmp_path / "pred.csv"))}
    assert predicted == {Path(r["path"]).name: int(r["predicted_grade"]) for r in rows}


def test_resume_with_ema_gives_the_same_weights(tiny_data, tmp_path):
    settings = dict(deterministic=True, epochs=2, seed=7, ema=0.8, head="ordinal", mixup=0.2, select_metric="last")
    full = train(cfg(tiny_data, tmp_path, name="full", **settings))

    def interrupt(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    cut_run = train(cfg(tiny_data, tmp_path, name="cut", **settings), on_epoch_end=interrupt)
    assert cut_run.epochs_done == 1
    train(resume=cut_run.run_dir)
    a, b = (load_checkpoint(RunDir(r.run_dir).last) for r in (full, cut_run))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    # best.pt (the last epoch here) serves the averaged weights, not the raw ones, and so does
    # last.pt when loaded to serve: its grader was fitted on the averaged model's outputs
    best = load_checkpoint(RunDir(full.run_dir).best)
    assert best["epoch"] == 2 and best["grader"] == a["grader"]
    ema_weights = {k.removeprefix("module."): v for k, v in a["ema"].items() if k.startswith("module.")}
    assert all(torch.equal(best["model"][k], ema_weights[k]) for k in best["model"])
    assert not all(torch.equal(a["model"][k], ema_weights[k]) for k in a["model"])
    served_last, _ = load_trained(RunDir(full.run_dir).last)
    assert all(torch.equal(v, ema_weights[k]) for k, v in served_last.state_dict().items())


def test_config_file_is_overridden_by_the_command_line(tiny_data, tmp_path):
    toml = tmp_path / "recipe.toml"
    toml.write_text(f'data = "{tiny_data.as_posix()}"\nimg-size = 16\nepochs = 3\nbatch_size = 8\nworkers = 0\n'
                    f'head = "ordinal"\nema = 0.5\naugment = "none"\nval_fraction = 0.3\n'
                    f'project = "{(tmp_path / "runs").as_posix()}"\n')
    result = runner.invoke(app, ["train", "--config", str(toml), "--epochs", "1", "--name", "fromfile", "--json"])
    assert result.exit_code == 0, result.output
    saved = RunDir(tmp_path / "runs" / "fromfile").read_config()
    assert (saved["epochs"], saved["head"], saved["ema"], saved["img_size"]) == (1, "ordinal", 0.5, 16)

    bad = tmp_path / "bad.toml"
    bad.write_text('epochs = 2\nlearning_rat = 0.1\n')
    result = runner.invoke(app, ["train", "--config", str(bad)])
    assert result.exit_code == 2
    assert "unknown key 'learning_rat'" in result.output and "Traceback" not in result.output
    broken = tmp_path / "broken.toml"
    broken.write_text("epochs = = 2\n")
    result = runner.invoke(app, ["train", "--config", str(broken)])
    assert result.exit_code == 2 and "not valid toml" in result.output


def test_bad_head_options_are_one_line_errors():
    with pytest.raises(RetinoError, match="--head must be one of"):
        TrainConfig(head="softmax")
    with pytest.raises(RetinoError, match="--ema must be in"):
        TrainConfig(ema=1.0)
    with pytest.raises(RetinoError, match="classification head only"):
        TrainConfig(head="ordinal", label_smoothing=0.1)
    with pytest.raises(RetinoError, match="--mixup must be"):
        TrainConfig(mixup=-1)


def test_coral_loss_is_the_summed_binary_cross_entropy_of_the_levels():
    from retinocli.models.heads import HeadLoss, coral_loss

    out = torch.tensor([[2.0, 0.5, -1.0, -3.0], [0.0, 0.0, 0.0, 0.0]])
    y = torch.tensor([2, 0])
    levels = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], float)  # grade > k
    s = 1 / (1 + np.exp(-out.numpy().astype(float)))
    expected = -(levels * np.log(s) + (1 - levels) * np.log(1 - s)).sum(1)
    np.testing.assert_allclose(coral_loss(out, y).numpy(), expected, rtol=1e-6)
    # unreadable images (target -100) are left out of the mean
    loss = HeadLoss("ordinal")(torch.cat([out, out[:1]]), torch.tensor([2, 0, -100]))
    assert loss.item() == pytest.approx(expected.mean(), rel=1e-6)


def test_coral_prior_bias_gives_a_featureless_image_the_grade_prior():
    from retinocli.models.heads import coral_prior_bias

    counts = np.array([486.0, 128, 206, 194, 66])  # RetinaMNIST train's grades (1,080 images)
    bias = coral_prior_bias(counts)
    # worked by hand: P(grade > 0) = 594/1080, logit = log(594/486) = 0.20067; P(grade > 3) = 66/1080
    assert bias[0].item() == pytest.approx(0.20067, abs=1e-5)
    assert bias[3].item() == pytest.approx(np.log(66 / 1014), abs=1e-6)
    np.testing.assert_allclose(ordinal_probs(bias.numpy()[None, :].astype(np.float64))[0], counts / counts.sum(),
                               atol=1e-6)
    # an absent grade counts half the rarest: finite, ordered biases
    sparse = coral_prior_bias([10.0, 0, 4, 2, 0])
    assert torch.isfinite(sparse).all() and (sparse.diff() < 0).all()
    np.testing.assert_allclose(ordinal_probs(sparse.numpy()[None, :].astype(np.float64))[0],
                               np.array([10, 1, 4, 2, 1]) / 18, atol=1e-6)
    with pytest.raises(ValueError, match="at least one graded image"):
        coral_prior_bias([0.0] * 5)


@pytest.mark.parametrize("sampler,weights", [("uniform", "none"), ("uniform", "sqrt"), ("balanced", "none")])
def test_ordinal_training_starts_from_the_prior_its_loss_sees(sampler, weights, tiny_data, tmp_path):
    from retinocli.engine.dataset import class_counts
    from retinocli.engine.parts import build_data, build_parts
    from retinocli.engine.placement import Placement

    c = cfg(tiny_data, tmp_path, head="ordinal", sampler=sampler, class_weights=weights)
    place = Placement.choose("cpu")
    data = build_data(c, place)
    counts = class_counts(data.train_grades).astype(float)
    assert (counts > 0).all()
    # what each grade weighs in the loss: its count; count x (1/count)^0.5; one each when drawn evenly
    share = {"none": counts, "sqrt": np.sqrt(counts)}[weights] if sampler == "uniform" else np.ones(5)
    parts = build_parts(c, place, data, None)
    probs = ordinal_probs(parts.core.fc.bias.detach().double().numpy()[None, :])[0]
    np.testing.assert_allclose(probs, share / share.sum(), atol=1e-6)
    assert parts.ema is None


def test_best_index_is_the_rule_training_keeps():
    import pandas as pd

    from retinocli.rundir import best_index, improves

    h = pd.DataFrame({"epoch": [1, 2, 3, 4], "val_qwk": [0.5, 0.7, 0.7, 0.6], "val_loss": [1.2, 1.0, 1.1, float("nan")],
                      "val_accuracy": [float("nan")] * 4})
    assert best_index(h, "qwk") == 1  # the first of a tie, as the trainer's strict ">"
    assert best_index(h, "loss") == 1
    assert best_index(h, "last") == 3
    assert best_index(h, "accuracy") is None
    assert best_index(h.iloc[:0], "last") is None
    nan = float("nan")
    assert best_index(pd.DataFrame({"val_qwk": [nan, 0.3, nan]}), "qwk") == 1  # a finite value replaces NaN
    assert [improves("qwk", 0.7, 0.7), improves("loss", 0.9, 1.0), improves("loss", nan, 1.0),
            improves("qwk", nan, None), improves("last", 0.1, 0.9)] == [False, True, False, True, True]


def test_select_last_keeps_the_final_epoch_and_refuses_patience(tiny_data, tmp_path):
    from retinocli.engine.seeds import train_seeds
    from retinocli.reporting.runs import load_run

    with pytest.raises(RetinoError, match="--select-metric last watches none"):
        TrainConfig(select_metric="last", patience=2)
    seeds = train_seeds(cfg(tiny_data, tmp_path, head="ordinal", epochs=3, select_metric="last", name="last"), [0])
    run = seeds.runs[0]
    best, last = (load_checkpoint(p) for p in (RunDir(run.run_dir).best, RunDir(run.run_dir).last))
    assert best["epoch"] == last["epoch"] == 3
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])
    assert best["grader"] == last["grader"]
    assert load_run(run.run_dir).best_epoch == 3 and run.best_epoch == 3


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "examples" / "recipes").glob("*.toml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_are_valid_train_configs(recipe):
    import dataclasses

    from retinocli.config import read_config_file

    values = read_config_file(recipe, {f.name for f in dataclasses.fields(TrainConfig)})
    made = TrainConfig(**values)
    assert made.head == "ordinal" and made.name == recipe.stem
    if recipe.stem == "retinamnist":
        assert (made.img_size, made.epochs, made.select_metric, made.ema) == (28, 12, "last", 0.98)
