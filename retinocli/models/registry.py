"""Architecture registry, ImageNet weights through torchvision's cache, heads and freezing."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from retinocli import NUM_GRADES
from retinocli.errors import RetinoError

# name -> torchvision builder; every entry has ImageNet weights in torchvision.
ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                          "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2")
SMALL_INPUT = 32  # at or below this size the stride-2 7x7 stem + max-pool leave too few pixels


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise RetinoError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")


def weight_names(arch: str) -> list[str]:
    """The ImageNet weight names torchvision offers for ``arch`` (plus DEFAULT)."""
    from torchvision.models import get_model_weights

    check_arch(arch)
    return list(get_model_weights(arch).__members__)


def weights_enum(arch: str, name: str):
    """torchvision's weights entry for ``arch`` called ``name`` (IMAGENET1K_V1, ..., DEFAULT)."""
    from torchvision.models import get_model_weights

    check_arch(arch)
    enum = get_model_weights(arch)
    if name.upper() not in enum.__members__:
        raise RetinoError(f"{arch} has no weights {name!r}; choose from {', '.join(enum.__members__)} "
                          "or give a .pth file")
    return enum[name.upper()]


def cached_weight_file(arch: str, name: str) -> Path:
    """Where torchvision's cache keeps (or would keep) these weights, under TORCH_HOME."""
    url = weights_enum(arch, name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def load_imagenet_state(arch: str, name: str) -> dict[str, torch.Tensor]:
    """ImageNet weights from torchvision's cache, downloading them if the network allows.

    Raises:
        RetinoError: not cached and not downloadable; names the file and the folder.
    """
    weights = weights_enum(arch, name)
    target = cached_weight_file(arch, name)
    try:
        # torch.hub writes 'Downloading: "url" to file' before it tries: offline that stray line
        # came before retino's own error, so it is held back and only the outcome is reported
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, timeouts, hash mismatch: all end in the same advice
        if target.is_file():
            raise RetinoError(f"cannot read cached weights {target}: {exc}") from None
        raise RetinoError(f"{arch} {weights.name} weights are not cached and cannot be downloaded: "
                          f"put {target.name} (from {weights.url}) into {target.parent}") from None


def random_model(arch: str, *, num_classes: int = NUM_GRADES, small_stem: bool = False,
                head: str = "classification", pool: str = "avg") -> nn.Module:
    """A torchvision ResNet with a fresh ``head`` for ``num_classes`` grades (random weights);
    ``pool`` avg or gem (see :mod:`retinocli.models.heads`)."""
    from torchvision.models import get_model

    check_arch(arch)
    model = get_model(arch, weights=None)
    if small_stem:
        # CIFAR-style stem for tiny images (MedMNIST's ResNet at 28 px does the same).
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    if head != "classification" or pool != "avg":
        from retinocli.models.heads import install

        install(model, head=head, pool=pool, num_grades=num_classes)
    return model


def use_small_stem(stem: str, img_size: int, pretrained: bool) -> bool:
    """``auto`` keeps the ImageNet stem for pretrained weights and for images above 64 px."""
    if stem == "auto":
        return img_size <= SMALL_INPUT and not pretrained
    return stem == "small"


def create_model(arch: str, *, weights: str | None = None, num_classes: int = NUM_GRADES,
                 small_stem: bool = False, head: str = "classification", pool: str = "avg") -> nn.Module:
    """Build ``arch`` and load ``weights`` (an ImageNet name or a .pth state dict) into the backbone.

    The classification head is always new: ImageNet's 1000 classes are not grades.
    """
    model = random_model(arch, num_classes=num_classes, small_stem=small_stem, head=head, pool=pool)
    if weights is None:
        return model
    if weights.lower().endswith((".pth", ".pt")) or Path(weights).is_file():
        state = _state_from_file(Path(weights))
    else:
        state = load_imagenet_state(arch, weights)
    own = model.state_dict()
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and not k.startswith("fc.")}
    skipped = [k for k in own if k not in keep and not k.startswith("fc.")]
    if len(keep) < 0.9 * len([k for k in own if not k.startswith("fc.")]):
        raise RetinoError(f"weights {weights} do not fit {arch}: {len(skipped)} of "
                          f"{len(own)} tensors missing or of another shape (e.g. {', '.join(skipped[:3])})")
    model.load_state_dict(keep, strict=False)
    return model


def _state_from_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RetinoError(f"no such weights file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RetinoError(f"{path}: not a loadable weights file ({str(exc).splitlines()[0]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # a retino checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RetinoError(f"{path}: holds no state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def freeze_backbone(model: nn.Module, frozen: bool) -> None:
    """Freeze (or thaw) everything but the head."""
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("fc.") or not frozen


def set_train_mode(model: nn.Module, *, backbone_frozen: bool) -> None:
    """model.train(), but a frozen backbone keeps its batch-norm running statistics."""
    model.train()
    if backbone_frozen:
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not name.startswith("fc"):
                m.eval()


def parameter_count(arch: str, num_classes: int = NUM_GRADES) -> int:
    """Parameters of ``arch`` with a grading head, counted without allocating memory."""
    with torch.device("meta"):
        model = random_model(arch, num_classes=num_classes)
    return sum(p.numel() for p in model.parameters())
