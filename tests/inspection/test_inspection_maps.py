"""Feature maps and their display: every layer type against torch.nn.functional."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnkit.errors import ConfigError
from cnnkit.inspection import LayerOutput, layer_outputs, normalize_map
from cnnkit.inspection.maps import normalize_maps
from cnnkit.models import build_network, parse_layers

EVERY_TYPE = [
    {"conv": {"filters": 4, "kernel": 3}},
    "batchnorm",
    "relu",
    {"maxpool": {"kernel": 2}},
    {"conv": {"filters": 5, "kernel": 3, "stride": 2, "padding": 1}},
    "gelu",
    {"dropout2d": {"rate": 0.5}},
    {"avgpool": {"kernel": 2}},
    {"scale": {"factor": 0.5}},
    "flatten",
    {"dense": {"units": 6}},
    {"dropout": {"rate": 0.5}},
    "dense",
]


def _network(layers: list, channels: int = 3, size: int = 12) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_network(parse_layers(layers), classes=3, channels=channels, size=size)
    for module in net.modules():  # non-trivial batchnorm state, so eval mode matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return net


def _reference(net, x: torch.Tensor) -> list[torch.Tensor]:
    """Each layer computed directly with torch.nn.functional, in eval mode."""
    outs = []
    for info in net.infos:
        module, p = net.layers[info.name], info.spec.params
        kind = info.spec.type
        if kind == "conv":
            x = F.conv2d(x, module.weight, module.bias, p["stride"], p["padding"])
        elif kind == "batchnorm":
            x = F.batch_norm(
                x,
                module.running_mean,
                module.running_var,
                module.weight,
                module.bias,
                training=False,
                eps=p["eps"],
            )
        elif kind == "relu":
            x = F.relu(x)
        elif kind == "gelu":
            x = F.gelu(x)
        elif kind == "maxpool":
            x = F.max_pool2d(x, p["kernel"], p["stride"], p["padding"])
        elif kind == "avgpool":
            x = F.avg_pool2d(x, p["kernel"], p["stride"], p["padding"])
        elif kind in ("dropout", "dropout2d"):
            pass  # identity when the model predicts
        elif kind == "gap":
            x = x.mean(dim=(2, 3))
        elif kind == "gmp":
            x = x.amax(dim=(2, 3))
        elif kind == "scale":
            x = x * p["factor"]
        elif kind == "flatten":
            x = x.flatten(1)
        elif kind == "dense":
            x = F.linear(x, module.weight, module.bias)
        else:
            raise AssertionError(kind)
        outs.append(x)
    return outs


@pytest.mark.parametrize(
    "layers",
    [
        EVERY_TYPE,
        [{"conv": {"filters": 3}}, "relu", "gap", "dense"],
        [{"conv": {"filters": 2}}, "gmp"],
    ],
    ids=["every-type", "gap-head", "gmp-head"],
)
def test_layer_outputs_match_functional_reference(layers: list) -> None:
    net = _network(layers)
    net.train()  # layer_outputs must switch to eval itself and restore the mode after
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    outputs = layer_outputs(net, x)
    assert net.training
    with torch.no_grad():
        expected = _reference(net, x)
    assert [o.name for o in outputs] == [i.name for i in net.infos]
    for out, ref, info in zip(outputs, expected, net.infos, strict=True):
        assert isinstance(out, LayerOutput)
        assert out.type == info.spec.type
        assert out.values.dtype == np.float32
        assert out.values.shape == tuple(info.out_shape), info.name
        np.testing.assert_allclose(
            out.values, ref[0].numpy(), rtol=1e-5, atol=1e-5, err_msg=info.name
        )
        assert out.min == pytest.approx(float(ref.min()), abs=1e-5)
        assert out.max == pytest.approx(float(ref.max()), abs=1e-5)
        assert out.is_map == (len(info.out_shape) == 3)


def test_layer_outputs_greyscale_and_channels_last() -> None:
    net = _network([{"conv": {"filters": 2}}, "relu"], channels=1, size=8)
    net = net.to(memory_format=torch.channels_last)
    x = torch.rand(1, 1, 8, 8)
    first = layer_outputs(net, x)[0]
    ref = F.conv2d(x, net.layers["conv1"].weight, net.layers["conv1"].bias, 1, 1)
    np.testing.assert_allclose(first.values, ref[0].detach().numpy(), rtol=1e-5, atol=1e-6)


def test_layer_outputs_rejects_wrong_shapes() -> None:
    net = _network([{"conv": {"filters": 2}}, "relu"], size=8)
    with pytest.raises(
        ConfigError, match=r"expected one image of shape \(1, C, H, W\), got \(2, 3, 8, 8\)"
    ):
        layer_outputs(net, torch.zeros(2, 3, 8, 8))
    with pytest.raises(
        ConfigError, match=r"the model takes \(3, 8, 8\) \(C, H, W\) input, got \(3, 9, 9\)"
    ):
        layer_outputs(net, torch.zeros(1, 3, 9, 9))


def test_normalize_maps_min_to_0_and_max_to_255() -> None:
    x = np.array([[-155.0, 0.0], [155.0, 310.0]])
    out = normalize_map(x)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 85], [170, 255]])
    rng = np.random.default_rng(0)
    y = rng.normal(size=(3, 7, 7)) * 1000
    z = normalize_map(torch.from_numpy(y))
    assert z.shape == y.shape and z.min() == 0 and z.max() == 255
    assert z.flat[np.argmin(y)] == 0 and z.flat[np.argmax(y)] == 255
    # Order is kept: a larger value never gets a darker grey.
    order = np.argsort(y.ravel())
    assert np.all(np.diff(z.ravel()[order].astype(int)) >= 0)


@pytest.mark.parametrize("value", [0.0, 7.5, -3.0])
def test_normalize_constant_map_is_all_zero(value: float) -> None:
    out = normalize_map(np.full((4, 5), value))
    assert out.dtype == np.uint8 and out.shape == (4, 5) and not out.any()


def test_normalize_handles_empty_and_non_finite() -> None:
    assert normalize_map(np.zeros((0, 3))).shape == (0, 3)
    out = normalize_map(np.array([np.nan, 0.0, 10.0, np.inf]))
    np.testing.assert_array_equal(out, [0, 0, 255, 0])
    assert not normalize_map(np.array([np.nan, np.nan])).any()


def test_normalize_maps_is_normalize_map_of_each_map_at_once() -> None:
    rng = np.random.default_rng(3)
    maps = rng.normal(size=(6, 5, 4)) * 100
    maps[1] = 7.0  # constant
    maps[2, 0, 0], maps[2, 1, 1] = np.nan, -np.inf  # non-finite values: the map's minimum
    maps[3] = np.nan  # nothing finite
    maps[4] = 0.0
    out = normalize_maps(maps)
    assert out.dtype == np.uint8 and out.shape == maps.shape
    for k in range(len(maps)):
        np.testing.assert_array_equal(out[k], normalize_map(maps[k]))
    assert out[0].min() == 0 and out[0].max() == 255 and not out[1].any() and not out[3].any()
    assert normalize_maps(np.zeros((0, 3, 3))).shape == (0, 3, 3)
