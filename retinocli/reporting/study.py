"""Seeds and paired comparison (issue #15): what ``retino report`` and ``retino compare`` say when
the runs form recipes trained with several seeds, or when two recipes were evaluated on the same
images.

* A *recipe* is a set of runs whose config.json agree on every setting but the seed (and the
  run's name, folder and loader processes, which change no weight: :data:`retinocli.config.NOT_RECIPE`). Each
  recipe gets the mean ± sample sd (ddof 1) of its headline metrics over its seeds, with the
  per-seed values (:func:`summarise`, built on :func:`retinocli.reporting.clinical.summarise_seeds`).
* Two recipes whose every run was evaluated on the same images (predictions.csv, matched by
  image name, same true grades) get a paired bootstrap of the difference A − B in QWK and
  referable AUC, with its 95 % interval and a verdict: "distinguishable from zero" when the
  interval excludes 0 (:func:`seed_paired_bootstrap`).

How a recipe's seeds enter the paired comparison: each seed's metric, averaged over the seeds.
Every bootstrap resample draws patients (images where names carry none) and, within each
recipe, seeds, both with replacement; each drawn seed's metric is computed on the drawn images
and the drawn seeds' metrics are averaged. The point estimate is therefore the difference of
the mean ± sd rows printed above it. Not averaged probabilities: those score the ensemble of
the seeds, a better model than any run a user trains and deploys. Not pooled rows either (every
seed's predictions stacked as rows of one set, as this module first did): a rank metric over
them ranks one model's scores against another's, so two seeds that order the images alike but
on different scales lose AUC. Measured on RetinaMNIST (RESULTS.md, 2026-11-28): OpenCV against
torchvision augmentation, three seeds each, referable AUC 0.845 ± 0.003 against 0.848 ± 0.006,
but pooled −0.111 (one seed was chosen at epoch 2, its probabilities squeezed). Why seeds are
resampled too: the question is whether the difference is more than seed noise (#15), and an
interval that held the seeds fixed would count only which images happened to be in the test
set. With one run per recipe this is
:func:`retinocli.reporting.bootstrap.paired_bootstrap` exactly.

Writes, beside report.md: ``study.json`` (everything), ``seeds.csv`` (recipe x metric: n, mean,
sd, per-seed values) and ``paired.csv`` (a row per comparison and metric). No torch here.

Public API:

* ``study(load_runs(paths))`` (:func:`retinocli.reporting.report.load_runs`): the whole section
  as data; :func:`write_study` also writes the files; :func:`markdown_lines` its report.md text.
* :func:`recipes` / :func:`summarise`: runs -> recipes -> mean ± sd and per-seed values;
  :func:`mean_sd` formats one (``0.412 ± 0.021``, ``52.3 % ± 2.1 %``).
* :func:`seed_paired_bootstrap`: the paired difference of two recipes from arrays;
  :func:`seed_predictions` / :func:`paired_comparison`: the same from run folders.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from retinocli.config import recipe_key
from retinocli.errors import RetinoError, atomic_write
from retinocli.reporting import bootstrap, clinical
from retinocli.rundir import RunDir

if TYPE_CHECKING:
    from retinocli.reporting.runs import RunSummary

#: The headline metrics summarised over seeds, in table order: the best epoch's validation
#: metrics (history.csv) and, when evaluated, metrics.json's.
METRIC_LABELS = {"val_accuracy": "val accuracy", "val_qwk": "val QWK", "accuracy": "accuracy",
                 "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1", "qwk": "QWK",
                 "referable_sensitivity": "referable sensitivity",
                 "referable_specificity": "referable specificity", "referable_auc": "referable AUC"}
PERCENT = ("val_accuracy", "accuracy", "balanced_accuracy", "referable_sensitivity", "referable_specificity")
#: What the paired comparison bootstraps (names of :data:`retinocli.reporting.bootstrap.METRICS`).
PAIRED_METRICS = ("qwk", "referable_auc")
N_BOOT, SEED, LEVEL = 1000, 0, 0.95
STUDY_JSON, SEEDS_CSV, PAIRED_CSV = "study.json", "seeds.csv", "paired.csv"


# ------------------------------------------------------------------------------ recipes


@dataclass
class Recipe:
    """Runs trained alike but for the seed, in the order the report lists them."""

    name: str
    runs: list[RunSummary]

    @property
    def seeds(self) -> list[Any]:
        return [r.config.get("seed") for r in self.runs]


def _recipe_name(runs: list[RunSummary]) -> str:
    """``train`` for ``train-s0``, ``train-s1``; else the first run's name and how many more."""
    stems = {re.sub(r"-s\d+$", "", r.name) for r in runs}
    if len(runs) > 1 and len(stems) == 1 and all(re.search(r"-s\d+$", r.name) for r in runs):
        return stems.pop()
    return runs[0].name if len(runs) == 1 else f"{runs[0].name} (+{len(runs) - 1} seeds)"


