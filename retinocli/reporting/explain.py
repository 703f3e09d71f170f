"""Where a trained grader looks: class-activation heatmaps over the pixels it was given.

``explain`` loads a run's checkpoint (:func:`retinocli.engine.checkpoints.load_trained`), prepares each
image exactly as training did (:func:`retinocli.imaging.preprocess.load_and_prepare` with the
checkpoint's own :class:`~retinocli.imaging.preprocess.Preprocess`), grades it, and asks a CAM method
from torchcam which regions of the last ResNet block raised the score of one grade. It writes,
per image, the prepared fundus with the heatmap blended over it (PNG, the model's input size,
so the heatmap's peak is in the same pixels), and one contact sheet of all overlays.

What a CAM explains is a scalar per image, picked by a *target* function of the model's output
for that image (:func:`grade_target`: a grade's logit). Heads whose output is not one logit per
grade (regression, ordinal) plug in their own target here and nothing else changes.

Checkpoints only: a CAM needs the network's activations and gradients, which an ONNX file
does not expose.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retinocli.config import ExplainConfig, config_of
from retinocli.errors import RetinoError
from retinocli.models.grading import Grader
from retinocli.events import EventsLike, emitter

# --method name -> torchcam.methods class. Each works on any torchvision ResNet and accepts a
# target function; CAM (fc weights only) and the LeGrad/FinerCAM family do not fit that contract.
METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMpp",
    "smoothgradcam++": "SmoothGradCAMpp",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "scorecam": "ScoreCAM",
}
TASK = "explain"  # the progress task of explain
LAYERS = ("layer1", "layer2", "layer3", "layer4")
SHEET = "contact-sheet.png"
SHEET_MAX = 60  # overlays on the contact sheet; beyond that it is unreadable anyway
ALPHA = 0.6  # heatmap opacity over the fundus where the map is hottest
COLORMAP = "jet"
ONNX_REFUSAL = "explanations need the torch checkpoint: pass the run folder or best.pt"


@dataclass
class Explanation:
    """One image's result. ``peak_x``/``peak_y`` are pixels of the overlay, i.e. of the model's
    input (the prepared image, ``size`` x ``size``), where the heatmap is largest."""

    image: str
    status: str  # "ok" or "error"
    error: str | None = None
    predicted_grade: int | None = None
    grade_name: str | None = None
    probability: float | None = None  # of the predicted grade
    explained_grade: int | None = None  # the grade the heatmap is for
    explained_probability: float | None = None
    peak_x: int | None = None
    peak_y: int | None = None
    overlay: str | None = None
    heatmap: np.ndarray | None = field(default=None, repr=False)  # float32 HxW in [0, 1]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["heatmap"]
        return d


@dataclass
class ExplainResult:
    checkpoint: str
    arch: str
    method: str
    layer: str
    size: int
    cells: int | None  # side of the layer's activation map: the heatmap's true resolution
    device: str
    out: str
    contact_sheet: str | None
    explanations: list[Explanation]
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Explanation]:
        return [e for e in self.explanations if e.status != "ok"]

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "explanations"}
        d["explanations"] = [e.to_dict() for e in self.explanations]
        return d


def grade_target(grade: int) -> Callable[[Any], Any]:
    """The CAM target of a classification head: one image's output (a K-vector) -> the logit of
    ``grade``. Another head supplies its own function of the same shape."""
    return lambda output: output[grade]


def target_layer(model, name: str = "layer4"):
    """The last block of a torchvision ResNet stage (``layer4``: the deepest spatial features)."""
    if name not in LAYERS:
        raise RetinoError(f"--layer must be one of {', '.join(LAYERS)}, got {name!r}")
    return getattr(model, name)[-1]


def _inputs(paths: list[Path]) -> list[Path]:
    """Files as given; folders searched recursively for images, in a stable order."""
    from retinocli.deploy.predict import find_images

    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found += find_images(p)
        elif p.exists():
            found.append(p)
        else:
            raise RetinoError(f"no such image or folder: {p}")
    if not found:
        raise RetinoError(f"no images in {', '.join(str(p) for p in paths)}")
    return list(dict.fromkeys(found))


def _refuse_early(model: str | Path | None, method: str, out: Path, force: bool) -> None:
    """The user errors found before torch loads: an ONNX file, an unknown method, an output in the way."""
    from retinocli.reporting.evaluate import is_onnx

    if model is not None and is_onnx(model):
        raise RetinoError(ONNX_REFUSAL)
    if method not in METHODS:
        raise RetinoError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if out.exists() and not out.is_dir():
        raise RetinoError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise RetinoError(f"{out} is not empty; pass --force to write the explanations there anyway")


def _names(paths: list[Path]) -> list[str]:
    """An overlay file stem per image: the image's stem, numbered when two share it."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        names.append(p.stem if n == 0 else f"{p.stem}-{n + 1}")
    return names


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """uint8 HWC image with ``heatmap`` (HxW in [0, 1]) blended over it in the jet colours.

    Opacity grows with the heat (from 30 % of ``alpha`` to all of it): where the model did not
    look, the fundus stays readable under a faint blue.
    """
    from matplotlib import colormaps

    colours = colormaps[COLORMAP](heatmap)[..., :3] * 255.0
    a = (alpha * (0.3 + 0.7 * heatmap))[..., None]
    return np.clip((1 - a) * image + a * colours, 0, 255).astype(np.uint8)


