"""Layer lists, presets and ``Network``: shapes, gradients, reference computations, errors."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from cnnkit.errors import ConfigError
from cnnkit.models import (
    Network,
    build_network,
    infer_shapes,
    list_presets,
    load_model_spec,
    parse_layers,
)
from cnnkit.models.layers import LAYER_FIELDS, with_head
from cnnkit.models.summary import summarize

# One small network per layer type, the layer under test second (after a conv).
LAYER_NETWORKS: dict[str, list[object]] = {
    "conv": [{"conv": {"filters": 4}}, {"conv": {"filters": 5, "kernel": 5, "stride": 2}}],
    "relu": [{"conv": {"filters": 4}}, "relu"],
    "gelu": [{"conv": {"filters": 4}}, "gelu"],
    "maxpool": [{"conv": {"filters": 4}}, {"maxpool": {"kernel": 3, "stride": 2, "padding": 1}}],
    "avgpool": [{"conv": {"filters": 4}}, {"avgpool": {"kernel": 2}}],
    "gap": [{"conv": {"filters": 4}}, "gap"],
    "gmp": [{"conv": {"filters": 4}}, "gmp"],
    "dropout2d": [{"conv": {"filters": 4}}, {"dropout2d": {"rate": 0.3}}],
    "dropout": [{"conv": {"filters": 4}}, "flatten", {"dropout": {"rate": 0.3}}],
    "batchnorm": [{"conv": {"filters": 4, "bias": False}}, "batchnorm", "relu"],
    "flatten": [{"conv": {"filters": 4}}, "flatten"],
    "dense": [{"conv": {"filters": 4}}, "gap", {"dense": {"units": 6}}, "relu", "dense"],
    "scale": [{"conv": {"filters": 4}}, "gap", "dense", {"scale": {"factor": 0.5}}],
    "whiten": [{"whiten": {"kernel": 2}}, {"conv": {"filters": 4}}, "gap", "dense"],
    "relu6": [{"conv": {"filters": 4}}, "relu6"],
    "sequence": [{"sequence": {"name": "stem", "layers": [{"conv": {"filters": 4}}, "relu"]}}],
    "residual": [
        {"conv": {"filters": 4}},
        {"residual": {"layers": [{"conv": {"filters": 4, "bias": False}}, "bn"]}},
    ],
    "basic_block": [{"conv": {"filters": 4}}, {"basic_block": {"filters": 6, "stride": 2}}],
    "bottleneck": [{"conv": {"filters": 4}}, {"bottleneck": {"filters": 2, "stride": 2}}],
    "inverted_residual": [
        {"conv": {"filters": 4}},
        {"inverted_residual": {"filters": 4, "expand": 3, "kernel": 5}},
    ],
}


def test_every_layer_type_has_a_network_here() -> None:
    assert set(LAYER_NETWORKS) == set(LAYER_FIELDS)


def _network(entries: list[object], classes: int = 3, channels: int = 3, size: int = 12):
    torch.manual_seed(0)
    net = build_network(parse_layers(entries), classes, channels, size)
    for module in net.layers.values():
        if hasattr(module, "fit"):  # frozen whitening is set from data before training
            module.fit(torch.randn(8, channels, size, size))
    return net


@pytest.mark.parametrize("kind", sorted(LAYER_NETWORKS))
def test_output_shapes_equal_infer_shapes(kind: str) -> None:
    net = _network(LAYER_NETWORKS[kind])
    types = [info.spec.type for info in net.infos]
    assert kind in types or (kind == "sequence" and types == ["conv", "relu", "flatten", "dense"])
    x = torch.randn(2, 3, 12, 12)
    net.train()
    maps = net.feature_maps(x)
    assert [name for name, _ in maps] == [info.name for info in net.infos]
    for (_, out), info in zip(maps, net.infos, strict=True):
        assert tuple(out.shape) == (2, *info.out_shape), info.name
    assert net(x).shape == (2, 3) and net.num_classes == 3


@pytest.mark.parametrize("kind", sorted(LAYER_NETWORKS))
def test_finite_gradients_reach_every_parameter(kind: str) -> None:
    net = _network(LAYER_NETWORKS[kind])
    net.train()
    x = torch.randn(4, 3, 12, 12)
    loss = F.cross_entropy(net(x), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    params = {name: p for name, p in net.named_parameters() if p.requires_grad}
    assert params
    for name, p in net.named_parameters():
        if not p.requires_grad:  # frozen by design (whitening): no gradient at all
            assert p.grad is None and kind == "whiten", name
    for name, p in params.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("preset", list_presets())
@pytest.mark.parametrize("channels", [1, 3])
def test_presets_build_run_and_learn(preset: str, channels: int) -> None:
    spec = load_model_spec(preset)
    size = spec.input_size if spec.input_size <= 128 else 64  # the 224-pixel backbones: smaller
    torch.manual_seed(0)
    net = build_network(spec.layers, 4, channels, size)
    for module in net.layers.values():
        if hasattr(module, "fit"):  # frozen whitening is set from data before training
            module.fit(torch.randn(8, channels, size, size))
    assert net.in_shape == (channels, size, size)
    x = torch.randn(2, channels, size, size)
    net.train()
    for (name, out), info in zip(net.feature_maps(x), net.infos, strict=True):
        assert tuple(out.shape) == (2, *info.out_shape), name
    logits = net(x)
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([1, 3])).backward()
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net.forward_head(net.forward_features(x)), net(x))
        assert net.forward_features(x).ndim == 4  # feature maps, up to the flatten/gmp


def test_presets_are_listed_and_described() -> None:
    assert {"fast", "seed"} <= set(list_presets())
    assert list_presets() == sorted(list_presets())
    seed = load_model_spec("seed")
    assert (
        seed.input_size == 128 and seed.name == "seed" and "learning material" in seed.description
    )
    assert [s.type for s in seed.layers] == [
        "conv",
        "maxpool",
        "relu",
        "conv",
        "maxpool",
        "relu",
        "conv",
        "dropout2d",
        "relu",
        "flatten",
        "dense",
    ]
    assert load_model_spec("fast").input_size == 64


def test_layer_names_count_per_type() -> None:
    net = build_network(load_model_spec("seed").layers, 3, 3, 32)
    assert list(net.layers) == [
        "conv1",
        "maxpool1",
        "relu1",
        "conv2",
        "maxpool2",
        "relu2",
        "conv3",
        "dropout2d1",
        "relu3",
        "flatten1",
        "dense1",
    ]


# ------------------------------------------------------------- reference computations


def _conv_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int):
    """Cross-correlation with zero padding, by loops: x (C, H, W), w (F, C, K, K) -> (F, H', W')."""
    _, h, wd = x.shape
    f, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    out = np.zeros((f, ho, wo))
    for o, i, j in itertools.product(range(f), range(ho), range(wo)):
        patch = xp[:, i * stride : i * stride + k, j * stride : j * stride + k]
        out[o, i, j] = (patch * w[o]).sum() + b[o]
    return out


@pytest.mark.parametrize(
    ("kernel", "stride", "padding"),
    [(3, 1, "same"), (3, 2, 1), (5, 1, "valid"), (1, 1, 0), (2, 2, "valid"), (3, 3, 2)],
)
def test_conv_equals_a_direct_computation(kernel: int, stride: int, padding: object) -> None:
    entry = {"conv": {"filters": 3, "kernel": kernel, "stride": stride, "padding": padding}}
    net = _network([entry], size=9)
    conv = net.layers["conv1"]
    with torch.no_grad():
        conv.bias.uniform_(-1, 1)  # biases start at 0: make them count
    x = torch.randn(1, 3, 9, 9)
    out = conv(x).detach().numpy()[0]
    pad = {"same": kernel // 2, "valid": 0}.get(padding, padding)  # type: ignore[arg-type]
    w, b = conv.weight.detach().double().numpy(), conv.bias.detach().double().numpy()
    expected = _conv_reference(x[0].double().numpy(), w, b, stride, pad)
    assert out.shape == expected.shape == net.infos[0].out_shape
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def _pool_reference(x: np.ndarray, k: int, stride: int, pad: int, kind: str) -> np.ndarray:
    """Max pooling pads with -inf; average pooling with zeros counted in (PyTorch's default)."""
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    c, h, w = x.shape
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    out = np.zeros((c, ho, wo))
    for ch, i, j in itertools.product(range(c), range(ho), range(wo)):
        window = xp[ch, i * stride : i * stride + k, j * stride : j * stride + k]
        out[ch, i, j] = window.max() if kind == "max" else window.mean()
    return out


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize(
    ("kernel", "stride", "padding"), [(2, None, 0), (3, 2, 1), (3, 1, 0), (2, 1, 1)]
)
def test_pooling_equals_a_direct_computation(
    kind: str, kernel: int, stride: int | None, padding: int
) -> None:
    settings = {"kernel": kernel, "stride": stride, "padding": padding}
    net = _network([{"conv": {"filters": 2}}, {f"{kind}pool": settings}], size=7)
    pool = net.layers[f"{kind}pool1"]
    x = torch.randn(1, 2, 7, 7)
    out = pool(x).numpy()[0]
    expected = _pool_reference(x[0].double().numpy(), kernel, stride or kernel, padding, kind)
    assert out.shape == expected.shape == net.infos[1].out_shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_global_pooling_activations_and_scale_equal_references() -> None:
    net = _network(LAYER_NETWORKS["gmp"])
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(net.layers["gmp1"](x), x.amax(dim=(2, 3)))
    net = _network(LAYER_NETWORKS["gap"])
    torch.testing.assert_close(net.layers["gap1"](x), torch.from_numpy(x.numpy().mean((2, 3))))
    net = _network(LAYER_NETWORKS["gelu"])
    torch.testing.assert_close(net.layers["gelu1"](x), F.gelu(x))
    exact = 0.5 * x.double() * (1 + torch.erf(x.double() / math.sqrt(2)))
    torch.testing.assert_close(net.layers["gelu1"](x).double(), exact, atol=1e-6, rtol=1e-5)
    net = _network(LAYER_NETWORKS["relu"])
    assert torch.equal(net.layers["relu1"](x), x.clamp(min=0))
    net = _network(LAYER_NETWORKS["scale"])
    assert torch.equal(net.layers["scale1"](x), x * 0.5)
    net = _network(LAYER_NETWORKS["flatten"])
    assert torch.equal(net.layers["flatten1"](x), x.reshape(2, -1))


def test_dense_equals_matrix_product() -> None:
    net = _network(LAYER_NETWORKS["dense"])
    dense = net.layers["dense1"]
    with torch.no_grad():
        dense.bias.uniform_(-1, 1)
    v = torch.randn(3, 4)
    w, b = dense.weight.detach().numpy(), dense.bias.detach().numpy()
    np.testing.assert_allclose(dense(v).detach().numpy(), v.numpy() @ w.T + b, rtol=1e-5, atol=1e-6)


def test_batchnorm_normalises_per_channel_in_training_and_uses_running_stats_after() -> None:
    net = _network(LAYER_NETWORKS["batchnorm"])
    bn = net.layers["batchnorm1"]
    x = torch.randn(8, 4, 6, 6) * 3 + 2
    bn.train()
    out = bn(x).detach().numpy()
    xs = x.double().numpy()
    mean = xs.mean(axis=(0, 2, 3), keepdims=True)
    var = xs.var(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(out, (xs - mean) / np.sqrt(var + 1e-5), atol=1e-4)
    bn.eval()
    running = (x - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        bn.running_var.view(1, -1, 1, 1) + 1e-5
    )
    torch.testing.assert_close(bn(x), running)


def test_dropout2d_drops_whole_feature_maps_in_training_only() -> None:
    net = _network(LAYER_NETWORKS["dropout2d"])
    drop = net.layers["dropout2d1"]
    x = torch.rand(16, 8, 5, 5) + 1.0  # never zero by itself
    drop.train()
    torch.manual_seed(1)
    out = drop(x)
    maps = out.reshape(16 * 8, -1)
    dropped = (maps == 0).all(dim=1)
    kept = torch.isclose(maps, (x / 0.7).reshape(16 * 8, -1)).all(dim=1)
    assert torch.all(dropped | kept)  # each map is either gone or scaled as a whole
    assert 0.15 < dropped.float().mean() < 0.45  # about the rate of 0.3
    drop.eval()
    assert torch.equal(drop(x), x)
    net.eval()
    y = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(net(y), net(y))  # no randomness left in eval mode


def test_dropout_drops_single_values_in_training_only() -> None:
    net = _network(LAYER_NETWORKS["dropout"])
    drop = net.layers["dropout1"]
    x = torch.rand(64, 100) + 1.0
    drop.train()
    out = drop(x)
    assert torch.all((out == 0) | torch.isclose(out, x / 0.7))
    assert 0.25 < (out == 0).float().mean() < 0.35
    drop.eval()
    assert torch.equal(drop(x), x)


def test_gaussian_initialisation() -> None:
    torch.manual_seed(0)
    entries = [
        {"conv": {"filters": 64, "kernel": 3}},
        "flatten",
        {"dense": {"units": 256}},
        "dense",
    ]
    net = build_network(parse_layers(entries), 3, 16, 4)
    conv, dense = net.layers["conv1"], net.layers["dense1"]
    for weight, fan_in in ((conv.weight, 16 * 3 * 3), (dense.weight, 64 * 4 * 4)):
        w = weight.detach()
        assert abs(w.mean().item()) < 0.05 * math.sqrt(2 / fan_in)
        assert w.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
    assert conv.bias.abs().sum() == 0 and dense.bias.abs().sum() == 0
    bn_net = _network(LAYER_NETWORKS["batchnorm"])
    bn = bn_net.layers["batchnorm1"]
    assert torch.equal(bn.weight, torch.ones(4)) and torch.equal(bn.bias, torch.zeros(4))
    assert bn_net.layers["conv1"].bias is None  # bias: false


# ---------------------------------------------------------------------- layer errors


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"conv": {"filters": 0}}], "layer 1 (conv): filters: expected a positive integer, got 0"),
        (
            ["relu", {"conv": {"filters": 2.5}}],
            "layer 2 (conv): filters: expected a positive integer, got 2.5",
        ),
        ([{"conv": {}}], "layer 1 (conv): filters: required"),
        ([{"conv": None}], "layer 1 (conv): filters: required"),
        (
            [{"conv": {"filters": 4, "kernel": 2}}],
            "layer 1 (conv): padding: 'same' needs an odd kernel, got kernel 2",
        ),
        (
            [{"conv": {"filters": 4, "padding": -1}}],
            "layer 1 (conv): padding: expected an integer >= 0, got -1",
        ),
        (
            [{"conv": {"filters": 4, "stride": 0}}],
            "layer 1 (conv): stride: expected a positive integer, got 0",
        ),
        (
            [{"conv": {"filters": 4, "bias": "yes"}}],
            "layer 1 (conv): bias: expected true or false, got 'yes'",
        ),
        (
            [{"conv": {"filters": 4, "size": 3}}],
            "layer 1 (conv): unknown field 'size' "
            "(allowed: filters, kernel, stride, padding, bias, groups)",
        ),
        (
            [{"relu": {"inplace": True}}],
            "layer 1 (relu): unknown field 'inplace' (allowed: no settings)",
        ),
        (
            ["relu", {"maxpool": {"kernel": 2, "padding": 2}}],
            "layer 2 (maxpool): padding: at most half the kernel (1), got 2",
        ),
        (
            [{"avgpool": {"kernel": 0}}],
            "layer 1 (avgpool): kernel: expected a positive integer, got 0",
        ),
        (
            [{"dropout": {"rate": 1}}],
            "layer 1 (dropout): rate: expected a number from 0 to below 1, got 1",
        ),
        (
            [{"dropout2d": {"rate": -0.1}}],
            "layer 1 (dropout2d): rate: expected a number from 0 to below 1, got -0.1",
        ),
        ([{"dense": {"units": 0}}], "layer 1 (dense): units: expected a positive integer, got 0"),
        (
            [{"batchnorm": {"momentum": 1.5}}],
            "layer 1 (batchnorm): momentum: expected a number between 0 and 1, got 1.5",
        ),
        ([{"scale": {"factor": 0}}], "layer 1 (scale): factor: expected a positive number, got 0"),
        (
            ["conv3d"],
            "layer 1: unknown layer type 'conv3d', expected one of conv, relu, gelu, maxpool, "
            "avgpool, gap, gmp, dropout2d, dropout, batchnorm, flatten, dense, scale"
            + "".join(f", {k}" for k in list(LAYER_FIELDS)[13:]),
        ),
        ([5], "layer 1: expected a layer name or a mapping like 'conv: {filters: 12}', got 5"),
        ([{"conv": 5}], "layer 1 (conv): expected a mapping of settings, got 5"),
        ([{"type": 3}], "layer 1: type: expected a layer name, got 3"),
        ([], "layers: expected a non-empty list of layers, got []"),
        ("conv", "layers: expected a non-empty list of layers, got 'conv'"),
    ],
)
def test_invalid_layer_settings_name_layer_type_field_and_value(
    entries: object, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_layers(entries)
    assert str(info.value) == message


def test_aliases_and_type_mappings() -> None:
    specs = parse_layers(
        [
            {"type": "Conv2d", "filters": 4},
            "bn",
            "pool",
            "global_avgpool",
            {"fc": {"units": 5}},
            "linear",
        ]
    )
    assert [s.type for s in specs] == ["conv", "batchnorm", "maxpool", "gap", "dense", "dense"]
    assert specs[0].params == {
        "filters": 4,
        "kernel": 3,
        "stride": 1,
        "padding": 1,
        "bias": True,
        "groups": 1,
    }
    assert specs[2].params == {"kernel": 2, "stride": 2, "padding": 0}


@pytest.mark.parametrize(
    ("entries", "size", "message"),
    [
        (
            [{"conv": {"filters": 2}}, "flatten", {"conv": {"filters": 2}}],
            8,
            "layer 3 (conv): needs feature maps (C, H, W) as input, got a vector of 128 after a "
            "flatten",
        ),
        (
            [{"conv": {"filters": 4}}, {"dense": {"units": 5}}, "dense"],
            8,
            "layer 2 (dense): needs a vector as input; put a flatten or gap layer before it "
            "(input is (4, 8, 8))",
        ),
        (
            [{"conv": {"filters": 2, "kernel": 9, "padding": "valid"}}],
            4,
            "layer 1 (conv): a 9x9 kernel does not fit the 4x4 input; use a larger image size or "
            "fewer layers",
        ),
        (
            [{"maxpool": {"kernel": 2}}] * 3,
            4,
            "layer 3 (maxpool): a 2x2 window does not fit the 1x1 input; use a larger image size "
            "or fewer layers",
        ),
        (
            [{"conv": {"filters": 2}}, "gap", "dense", "dense"],
            8,
            "layer 3 (dense): units: required except on the last dense layer",
        ),
        (
            [{"conv": {"filters": 2}}, "gap", {"dense": {"units": 10}}],
            8,
            "layer 3 (dense): units: the last dense layer outputs one score per class (3); leave "
            "units out, got 10",
        ),
    ],
)
def test_shape_errors(entries: list[object], size: int, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_network(parse_layers(entries), 3, 3, size)
    assert str(info.value) == message


def test_with_head_adds_what_is_missing() -> None:
    bare = with_head(parse_layers([{"conv": {"filters": 2}}]), 4)
    assert [s.type for s in bare] == ["conv", "flatten", "dense"]
    assert bare[-1].params == {"units": 4}
    pooled = with_head(parse_layers([{"conv": {"filters": 2}}, "gmp"]), 4)
    assert [s.type for s in pooled] == ["conv", "gmp", "dense"]
    scaled = with_head(parse_layers(["gap", "dense", {"scale": {"factor": 2}}]), 5)
    assert [s.type for s in scaled] == ["gap", "dense", "scale"]
    assert scaled[1].params == {"units": 5}


def test_build_network_needs_two_classes() -> None:
    with pytest.raises(ConfigError, match=r"^classes: expected at least 2, got 1$"):
        build_network(load_model_spec("fast").layers, 1, 3, 64)


def test_architecture_rebuilds_the_same_network() -> None:
    net = build_network(load_model_spec("fast").layers, 5, 1, 32)
    again = Network(parse_layers(net.architecture()), net.in_shape)
    assert again.infos == net.infos
    assert net.architecture()[0] == {
        "type": "conv",
        "filters": 16,
        "kernel": 3,
        "stride": 1,
        "padding": 1,
        "bias": False,
        "groups": 1,
    }


# ----------------------------------------------------------------- presets and files


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError) as info:
        load_model_spec("resnet99")
    assert str(info.value) == (
        f"unknown model 'resnet99': not a preset ({', '.join(list_presets())}) nor a YAML file"
    )


def test_model_files(tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump({"name": "tiny", "input_size": 16, "layers": [{"conv": {"filters": 3}}]})
    )
    spec = load_model_spec(str(path))
    assert (spec.name, spec.input_size, len(spec.layers)) == ("tiny", 16, 1)
    bare = tmp_path / "list.yml"
    bare.write_text(yaml.safe_dump([{"conv": {"filters": 3}}, "gap"]))
    assert load_model_spec(str(bare)).input_size == 128  # the default
    with pytest.raises(ConfigError, match=r"^model file not found: .*missing\.yaml$"):
        load_model_spec(str(tmp_path / "missing.yaml"))
    path.write_text(yaml.safe_dump({"layers": [{"conv": {"filters": -2}}]}))
    with pytest.raises(ConfigError) as info:
        load_model_spec(str(path))
    assert str(info.value) == (
        f"{path}: layer 1 (conv): filters: expected a positive integer, got -2"
    )
    path.write_text(yaml.safe_dump({"layer": []}))
    with pytest.raises(ConfigError, match="unknown field 'layer' \\(allowed: name, description"):
        load_model_spec(str(path))
    path.write_text(yaml.safe_dump({"input_size": 2, "layers": ["relu"]}))
    with pytest.raises(ConfigError, match="input_size: expected 4 to 1024 pixels, got 2"):
        load_model_spec(str(path))


# ------------------------------------------------------------------------- summary


def test_seed_summary_matches_hand_computed_numbers() -> None:
    info = summarize("seed")  # 3x128x128 input, 3 classes
    rows = {r["name"]: (tuple(r["output_shape"]), r["params"], r["flops"]) for r in info["layers"]}
    assert rows == {
        # conv: F*C*K*K + F parameters; 2*C*K*K*F*H*W FLOPs (a multiply-add is two)
        "conv1": ((12, 128, 128), 12 * 3 * 9 + 12, 2 * 3 * 9 * 12 * 128 * 128),
        "maxpool1": ((12, 64, 64), 0, 12 * 64 * 64 * 4),
        "relu1": ((12, 64, 64), 0, 12 * 64 * 64),
        "conv2": ((12, 64, 64), 12 * 12 * 9 + 12, 2 * 12 * 9 * 12 * 64 * 64),
        "maxpool2": ((12, 32, 32), 0, 12 * 32 * 32 * 4),
        "relu2": ((12, 32, 32), 0, 12 * 32 * 32),
        "conv3": ((24, 32, 32), 24 * 12 * 9 + 24, 2 * 12 * 9 * 24 * 32 * 32),
        "dropout2d1": ((24, 32, 32), 0, 24 * 32 * 32),
        "relu3": ((24, 32, 32), 0, 24 * 32 * 32),
        "flatten1": ((24576,), 0, 0),
        "dense1": ((3,), 24576 * 3 + 3, 2 * 24576 * 3),
    }
    assert info["total_params"] == 77_991
    assert info["total_flops"] == 27_045_888
    assert info["input_shape"] == [3, 128, 128] and info["name"] == "seed"
    net = build_network(load_model_spec("seed").layers, 3, 3, 128)
    assert sum(p.numel() for p in net.parameters()) == 77_991


@pytest.mark.parametrize("preset", ["seed", "fast"])
def test_summary_flops_of_conv_and_dense_agree_with_torch(preset: str) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    info = summarize(preset, image_size=32)
    net = build_network(load_model_spec(preset).layers, 3, 3, 32).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.randn(1, 3, 32, 32))
    ours = sum(r["flops"] for r in info["layers"] if r["type"] in ("conv", "dense"))
    assert ours == counter.get_total_flops()
    assert info["total_params"] == sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(
    ("preset", "channels"),
    [
        ("fast", 3),
        ("mnist", 1),
    ],
)
def test_preset_descriptions_state_the_flops_counted(preset: str, channels: int) -> None:
    description = load_model_spec(preset).description
    match = re.search(r"about (\d+(?:\.\d+)?) MFLOPs", description, re.IGNORECASE)
    assert match, description
    counted = summarize(preset, channels=channels)["total_flops"] / 1e6
    assert counted == pytest.approx(float(match.group(1)), rel=0.2)