def recipes(runs: Sequence[RunSummary]) -> list[Recipe]:
    """Group runs by :func:`retinocli.config.recipe_key`, in order of first appearance; names made unique."""
    groups: dict[str, list[RunSummary]] = {}
    for run in runs:
        groups.setdefault(recipe_key(run.config), []).append(run)
    out: list[Recipe] = []
    for g in groups.values():
        name, k = _recipe_name(g), 2
        while any(r.name == name for r in out):  # train-s0, train-s1 of two projects, trained apart
            name, k = f"{_recipe_name(g)} ({k})", k + 1
        out.append(Recipe(name, g))
    return out


# -------------------------------------------------------------------------- mean ± sd


def _number(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def run_values(run: RunSummary) -> dict[str, float]:
    """One run's headline metrics (:data:`METRIC_LABELS`); NaN where it has none."""
    best = run.best_row()
    out = {"val_accuracy": _number(best.get("val_accuracy")), "val_qwk": _number(best.get("val_qwk"))}
    m = (run.metrics or {}).get("metrics") or {}
    ref = m.get("referable") or {}
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "qwk"):
        out[key] = _number(m.get(key))
    for key in ("sensitivity", "specificity", "auc"):
        out[f"referable_{key}"] = _number(ref.get(key))
    return out


def _evaluation(run: RunSummary) -> tuple | None:
    """What a run was evaluated on, comparably across seeds (the split, how many images, TTA)."""
    m = run.metrics
    return None if m is None else (m.get("split"), m.get("n_images"), bool(m.get("tta")))


def summarise(recipe: Recipe) -> dict[str, Any]:
    """Mean ± sd and per-seed values of a recipe's headline metrics.

    Test metrics are summarised over the seeds evaluated like its first evaluated seed (same
    split, image count and TTA); a note names any seed left out.
    """
    values = [run_values(r) for r in recipe.runs]
    evaluated = [_evaluation(r) for r in recipe.runs]
    first = next((e for e in evaluated if e is not None), None)
    notes = [f"`{r.name}` is not evaluated" if e is None else f"`{r.name}` was evaluated on other images"
             for r, e in zip(recipe.runs, evaluated) if e != first and first is not None]
    for v, e in zip(values, evaluated):
        if e != first:
            v.update({k: math.nan for k in v if not k.startswith("val_")})
    stats = clinical.summarise_seeds(values)
    return {"recipe": recipe.name, "runs": [r.name for r in recipe.runs], "paths": [str(r.dir) for r in recipe.runs],
            "seeds": recipe.seeds, "evaluated_on": None if first is None else
            {"split": first[0], "n_images": first[1], "tta": first[2]},
            "metrics": {k: stats[k] for k in METRIC_LABELS if k in stats and stats[k]["n"]},
            "per_run": [{k: v if math.isfinite(v) else None for k, v in row.items()} for row in values],
            "notes": notes}


# ------------------------------------------------------------------- paired bootstrap