def explain(
    model: str | Path | None,
    inputs: list[str | Path],
    out: str | Path,
    config: ExplainConfig | None = None,
    *,
    events: EventsLike = None,
    **options,
) -> ExplainResult:
    """Heatmaps of what raised a grade's score, one overlay PNG per image plus a contact sheet.

    Args:
        model: A run folder or checkpoint (None: the newest run). ONNX files are refused.
        inputs: Image files and folders (searched recursively).
        out: Folder for the overlays and ``contact-sheet.png``.
        config: A :class:`retinocli.config.ExplainConfig`, or ``options``, its fields as keywords:
            grade (explain this grade for every image; default each image's predicted grade),
            method (a key of :data:`METHODS`), layer (the ResNet stage whose last block is
            explained, ``layer4`` by default), device (auto, cpu, cuda, cuda:N, mps) and force
            (write into a folder that already has files).
        events: A listener for progress (task "explain", one step per image), see :mod:`retinocli.events`.

    Returns:
        The settings used and an :class:`Explanation` per image in input order; an image that
        cannot be read gets ``status="error"`` and the others go on.
    """
    cfg = config_of(ExplainConfig, config, options)
    grade, method, layer = cfg.grade, cfg.method, cfg.layer
    out = Path(out)
    _refuse_early(model, method, out, cfg.force)
    paths = _inputs([Path(p) for p in inputs])

    import torchcam.methods

    from retinocli.engine.checkpoints import load_trained
    from retinocli.imaging.preprocess import Preprocess
    from retinocli.engine.placement import pick_device
    from retinocli.rundir import RunDir

    ckpt = RunDir.resolve_checkpoint(model)
    net, state = load_trained(ckpt)
    names = list(state.get("class_names") or [])
    if grade is not None and not 0 <= grade < len(names):
        raise RetinoError(f"--grade must be from 0 to {len(names) - 1}, got {grade}")
    pre = Preprocess.from_dict(state["preprocess"])
    # the probabilities evaluate and predict give: the stored grader (head, temperature) on the logits
    grading = Grader.from_dict({"num_grades": len(names), **(state.get("grader") or {})})
    dev = pick_device(cfg.device)
    net.to(dev)
    out.mkdir(parents=True, exist_ok=True)

    say = emitter(events)
    say.started(TASK, total=len(paths))
    explanations: list[Explanation] = []
    cells = None
    start = time.perf_counter()
    extractor = getattr(torchcam.methods, METHODS[method])(net, target_layer=target_layer(net, layer),
                                                           input_shape=(3, pre.size, pre.size))
    with extractor:
        for path, stem in zip(paths, _names(paths)):
            explanation, shape = _explain_one(net, extractor, path, out / f"{stem}.png", pre, dev, grade, names,
                                              grading)
            explanations.append(explanation)
            cells = shape or cells
            say.advanced(TASK)
    seconds = time.perf_counter() - start
    say.finished(TASK)

    sheet, notes = _sheet_and_notes(explanations, names, out, cells=cells, layer=layer, size=pre.size)
    return ExplainResult(checkpoint=str(ckpt), arch=str(state["config"].get("arch")), method=method, layer=layer,
                         size=pre.size, cells=cells, device=str(dev), out=str(out),
                         contact_sheet=str(sheet) if sheet else None, explanations=explanations,
                         seconds=seconds, notes=notes)


