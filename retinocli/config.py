"""Settings of each command as dataclasses, with a JSON round trip. No torch here."""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from retinocli.errors import RetinoError

CHOICES = {
    "mode": ("finetune", "linear", "two-stage"),
    "preprocess": ("none", "crop", "graham"),
    "augment": ("none", "light", "strong"),
    "augment_on": ("auto", "device", "opencv", "workers"),
    "decode": ("cpu", "gpu"),
    "class_weights": ("none", "balanced", "sqrt"),
    "sampler": ("uniform", "balanced"),
    "optimizer": ("sgd", "adamw"),
    "scheduler": ("cosine", "step", "none"),
    "select_metric": ("qwk", "accuracy", "loss", "last"),
    "stem": ("auto", "imagenet", "small"),
    "head": ("classification", "regression", "ordinal"),  # issue #14
    "pool": ("avg", "gem"),
}


#: TrainConfig fields that record where options came from rather than being options
NOT_OPTIONS = frozenset({"recipe"})
#: config.json keys that do not make two runs different recipes: the seed, how the run is named
#: and where it ran (``workers`` changes no weight: batched augmentation and the epoch sampler
#: draw from the seed), and records of how it was asked for (a recipe file and the same options
#: on the command line train alike) or of the machine and resolved data folder. Used by
#: ``retino report``/``compare`` (recipes), ``retino results`` (groups) and ``--seeds`` (a seed's
#: folder made with other settings).
NOT_RECIPE = ("seed", "name", "project", "workers", "recipe", "command", "versions", "dataset")


def recipe_key(config: dict[str, Any]) -> str:
    """The settings that make a recipe, as one comparable string (config.json minus :data:`NOT_RECIPE`)."""
    return json.dumps({k: v for k, v in config.items() if k not in NOT_RECIPE}, sort_keys=True, default=str)


