"""The pretrained-network presets: torchvision's sizes and names, shapes, gradients, export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cnnkit.data.preprocessing import Preprocessing
from cnnkit.export import export_onnx, export_pt2
from cnnkit.model_io import ModelMeta, save_model
from cnnkit.models import build_network, load_model_spec
from cnnkit.models.summary import summarize

BACKBONES = ["efficientnet_lite0", "mobilenet_v2", "resnet18", "resnet34", "resnet50"]

# Parameters with the 1000-class ImageNet head, as torchvision (and the EfficientNet-Lite
# reference) publish them: the same count means the same layers.
IMAGENET_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "mobilenet_v2": 3_504_872,
    "efficientnet_lite0": 4_652_008,
}

# A few state-dict keys of each reference network (less cnnkit's ``layers.`` prefix).
REFERENCE_KEYS = {
    "resnet18": ["conv1.weight", "bn1.running_var", "layer2.0.downsample.0.weight", "fc.bias"],
    "resnet34": ["layer3.5.conv2.weight", "layer4.0.downsample.1.weight", "fc.weight"],
    "resnet50": ["layer1.0.downsample.0.weight", "layer4.2.conv3.weight", "layer4.2.bn3.bias"],
    "mobilenet_v2": [
        "features.0.0.weight",
        "features.1.conv.0.0.weight",
        "features.1.conv.2.running_mean",
        "features.2.conv.3.weight",
        "features.18.1.bias",
        "classifier.1.weight",
    ],
    "efficientnet_lite0": ["features.16.conv.1.0.weight", "features.17.0.weight"],
}


def test_every_pretrained_preset_is_covered() -> None:
    from cnnkit.models import list_presets

    assert {p for p in list_presets() if load_model_spec(p).pretrained} == set(BACKBONES)


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_has_the_reference_size_and_names(name: str) -> None:
    spec = load_model_spec(name)
    assert spec.input_size == 224
    info = summarize(name, classes=1000)
    assert info["total_params"] == IMAGENET_PARAMS[name]
    net = build_network(spec.layers, 1000, 3, 64)
    keys = {k.removeprefix("layers.") for k in net.state_dict()}
    assert set(REFERENCE_KEYS[name]) <= keys
    assert sum(p.numel() for p in net.parameters()) == IMAGENET_PARAMS[name]


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_shapes_gradients_and_head(name: str) -> None:
    torch.manual_seed(0)
    net = build_network(load_model_spec(name).layers, 5, 3, 64)
    x = torch.randn(2, 3, 64, 64)
    net.train()
    maps = net.feature_maps(x)
    assert [n for n, _ in maps] == [i.name for i in net.infos]
    for (n, out), info in zip(maps, net.infos, strict=True):
        assert tuple(out.shape) == (2, *info.out_shape), n
    logits = maps[-1][1]
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([1, 3])).backward()
    for n, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    net.eval()
    with torch.no_grad():
        features = net.forward_features(x)
        assert features.ndim == 4 and features.shape[2:] == (2, 2)  # stride 32
        torch.testing.assert_close(net.forward_head(features), net(x))


@pytest.mark.slow  # two exports with verification each: 10-60 s a network on two cores
@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_exports_to_onnx_and_pt2(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    size = 32
    net = build_network(load_model_spec(name).layers, 3, 3, size).eval()
    meta = ModelMeta(
        classes=("a", "b", "c"),
        preprocessing=Preprocessing(
            size=size,
            channels=3,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            resize="crop",
        ),
        architecture=tuple(net.architecture()),
        model_name=name,
    )
    save_model(tmp_path, net, meta)
    onnx = export_onnx(tmp_path, check_images=4, batch_sizes=(1, 3))
    assert onnx.path.is_file() and onnx.parity.top1_agreement == 1.0
    pt2 = export_pt2(tmp_path, check_images=4, batch_sizes=(1, 3))
    assert pt2.path.is_file() and pt2.parity.top1_agreement == 1.0