def _stack(y_pred: ArrayLike, probs: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    p = p[None] if p.ndim == 2 else p
    y = np.asarray(y_pred)
    y = y[None] if y.ndim == 1 else y
    if p.ndim != 3 or y.shape != p.shape[:2]:
        raise ValueError(f"y_pred {y.shape} and probs {p.shape} must be (seeds, n) and (seeds, n, K)")
    return y, p


def seed_paired_bootstrap(y_true: ArrayLike, pred_a: ArrayLike, probs_a: ArrayLike, pred_b: ArrayLike,
                          probs_b: ArrayLike, *, groups: ArrayLike | None = None,
                          metric_names: Sequence[str] = PAIRED_METRICS, n_boot: int = N_BOOT, seed: int = SEED,
                          level: float = LEVEL, resample_seeds: bool = True) -> dict[str, Any]:
    """Bootstrap the difference A − B of two recipes' seed-mean metrics on the same images.

    Args:
        y_true: ``(n,)`` true grades. pred_a, pred_b: ``(seeds, n)`` predicted grades (or
            ``(n,)`` for one run). probs_a, probs_b: ``(seeds, n, K)`` probabilities (or ``(n, K)``).
        groups: ``(n,)`` patient ids: patients are drawn, both eyes together; None draws images.
        resample_seeds: also draw each recipe's seeds with replacement in every resample
            (the module doc says why); False holds them fixed.

    Returns:
        As :func:`retinocli.reporting.bootstrap.paired_bootstrap` (meta, and ``metrics: {name:
        {"estimate", "low", "high", "skipped", "verdict"}}``), plus ``seeds_a``, ``seeds_b``
        and ``resample_seeds``. The estimate is the mean over A's seeds of each seed's metric
        minus the same for B: the difference of the mean ± sd rows.
    """
    truth = np.asarray(y_true)
    (ya, pa), (yb, pb) = _stack(pred_a, probs_a), _stack(pred_b, probs_b)
    n = truth.size
    if pa.shape[1:] != (n, pa.shape[2]) or pb.shape[1:] != pa.shape[1:]:
        raise ValueError(f"probs_a {pa.shape} and probs_b {pb.shape} must hold the same {n} images")
    bootstrap.check_metric_names(metric_names)
    # the bootstrap's scorer of each seed of each recipe, on the n images
    scorers = [[bootstrap.metric_scorer(truth, y[s], p[s], None, None, p.shape[2])[1] for s in range(len(p))]
               for y, p in ((ya, pa), (yb, pb))]
    meta = bootstrap.bootstrap_meta(groups, n, n_boot, seed, level)
    seed_rng = np.random.default_rng([seed, 1])  # apart from the patients' draws: one run gives paired_bootstrap's

    def recipe(seeds: list, w: np.ndarray, resampled: bool) -> dict[str, np.ndarray]:
        """Each seed's metric on the drawn images, averaged over the drawn seeds."""
        per_seed = [score(w) for score in seeds]
        s = len(seeds)
        if s == 1:
            return per_seed[0]
        k = (seed_rng.multinomial(s, [1 / s] * s, size=w.shape[0]) if resampled and resample_seeds
             else np.ones((w.shape[0], s), np.int64))
        return {name: np.where(k > 0, np.stack([m[name] for m in per_seed], 1) * k, 0.0).sum(1) / s
                for name in metric_names}

    def diff(w: np.ndarray, resampled: bool = True) -> dict[str, np.ndarray]:
        a, b = recipe(scorers[0], w, resampled), recipe(scorers[1], w, resampled)
        return {k: a[k] - b[k] for k in metric_names}

    point = diff(np.ones((1, n)), resampled=False)
    samples = bootstrap.bootstrap_samples(diff, n, groups, n_boot, seed)
    out = {k: bootstrap.paired_interval(point[k][0], samples[k], level) for k in metric_names}
    return {**meta, "seeds_a": len(pa), "seeds_b": len(pb), "resample_seeds": resample_seeds, "metrics": out}


def seed_predictions(recipe: Recipe) -> dict[str, Any]:
    """A recipe's evaluated predictions, one row per image and a layer per seed, images sorted:
    ``images``, ``y_true`` (n,), ``y_pred`` (seeds, n), ``probs`` (seeds, n, K), ``groups``.

    Raises:
        RetinoError: a run without predictions.csv, or seeds evaluated on different images.
    """
    from retinocli.deploy.schema import IMAGE
    from retinocli.rundir import read_csv

    layers = []
    for run in recipe.runs:
        path = RunDir(run.dir).predictions()
        if run.metrics is None or not path.is_file():
            raise RetinoError(f"`{run.name}` has no predictions.csv (not evaluated)")
        frame = read_csv(path, {IMAGE: str})
        frame = frame[clinical.ok_mask(frame)].sort_values(IMAGE, kind="stable")
        layers.append((frame[IMAGE].to_numpy(), clinical.prediction_arrays(frame, by_patient=True)))
    images, first = layers[0]
    if len(set(images)) != len(images):
        raise RetinoError(f"`{recipe.runs[0].name}`'s predictions.csv lists an image twice")
    for (other, arrays), run in zip(layers[1:], recipe.runs[1:]):
        if not np.array_equal(other, images) or not np.array_equal(arrays["y_true"], first["y_true"]):
            raise RetinoError(f"its seeds were evaluated on different images (`{run.name}`)")
    has_patients = bool(clinical.patient_ids(list(images))[1].astype(bool).any())
    return {"images": images, "y_true": first["y_true"], "y_pred": np.stack([a["y_pred"] for _, a in layers]),
            "probs": np.stack([a["probs"] for _, a in layers]), "groups": first["groups"] if has_patients else None}


def paired_comparison(a: dict[str, Any], b: dict[str, Any], *, n_boot: int = N_BOOT,
                      seed: int = SEED) -> dict[str, Any] | None:
    """:func:`seed_paired_bootstrap` of two :func:`seed_predictions`; None when they do not hold
    the same images with the same grades."""
    if not (np.array_equal(a["images"], b["images"]) and np.array_equal(a["y_true"], b["y_true"])):
        return None
    return seed_paired_bootstrap(a["y_true"], a["y_pred"], a["probs"], b["y_pred"], b["probs"],
                                 groups=a["groups"], n_boot=n_boot, seed=seed)


# ------------------------------------------------------------------------------ study


@dataclass
class Study:
    """The seeds section of a report: per recipe mean ± sd, paired comparisons, notes."""

    recipes: list[dict[str, Any]]
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def worth_showing(self) -> bool:
        """Only when some recipe has several seeds or two recipes could be compared."""
        return bool(self.comparisons) or any(len(r["runs"]) > 1 for r in self.recipes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as null)."""
        return jsonable({"recipes": self.recipes, "comparisons": self.comparisons, "notes": self.notes,
                         "seed_averaging": "each seed's metric, averaged over the seeds; resamples draw "
                                           "patients (or images) and each recipe's seeds with replacement",
                         "files": [str(p) for p in self.files]})


def study(runs: Sequence[RunSummary], *, n_boot: int = N_BOOT, seed: int = SEED) -> Study:
    """Recipes, their mean ± sd, and a paired comparison of every two recipes evaluated on the same images."""
    groups = recipes(runs)
    result = Study([summarise(g) for g in groups])
    layered: dict[str, dict[str, Any]] = {}
    for g in groups:
        if any(r.metrics is not None for r in g.runs):
            try:
                layered[g.name] = seed_predictions(g)
            except RetinoError as exc:
                result.notes.append(f"`{g.name}` is left out of the paired comparisons: {exc}.")
    for a, b in itertools.combinations(layered, 2):
        compared = paired_comparison(layered[a], layered[b], n_boot=n_boot, seed=seed)
        if compared is None:
            result.notes.append(f"`{a}` and `{b}` were not evaluated on the same images: no paired comparison.")
        else:
            result.comparisons.append({"a": a, "b": b, **compared})
    return result


# ---------------------------------------------------------------------------- writing


def _show(key: str, x: float) -> str:
    if not math.isfinite(x):
        return "–"
    return f"{100 * x:.1f} %" if key in PERCENT else f"{x:.3f}"


def mean_sd(key: str, stats: dict[str, Any]) -> str:
    """``0.412 ± 0.021`` (``52.3 % ± 2.1 %`` for a share); the mean alone for one seed."""
    mean, sd = stats.get("mean", math.nan), stats.get("sd", math.nan)
    if not math.isfinite(mean):
        return "–"
    return _show(key, mean) if not math.isfinite(sd) else f"{_show(key, mean)} ± {_show(key, sd)}"


def _signed(key: str, x: float) -> str:
    return ("+" if x > 0 else "−" if x < 0 else "") + _show(key, abs(x)) if math.isfinite(x) else "–"


def comparison_line(c: dict[str, Any]) -> str:
    """``train-a − train-b (3 vs 3 seeds, 89 patients): QWK +0.046 (95 % interval −0.021 to
    +0.112), not distinguishable from zero; ...``"""
    parts = [f"{METRIC_LABELS.get(k, k)} {_signed(k, m['estimate'])} ({round(100 * c['level'])} % interval "
             f"{_signed(k, m['low'])} to {_signed(k, m['high'])}): {m['verdict']}" for k, m in c["metrics"].items()]
    return (f"`{c['a']}` − `{c['b']}` ({c['seeds_a']} vs {c['seeds_b']} seed(s), {c['n_units']} {c['unit']}s): "
            + "; ".join(parts))


def markdown_lines(st: Study) -> list[str]:
    """report.md's section "Seeds and paired comparison"."""
    from retinocli.reporting.numbers import markdown_table

    keys = [k for k in METRIC_LABELS if any(math.isfinite(r["metrics"].get(k, {}).get("mean", math.nan))
                                            for r in st.recipes)]
    lines = ["## Seeds and paired comparison", "",
             "A recipe is the runs whose config.json agree on every setting but the seed. Each cell is the mean ± "
             "sample standard deviation over its seeds; val metrics are the best epoch's, the others the "
             "evaluation's.", ""]
    lines += markdown_table(["recipe", "seeds", "evaluated on", *(METRIC_LABELS[k] for k in keys)],
                    [[f"`{r['recipe']}`", ", ".join(str(s) for s in r["seeds"]),
                      "–" if not r["evaluated_on"] else f"{r['evaluated_on']['split']} ({r['evaluated_on']['n_images']})",
                      *(mean_sd(k, r["metrics"].get(k, {})) for k in keys)] for r in st.recipes])
    lines += ["", "Per seed:", ""]
    rows = []
    for r in st.recipes:
        for i, (name, s) in enumerate(zip(r["runs"], r["seeds"])):
            value = r["per_run"][i]
            rows.append([f"`{r['recipe']}`", f"`{name}`", s,
                         *(_show(k, value[k]) if value.get(k) is not None else "–" for k in keys)])
    lines += markdown_table(["recipe", "run", "seed", *(METRIC_LABELS[k] for k in keys)], rows) + [""]
    if st.comparisons:
        first = st.comparisons[0]
        lines += [f"Paired comparison, A − B on the same images ({first['n_boot']:,} bootstrap resamples of "
                  f"{first['unit']}s and of each recipe's seeds; each seed's metric, averaged over the "
                  "seeds). A difference is distinguishable from zero when its 95 % interval excludes 0:", ""]
        lines += [f"- {comparison_line(c)}" for c in st.comparisons] + [""]
    for note in [n for r in st.recipes for n in r["notes"]] + st.notes:
        lines += [f"Note: {note}", ""]
    return lines


def jsonable(x: Any) -> Any:
    """NaN (an sd of one seed, an undefined metric) as null: strict JSON has no NaN."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def _csv(header: Sequence[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_study(runs: Sequence[RunSummary], out: str | Path, *, n_boot: int = N_BOOT,
                seed: int = SEED) -> Study:
    """:func:`study` of the runs; when :attr:`Study.worth_showing`, also ``study.json``,
    ``seeds.csv`` and ``paired.csv`` in ``out`` (listed in :attr:`Study.files`)."""
    st = study(runs, n_boot=n_boot, seed=seed)
    if not st.worth_showing:
        return st
    out = Path(out)
    seeds_rows = [[r["recipe"], k, m["n"], m["mean"], m["sd"], ";".join(str(s) for s in r["seeds"]),
                   ";".join(repr(v) for v in m["values"])] for r in st.recipes for k, m in r["metrics"].items()]
    paired_rows = [[c["a"], c["b"], k, m["estimate"], m["low"], m["high"], m["verdict"], c["unit"], c["n_units"],
                    c["seeds_a"], c["seeds_b"], c["n_boot"]] for c in st.comparisons for k, m in c["metrics"].items()]
    data = {k: v for k, v in st.to_dict().items() if k != "files"}  # not written yet
    files = {STUDY_JSON: json.dumps(data, indent=2),
             SEEDS_CSV: _csv(["recipe", "metric", "n", "mean", "sd", "seeds", "values"], seeds_rows),
             PAIRED_CSV: _csv(["a", "b", "metric", "difference", "low", "high", "verdict", "unit", "n_units",
                               "seeds_a", "seeds_b", "n_boot"], paired_rows)}
    for name, text in files.items():
        st.files.append(atomic_write(out / name, text))
    return st