@dataclass
class TrainConfig:
    """Every option of ``retino train``; stored in config.json and in each checkpoint."""

    data: str = "data"
    layout: str | None = None
    images: str | None = None
    arch: str = "resnet18"
    pretrained: bool = False
    weights: str | None = None  # IMAGENET1K_V1 | IMAGENET1K_V2 | DEFAULT | path.pth
    mode: str = "finetune"
    head_epochs: int = 1
    stem: str = "auto"
    img_size: int = 512
    preprocess: str = "none"
    augment: str = "light"
    # workers: per image in the loader; device: batched on the training device, the same images (#16);
    # auto: device on CUDA, workers elsewhere (resolved when training starts, config.json keeps the result)
    augment_on: str = "auto"
    decode: str = "cpu"  # gpu: workers read JPEG bytes, the CUDA device decodes them in batches (#16)
    val_fraction: float = 0.1
    class_weights: str = "none"
    sampler: str = "uniform"
    optimizer: str = "adamw"
    lr: float | None = None  # None: 1e-3 from scratch, 3e-4 for pretrained weights
    momentum: float = 0.9
    weight_decay: float = 0.05
    scheduler: str = "cosine"
    warmup_epochs: float = 1.0
    step_size: int | None = None
    epochs: int = 20
    batch_size: int = 64
    label_smoothing: float = 0.0
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: bool | None = None  # None: on for CUDA
    channels_last: bool | None = None  # None: on for CUDA
    compile: bool = False
    workers: int | None = None  # None: min(8, cores)
    patience: int | None = None
    select_metric: str = "qwk"
    # issue #14: grading head, pooling, weight EMA, batch mixing
    head: str = "classification"
    pool: str = "avg"
    ema: float = 0.0  # decay of the weights' moving average; 0: off
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup; 0: off
    cutmix: float = 0.0  # Beta(alpha, alpha) of CutMix; 0: off
    target_sensitivity: float = 0.87  # issue #15: the referral threshold frozen on validation reaches it
    project: str = "runs"
    name: str = "train"
    recipe: str | None = None  # the --config file the options came from: recorded, not an option

    def __post_init__(self) -> None:
        for key, allowed in CHOICES.items():
            value = getattr(self, key)
            if value not in allowed:
                raise RetinoError(f"--{key.replace('_', '-')} must be one of {', '.join(allowed)}; got {value!r}")
        positive = {"img_size": 8, "epochs": 1, "batch_size": 1}
        for key, least in positive.items():
            if getattr(self, key) < least:
                raise RetinoError(f"--{key.replace('_', '-')} must be at least {least}; got {getattr(self, key)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise RetinoError(f"--val-fraction must be in [0, 1); got {self.val_fraction}")
        if self.lr is not None and self.lr <= 0:
            raise RetinoError(f"--lr must be positive; got {self.lr}")
        for key in ("weight_decay", "warmup_epochs"):
            if getattr(self, key) < 0:
                raise RetinoError(f"--{key.replace('_', '-')} must be 0 or more; got {getattr(self, key)}")
        if not 0.0 <= self.momentum < 1.0:
            raise RetinoError(f"--momentum must be in [0, 1); got {self.momentum}")
        name = PurePath(self.name)
        if not self.name.strip() or name.is_absolute() or ".." in name.parts or name == PurePath("."):
            # the run folder is project/name: a name must not lead out of --project
            raise RetinoError(f"--name must be a folder name inside --project; got {self.name!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise RetinoError(f"--label-smoothing must be in [0, 1); got {self.label_smoothing}")
        if self.workers is not None and self.workers < 0:
            raise RetinoError(f"--workers must be 0 or more; got {self.workers}")
        if self.patience is not None and self.patience < 1:
            raise RetinoError(f"--patience must be at least 1; got {self.patience}")
        if self.patience is not None and self.select_metric == "last":
            raise RetinoError("--patience stops when a validation metric stops improving; --select-metric last "
                              "watches none (it keeps the final epoch): choose one or drop --patience")
        if self.mode == "two-stage" and not 0 < self.head_epochs < self.epochs:
            raise RetinoError(f"--head-epochs must be between 1 and --epochs - 1 for two-stage; got {self.head_epochs}")
        if not 0.0 <= self.ema < 1.0:
            raise RetinoError(f"--ema must be in [0, 1) (0: off, e.g. 0.999); got {self.ema}")
        for key in ("mixup", "cutmix"):
            if getattr(self, key) < 0:
                raise RetinoError(f"--{key} must be 0 (off) or a positive Beta alpha; got {getattr(self, key)}")
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise RetinoError(f"--target-sensitivity must be in (0, 1]; got {self.target_sensitivity}")
        if self.head != "classification" and self.label_smoothing:
            raise RetinoError(f"--label-smoothing applies to the classification head only, not --head {self.head}")
        if self.weights is not None:
            self.pretrained = True
        if self.pretrained and self.weights is None:
            self.weights = "DEFAULT"

    @property
    def learning_rate(self) -> float:
        """The --lr given, or the default that works for scratch or pretrained training."""
        if self.lr is not None:
            return self.lr
        return 3e-4 if self.pretrained else 1e-3

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_file(cls, path: str | Path) -> dict[str, Any]:
        """``retino train --config FILE``: option names (dashes or underscores) -> values, from TOML
        (or YAML if PyYAML happens to be installed). The caller lays command-line options over it.

        Raises:
            RetinoError: unreadable file, not a table, or a key that is no train option.
        """
        return read_config_file(path, {f.name for f in dataclasses.fields(cls)} - NOT_OPTIONS)

    def command_line(self) -> str:
        """An equivalent ``retino train`` command: the options that differ from the defaults.

        Written into config.json when training starts (RESULTS.md quotes it), so it stays true
        when a later version changes a default. The recipe file is not named: its values are.
        """
        words = ["retino", "train"]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in NOT_OPTIONS or value == f.default:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                words.append(flag if value else flag.replace("--", "--no-", 1))
            elif value is not None:
                words += [flag, shlex.quote(str(value))]
        return " ".join(words)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        if "augment" in d and "augment_on" not in d:  # a run from before batched augmentation resumes as it began
            d = {**d, "augment_on": "workers"}
        return cls(**{k: v for k, v in d.items() if k in known})


def read_config_file(path: str | Path, known: set[str]) -> dict[str, Any]:
    """The key/values of a TOML (or YAML) config file, keys checked against ``known``."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise RetinoError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise RetinoError(f"--config {path}: YAML needs PyYAML, which is not installed; use TOML") from None
            data = yaml.safe_load(text) or {}
        else:
            import tomllib

            data = tomllib.loads(text.decode("utf-8"))
    except RetinoError:
        raise
    except Exception as exc:  # TOMLDecodeError, YAMLError, UnicodeDecodeError
        raise RetinoError(f"--config {path}: not valid {path.suffix.lstrip('.') or 'TOML'} "
                          f"({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RetinoError(f"--config {path}: expected a table of train options")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise RetinoError(f"--config {path}: unknown key {key!r} (not a retino train option)")
        out[name] = value
    return out


def from_options(cls, params: dict[str, Any], **more: Any):
    """``cls`` (a command's config dataclass) from a command's parsed options: the fields it
    has, the rest (the model argument, ``--json``) left to the command. ``more`` overrides."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in params.items() if k in known}, **more})


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise RetinoError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


@dataclass
class EvaluateConfig:
    """``retino evaluate``'s settings (all but the model); checked when made."""

    data: str | Path | None = None  # default: the images the run recorded in its split.csv
    split: str = "test"
    layout: str | None = None
    images: str | Path | None = None
    tta: bool = False
    out: str | Path | None = None  # default: the run's folder (an .onnx: <stem>-eval beside it)
    force: bool = False
    batch_size: int = 64
    threads: int | None = None
    device: str = "auto"
    provider: str = "auto"
    bootstrap: int = 1000  # resamples for the 95 % intervals; 0: point estimates only
    seed: int = 0  # of the bootstrap
    fuse_eyes: bool = False

    def __post_init__(self) -> None:
        _at_least("batch_size", self.batch_size, 1)
        _at_least("threads", self.threads, 1)
        if self.bootstrap < 0 or self.bootstrap in (1, 2):
            raise RetinoError(f"--bootstrap must be 0 (no intervals) or >= 3 resamples, got {self.bootstrap}")


@dataclass
class ExportConfig:
    """``retino export``'s settings (all but the model); checked when made (the opset's upper
    bound, which needs onnx, when the export starts)."""

    out: str | Path | None = None  # default: model[-fp16|-int8].onnx in the run folder
    fp16: bool = False
    int8: bool = False
    opset: int = 18
    force: bool = False
    calibration_images: int = 128  # --int8: training images to calibrate on

    def __post_init__(self) -> None:
        if self.fp16 and self.int8:
            raise RetinoError("--fp16 and --int8 exclude each other: pick one precision")
        _at_least("opset", self.opset, 17)
        _at_least("calibration_images", self.calibration_images, 1)

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "int8" if self.int8 else "fp32"


def config_of(cls, config, options: dict[str, Any]):
    """A library entry point's settings: ``config`` (a ``cls``) as given, or one made of ``options``."""
    if config is not None and options:
        raise TypeError(f"pass a {cls.__name__} or its fields as keywords, not both ({', '.join(options)})")
    if config is not None and not isinstance(config, cls):
        raise TypeError(f"expected a {cls.__name__}, got {type(config).__name__}")
    return config if config is not None else cls(**options)


@dataclass
class ReportConfig:
    """``retino report``'s settings (all but the runs and the folder); checked when made."""

    svg: bool = False  # also every figure as SVG
    force: bool = False  # write into a folder that has files
    title: str | None = None  # report.md's heading (default: the runs' names)
    gallery: bool = True  # the error galleries (heatmaps; need best.pt and the images)
    gallery_size: int = 8
    device: str = "auto"  # where the galleries' heatmaps are computed

    def __post_init__(self) -> None:
        if self.gallery and self.gallery_size < 1:
            raise RetinoError(f"--gallery-size must be at least 1, got {self.gallery_size}")


#: the image formats a ``retino prepare`` cache can hold, and their file extensions
CACHE_FORMATS: dict[str, str] = {"png": ".png", "jpeg": ".jpg"}


@dataclass
class PrepareConfig:
    """``retino prepare``'s settings (all but the dataset); checked when made (size and mode by
    :class:`retinocli.imaging.preprocess.Preprocess` when the work starts)."""

    out: str | Path  # the cache folder: new, empty, or a cache of the same settings to resume
    size: int = 512
    mode: str = "crop"  # crop, none or graham, as in Preprocess
    layout: str | None = None
    images: str | Path | None = None
    fmt: str = "jpeg"  # jpeg (small, about one grey level off) or png (exact)
    quality: int = 95  # jpeg quality, 1-100
    workers: int | None = None  # processes; default one per core; 1 works in-process
    force: bool = False  # rebuild ``out`` from scratch

    def __post_init__(self) -> None:
        if self.fmt not in CACHE_FORMATS:
            raise RetinoError(f"unknown image format {self.fmt!r}; choose {' or '.join(CACHE_FORMATS)}")
        if isinstance(self.quality, bool) or not isinstance(self.quality, int) or not 1 <= self.quality <= 100:
            raise RetinoError(f"--quality must be an integer from 1 to 100, got {self.quality!r}")
        w = self.workers
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
            raise RetinoError(f"--workers must be 0 or more, got {w!r}")


@dataclass
class PredictConfig:
    """``retino predict``'s settings (all but the folder and the model); checked when made."""

    out: Any  # the CSV (or JSON lines) file to write, or an open text stream (stdout)
    batch_size: int = 32  # images per inference call
    threads: int | None = None  # decode threads; default one per core, at most 8
    resume: bool = False  # keep the graded rows of ``out``; read the images it lacks or could not read
    force: bool = False  # overwrite an existing ``out``
    json_lines: bool = False  # one JSON object per line (the same keys) instead of CSV
    patients: str | Path | None = None  # per-patient file (default: patients.csv beside a file ``out``)
    fuse_eyes: bool = False  # fuse each eye with its fellow in the per-patient file

    def __post_init__(self) -> None:
        _at_least("batch_size", self.batch_size, 1)
        _at_least("threads", self.threads, 1)


@dataclass
class StatsConfig:
    """``retino stats``'s settings (all but the dataset folder); checked when made."""

    layout: str | None = None
    images: str | Path | None = None
    csv: str | Path | None = None  # a CSV of image names and grades (layout csv)
    image_col: str | None = None
    label_col: str | None = None
    sample: int = 200  # images opened and checked (a seeded sample)
    full: bool = False  # open and check every image
    seed: int = 0  # of the sample
    plot: str | Path | None = None  # a class-balance chart per split, as this PNG
    force: bool = False  # replace an existing ``plot``

    def __post_init__(self) -> None:
        if self.sample < 0:
            raise RetinoError(f"--sample must be 0 or more, got {self.sample}")


@dataclass
class SynthConfig:
    """``retino synth``'s settings (all but the folder); checked when made."""

    n: int = 400  # images; even and at least 10, since every patient has two eyes
    size: int = 128  # side of the square images in pixels
    seed: int = 0  # the same seed writes the same bytes
    test_fraction: float = 0.2  # share of patients (not images) in the test split
    force: bool = False  # replace an earlier data set (only the files synth owns)
    masks: bool = False  # also write masks/<image>.png: the pixels a lesion covers

    MIN_SIZE, MAX_SIZE, MAX_TEST_FRACTION = 16, 2048, 0.9

    def __post_init__(self) -> None:
        n, size, fraction = self.n, self.size, self.test_fraction
        if isinstance(n, bool) or not isinstance(n, int) or n < 10 or n % 2:
            raise RetinoError(f"--n must be an even number >= 10 (two eyes per patient), got {n!r}")
        if isinstance(size, bool) or not isinstance(size, int) or not self.MIN_SIZE <= size <= self.MAX_SIZE:
            raise RetinoError(f"--size must be whole pixels from {self.MIN_SIZE} to {self.MAX_SIZE}, got {size!r}")
        if not 0.0 <= fraction <= self.MAX_TEST_FRACTION:
            raise RetinoError(f"--test-fraction must be from 0 to {self.MAX_TEST_FRACTION}, got {fraction!r}")


@dataclass
class ResultsConfig:
    """``retino results``'s settings (all but the runs)."""

    out: str | Path = "RESULTS.md"  # the Markdown file to write
    title: str = "Results"  # its heading
    force: bool = False  # replace the file (with ``section``: that section) if it exists
    section: str | None = None  # write the tables as this section of ``out``, keeping the rest

    def __post_init__(self) -> None:
        if self.section is not None and (not self.section.strip() or "\n" in self.section or "-->" in self.section):
            raise RetinoError(f"--section must be one line of text without '-->'; got {self.section!r}")


@dataclass
class ExplainConfig:
    """``retino explain``'s settings (all but the model, the images and the folder); the method,
    layer and grade are checked against the model when it loads."""

    grade: int | None = None  # explain this grade for every image (default: each one's predicted grade)
    method: str = "gradcam"  # a key of retinocli.reporting.explain.METHODS
    layer: str = "layer4"  # the ResNet stage whose last block is explained
    device: str = "auto"
    force: bool = False  # write into a folder that already has files