def test_fast_preset_is_as_described() -> None:
    info = summarize("fast")
    assert info["input_shape"] == [3, 64, 64]
    assert 20e6 < info["total_flops"] < 35e6
    assert [r["output_shape"][0] for r in info["layers"] if r["type"] == "conv"] == [16, 32, 64, 96]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": 1}, "classes: expected at least 2, got 1"),
        ({"channels": 2}, "channels: expected 1 or 3, got 2"),
        ({"image_size": 2}, "image_size: expected 4 to 1024 pixels, got 2"),
    ],
)
def test_summary_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}$"):
        summarize("seed", **kwargs)


def test_summary_follows_image_size_and_channels() -> None:
    info = summarize("seed", image_size=64, classes=5, channels=1)
    assert info["input_shape"] == [1, 64, 64]
    assert info["layers"][0]["params"] == 12 * 1 * 9 + 12
    assert info["layers"][-1]["output_shape"] == [5]
    assert info["layers"][-1]["params"] == 24 * 16 * 16 * 5 + 5
    infos = infer_shapes(with_head(list(load_model_spec("seed").layers), 5), (1, 64, 64))
    assert info["total_flops"] == sum(i.flops for i in infos)


def test_batchnorm_without_scale_learns_only_its_shift() -> None:
    net = build_network(parse_layers([{"conv": {"filters": 4}}, {"bn": {"scale": False}}]), 3, 3, 8)
    norm = net.layers["batchnorm1"]
    assert not norm.weight.requires_grad and norm.bias.requires_grad
    net(torch.randn(4, 3, 8, 8)).sum().backward()
    assert norm.weight.grad is None and norm.bias.grad is not None
    assert torch.equal(norm.weight, torch.ones(4))
    plain = build_network(parse_layers([{"conv": {"filters": 4}}, "batchnorm"]), 3, 3, 8)
    assert plain.layers["batchnorm1"].weight.requires_grad
    with pytest.raises(ConfigError, match=r"layer 2 \(batchnorm\): scale: expected true or false"):
        parse_layers([{"conv": {"filters": 4}}, {"batchnorm": {"scale": "no"}}])
