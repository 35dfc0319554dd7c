"""Grad-CAM: against a hand-written reference, and on a shape the trained model knows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnkit.data.images import load_image, to_model_input
from cnnkit.data.shapes import draw_shape
from cnnkit.errors import ConfigError
from cnnkit.inference import load
from cnnkit.inspection import default_cam_layer, grad_cam
from cnnkit.models import build_network, load_model_spec, parse_layers


def _reference_cam(net, x: torch.Tensor, cls: int, layer: str) -> np.ndarray:
    """Grad-CAM written out with a forward hook, the usual way."""
    store = {}

    def hook(_module, _inputs, output):
        output.retain_grad()
        store["a"] = output

    handle = net.layers[layer].register_forward_hook(hook)
    try:
        net.eval()
        logits = net(x.clone().requires_grad_(True))
        logits[0, cls].backward()
    finally:
        handle.remove()
    a = store["a"]
    w = a.grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((w * a).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[0, 0]
    return (cam / cam.max()).numpy() if cam.max() > 0 else np.zeros(x.shape[2:], np.float32)


def _shape_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of the drawn shape: the generator draws a dark shape (luma <= 130) on a light
    background (luma >= 170)."""
    luma = rgb[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return luma < 150


def test_default_layer_is_last_spatial_map_before_head() -> None:
    fast = build_network(load_model_spec("fast").layers, 3, 3, 32)
    assert default_cam_layer(fast) == "relu4"
    seed = build_network(load_model_spec("seed").layers, 3, 3, 32)
    assert default_cam_layer(seed) == "relu3"


@pytest.mark.parametrize("cls", [None, 0, 2])
def test_grad_cam_matches_hook_reference(cls: int | None) -> None:
    torch.manual_seed(0)
    layers = parse_layers(
        [{"conv": {"filters": 6}}, "relu", "maxpool", {"conv": {"filters": 8}}, "relu", "gap"]
    )
    net = build_network(layers, 3, 3, 16)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    heat, used = grad_cam(net, x, cls)
    expected_cls = int(net.eval()(x).argmax()) if cls is None else cls
    assert used == expected_cls
    assert heat.shape == (16, 16) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1
    ref = _reference_cam(net, x, used, "relu2")
    np.testing.assert_allclose(heat, ref, rtol=1e-4, atol=1e-5)


def test_grad_cam_leaves_model_untouched() -> None:
    torch.manual_seed(0)
    net = build_network(parse_layers([{"conv": {"filters": 4}}, "relu", "gap"]), 2, 1, 8)
    net.train()
    grad_cam(net, torch.rand(1, 1, 8, 8))
    assert net.training
    assert all(p.grad is None for p in net.parameters())


def test_grad_cam_under_inference_mode() -> None:
    torch.manual_seed(0)
    net = build_network(parse_layers([{"conv": {"filters": 4}}, "relu", "gap"]), 2, 1, 8)
    x = torch.rand(1, 1, 8, 8)
    expected, cls = grad_cam(net, x)
    with torch.inference_mode():
        heat, used = grad_cam(net, x.clone())
    assert used == cls
    np.testing.assert_array_equal(heat, expected)


def test_grad_cam_rejects_bad_arguments() -> None:
    net = build_network(parse_layers([{"conv": {"filters": 4}}, "relu", "gap"]), 2, 1, 8)
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ConfigError, match=r"class index 5 out of range 0\.\.1"):
        grad_cam(net, x, 5)
    with pytest.raises(
        ConfigError, match=r"unknown layer 'conv9', expected one of conv1, relu1, gap1, dense1"
    ):
        grad_cam(net, x, layer="conv9")
    with pytest.raises(ConfigError, match="layer 'gap1' outputs a vector"):
        grad_cam(net, x, layer="gap1")
    with pytest.raises(ConfigError, match="expected one image"):
        grad_cam(net, torch.rand(2, 1, 8, 8))


def test_grad_cam_weighs_the_shape_more_than_the_background(trained_run, tmp_path: Path) -> None:
    run_dir, _ = trained_run
    classifier = load(run_dir, device="cpu", precision="fp32")
    size = classifier.meta.preprocessing.size
    rng = np.random.default_rng(3)
    inside_means, outside_means = [], []
    for kind in classifier.classes:
        for _ in range(3):
            image = draw_shape(kind, size, rng)
            arr = load_image(
                image,
                size,
                classifier.meta.preprocessing.channels,
                classifier.meta.preprocessing.resize,
            )
            x = to_model_input(
                torch.from_numpy(arr[None].copy()),
                classifier.meta.preprocessing.mean,
                classifier.meta.preprocessing.std,
            )
            heat, _ = grad_cam(classifier.model, x)
            mask = _shape_mask(arr)
            assert 0 < mask.mean() < 0.9, "the generated shape should cover part of the image"
            inside_means.append(heat[mask].mean())
            outside_means.append(heat[~mask].mean())
    inside, outside = np.array(inside_means), np.array(outside_means)
    # Measured on the fixture run: about 0.39 inside against 0.16 outside on average.
    assert inside.mean() > 1.5 * outside.mean()
    assert (inside > outside).sum() >= 7  # of 9 images