def _sheet_and_notes(explanations: list[Explanation], names: list[str], out: Path, *, cells: int | None,
                     layer: str, size: int) -> tuple[Path | None, list[str]]:
    """The contact sheet of the readable images (None: none was) and what to know about the maps."""
    notes = []
    if cells is not None and cells <= 2:  # one cell per quadrant: no lesion can be pointed at
        notes.append(f"{layer} is {cells}x{cells} cells at {size} px: too coarse to point at lesions"
                     + ("; --layer layer3 has about twice the resolution" if layer == "layer4" else ""))
    ok = [e for e in explanations if e.status == "ok"]
    sheet = None
    if ok:
        sheet = contact_sheet(ok, names, out / SHEET)
        if len(ok) > SHEET_MAX:
            notes.append(f"the contact sheet shows the first {SHEET_MAX} of {len(ok)} overlays")
    return sheet, notes


def _explain_one(net, extractor, path: Path, target_file: Path, pre, dev, grade: int | None,
                 names: list[str], grading: Grader) -> tuple[Explanation, int | None]:
    """One image's overlay, written to ``target_file``, and the heatmap's side in cells (None: unreadable)."""
    import torch
    from PIL import Image

    from retinocli.imaging.preprocess import load_and_prepare, normalize

    try:
        pixels = load_and_prepare(path, pre)
    except RetinoError as exc:
        return Explanation(image=str(path), status="error", error=str(exc)), None
    x = torch.from_numpy(normalize(pixels, pre))[None].to(dev)
    with torch.enable_grad():
        logits = net(x)
        probs = grading.probabilities(logits.detach().float().cpu().numpy())[0]
        predicted = int(grading.grades(probs[None])[0])
        target = predicted if grade is None else grade
        cam = extractor(targets=grade_target(target), scores=logits)[0]
    heat = torch.nn.functional.interpolate(cam[None].float(), size=(pre.size, pre.size),
                                           mode="bilinear", align_corners=False)[0, 0]
    heat = heat.clamp(0, 1).cpu().numpy()
    peak_y, peak_x = np.unravel_index(int(heat.argmax()), heat.shape)
    Image.fromarray(overlay(pixels, heat)).save(target_file)
    return Explanation(
        image=str(path), status="ok", predicted_grade=predicted, grade_name=names[predicted],
        probability=float(probs[predicted]), explained_grade=target,
        explained_probability=float(probs[target]), peak_x=int(peak_x), peak_y=int(peak_y),
        overlay=str(target_file), heatmap=heat), int(cam.shape[-1])


def contact_sheet(explanations: list[Explanation], names: list[str], path: Path) -> Path:
    """A grid of overlays, each captioned with the image, its predicted grade and probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    shown = explanations[:SHEET_MAX]
    cols = min(len(shown), 6)
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, e in zip(axes.flat, shown):
        with Image.open(e.overlay) as im:
            ax.imshow(np.asarray(im), interpolation="bilinear")
        caption = f"{Path(e.image).name}\ngrade {e.predicted_grade} {names[e.predicted_grade]} {e.probability:.0%}"
        if e.explained_grade != e.predicted_grade:
            caption += f"\nmap: grade {e.explained_grade} ({e.explained_probability:.0%})"
        ax.set_title(caption, fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
