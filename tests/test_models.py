from __future__ import annotations

import pytest
import torch

from builders import put_imagenet_weights
from retinocli.errors import RetinoError
from retinocli.models.registry import (ARCHS, random_model, cached_weight_file, create_model, freeze_backbone,
                              parameter_count, set_train_mode, use_small_stem)


def test_parameter_counts():
    # torchvision's resnet18 has 11,689,512 parameters with a 1000-class head (512*1000+1000);
    # with 5 grades the head is 512*5+5.
    assert parameter_count("resnet18") == 11_689_512 - 513_000 + 2_565
    assert parameter_count("resnet50") == 25_557_032 - 2_049_000 + 10_245
    assert len(ARCHS) == 8


def test_pretrained_weights_come_from_the_torch_home_cache(torch_home):
    state = put_imagenet_weights("resnet18", "IMAGENET1K_V1", seed=3)
    assert cached_weight_file("resnet18", "DEFAULT") == torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    model = create_model("resnet18", weights="DEFAULT")
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert model.fc.out_features == 5  # a new head, not ImageNet's


def test_missing_weights_name_the_file_and_folder(torch_home):
    with pytest.raises(RetinoError) as err:
        create_model("resnet50", weights="IMAGENET1K_V2")
    message = str(err.value)
    assert "resnet50-11ad3fa6.pth" in message
    assert str(torch_home / "hub" / "checkpoints") in message
    assert "\n" not in message
    with pytest.raises(RetinoError, match="resnet18 has no weights 'IMAGENET1K_V2'"):
        create_model("resnet18", weights="IMAGENET1K_V2")
    with pytest.raises(RetinoError, match="unknown architecture 'resnet19'"):
        create_model("resnet19")


def test_weights_from_a_file(tmp_path):
    torch.manual_seed(1)
    source = random_model("resnet34")
    torch.save(source.state_dict(), tmp_path / "mine.pth")
    model = create_model("resnet34", weights=str(tmp_path / "mine.pth"))
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    with pytest.raises(RetinoError, match="do not fit resnet50"):
        create_model("resnet50", weights=str(tmp_path / "mine.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(RetinoError, match="not a loadable weights file"):
        create_model("resnet18", weights=str(tmp_path / "junk.pth"))


def test_freezing_keeps_batch_norm_statistics():
    model = random_model("resnet18")
    freeze_backbone(model, True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    set_train_mode(model, backbone_frozen=True)
    before = model.bn1.running_mean.clone()
    model(torch.randn(4, 3, 64, 64) * 5 + 3)
    assert torch.equal(model.bn1.running_mean, before)
    freeze_backbone(model, False)
    set_train_mode(model, backbone_frozen=False)
    model(torch.randn(4, 3, 64, 64) * 5 + 3)
    assert not torch.equal(model.bn1.running_mean, before)


def test_small_stem_choice():
    assert use_small_stem("auto", 28, pretrained=False)
    assert not use_small_stem("auto", 28, pretrained=True)
    assert not use_small_stem("auto", 224, pretrained=False)
    assert use_small_stem("small", 512, pretrained=True)
    out = random_model("resnet18", small_stem=True)(torch.randn(2, 3, 28, 28))
    assert out.shape == (2, 5)
