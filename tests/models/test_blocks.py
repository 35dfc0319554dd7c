"""Blocks and the layers backbones need, each against a plain-torch reference written here;
names, nesting and inner feature maps; error messages."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cnnkit.errors import ConfigError
from cnnkit.models import build_network, parse_layers
from cnnkit.models.layers import LAYER_TYPES, explain_layer

# The types the learning material's tests (test_models.py) check one by one.
FIRST_TYPES = {
    "conv", "relu", "gelu", "maxpool", "avgpool", "gap", "gmp", "dropout2d", "dropout",
    "batchnorm", "flatten", "dense", "scale", "whiten",
}  # fmt: skip


def _net(entries: list, channels: int = 4, size: int = 9, classes: int = 3):
    torch.manual_seed(0)
    net = build_network(parse_layers(entries), classes, channels, size)
    _randomise(net)
    return net.eval()


@torch.no_grad()
def _randomise(net: torch.nn.Module) -> None:
    """Non-trivial batchnorm statistics and biases, so a reference that skips one fails."""
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.5, 0.5)
        elif isinstance(module, torch.nn.Conv2d) and module.bias is not None:
            module.bias.uniform_(-0.5, 0.5)


def _bn(x: torch.Tensor, sd: dict, prefix: str, eps: float = 1e-5) -> torch.Tensor:
    return F.batch_norm(
        x,
        sd[f"{prefix}.running_mean"],
        sd[f"{prefix}.running_var"],
        sd[f"{prefix}.weight"],
        sd[f"{prefix}.bias"],
        False,
        0.0,
        eps,
    )


def _tf_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """TensorFlow's SAME padding, from its definition: out = ceil(in / s), extra at the end."""
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
    pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


# Each case: layer entries (the layer under test named "t"), input channels and a reference
# ``(state dict of t, input) -> output`` in plain torch.
def _ref_relu6(sd, x):
    return x.clamp(0, 6)


def _ref_grouped(sd, x):  # groups=2: two convolutions over half the maps each, concatenated
    a = F.conv2d(x[:, :2], sd["weight"][:3], sd["bias"][:3], padding=1)
    b = F.conv2d(x[:, 2:], sd["weight"][3:], sd["bias"][3:], padding=1)
    return torch.cat([a, b], 1)


def _ref_depthwise(sd, x):  # one 3x3 kernel per map
    maps = [
        F.conv2d(x[:, i : i + 1], sd["weight"][i : i + 1], stride=2, padding=1) for i in range(4)
    ]
    return torch.cat(maps, 1)


def _ref_tf_same(sd, x):
    return F.conv2d(_tf_pad(x, 3, 2), sd["weight"], sd["bias"], stride=2)


def _ref_sequence(sd, x):
    return F.relu(F.conv2d(x, sd["0.weight"], sd["0.bias"], padding=1))


def _ref_residual(sd, x):
    y = _bn(F.conv2d(x, sd["conv1.weight"], padding=1), sd, "batchnorm1")
    return F.relu(y + x)


def _ref_basic(sd, x):
    y = F.relu(_bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=1), sd, "bn1"))
    y = _bn(F.conv2d(y, sd["conv2.weight"], padding=1), sd, "bn2")
    s = _bn(F.conv2d(x, sd["downsample.0.weight"], stride=2), sd, "downsample.1")
    return F.relu(y + s)


def _ref_basic_identity(sd, x):
    y = F.relu(_bn(F.conv2d(x, sd["conv1.weight"], padding=1), sd, "bn1"))
    return F.relu(_bn(F.conv2d(y, sd["conv2.weight"], padding=1), sd, "bn2") + x)


def _ref_bottleneck(sd, x):
    y = F.relu(_bn(F.conv2d(x, sd["conv1.weight"]), sd, "bn1"))
    y = F.relu(_bn(F.conv2d(y, sd["conv2.weight"], stride=2, padding=1, groups=2), sd, "bn2"))
    y = _bn(F.conv2d(y, sd["conv3.weight"]), sd, "bn3")
    s = _bn(F.conv2d(x, sd["downsample.0.weight"], stride=2), sd, "downsample.1")
    return F.relu(y + s)


def _ref_inverted(sd, x):  # expand 3 (12 maps), depthwise 5x5, project to 4, add the input
    y = F.relu6(_bn(F.conv2d(x, sd["conv.0.0.weight"]), sd, "conv.0.1"))
    y = F.relu6(_bn(F.conv2d(y, sd["conv.1.0.weight"], padding=2, groups=12), sd, "conv.1.1"))
    return _bn(F.conv2d(y, sd["conv.2.weight"]), sd, "conv.3") + x


def _ref_inverted_tf(sd, x):  # no expansion, stride 2, TF padding, other eps: no addition
    y = _tf_pad(x, 3, 2)
    y = F.conv2d(y, sd["conv.0.0.weight"], stride=2, groups=4)
    y = F.relu6(_bn(y, sd, "conv.0.1", eps=1e-3))
    return _bn(F.conv2d(y, sd["conv.1.weight"]), sd, "conv.2", eps=1e-3)


CASES = {
    "relu6": ([{"relu6": {"name": "t"}}], _ref_relu6),
    "conv groups": ([{"conv": {"name": "t", "filters": 6, "groups": 2}}], _ref_grouped),
    "conv depthwise": (
        [{"conv": {"name": "t", "filters": 4, "stride": 2, "groups": "depthwise", "bias": False}}],
        _ref_depthwise,
    ),
    "conv tf_same": (
        [{"conv": {"name": "t", "filters": 5, "stride": 2, "padding": "tf_same"}}],
        _ref_tf_same,
    ),
    "sequence": (
        [{"sequence": {"name": "t", "layers": [{"conv": {"filters": 3}}, "relu"]}}],
        _ref_sequence,
    ),
    "residual": (
        [
            {
                "residual": {
                    "name": "t",
                    "layers": [{"conv": {"filters": 4, "bias": False}}, "bn"],
                    "activation": "relu",
                }
            }
        ],
        _ref_residual,
    ),
    "basic_block": ([{"basic_block": {"name": "t", "filters": 6, "stride": 2}}], _ref_basic),
    "basic_block identity": ([{"basic_block": {"name": "t", "filters": 4}}], _ref_basic_identity),
    "bottleneck": (
        [{"bottleneck": {"name": "t", "filters": 4, "stride": 2, "groups": 2}}],
        _ref_bottleneck,
    ),
    "inverted_residual": (
        [{"inverted_residual": {"name": "t", "filters": 4, "expand": 3, "kernel": 5}}],
        _ref_inverted,
    ),
    "inverted_residual tf_same": (
        [
            {
                "inverted_residual": {
                    "name": "t",
                    "filters": 6,
                    "expand": 1,
                    "stride": 2,
                    "padding": "tf_same",
                    "eps": 1e-3,
                    "momentum": 0.01,
                }
            }
        ],
        _ref_inverted_tf,
    ),
}


def test_every_new_layer_type_and_block_has_a_reference_case() -> None:
    covered = {name.split()[0] for name in CASES}
    assert set(LAYER_TYPES) - FIRST_TYPES <= covered


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("size", [9, 8])  # odd and even sides: TF padding differs
def test_block_equals_plain_torch_reference(case: str, size: int) -> None:
    entries, reference = CASES[case]
    net = _net(entries, size=size)
    x = torch.randn(2, 4, size, size)
    target = net.layers["t"]
    got = target(x)
    expected = reference(target.state_dict(), x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net.feature_maps(x)[len(net.infos) - 3][1], expected)
    info = net.infos[0]  # (a sequence's first layer: the group itself has no row)
    assert tuple(got.shape[1:]) == info.out_shape
    assert info.params == sum(p.numel() for p in target.parameters())
    assert explain_layer(info.spec.type)


@pytest.mark.parametrize("case", sorted(CASES))
def test_block_trains_finite_gradients_everywhere(case: str) -> None:
    net = _net(CASES[case][0]).train()
    loss = F.cross_entropy(net(torch.randn(4, 4, 9, 9)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_inner_feature_maps_are_named_by_state_dict_path() -> None:
    entries = [
        {"conv": {"name": "stem", "filters": 4}},
        {"sequence": {"name": "layer1", "layers": [{"basic_block": {"filters": 6, "stride": 2}}]}},
    ]
    net = _net(entries)
    x = torch.randn(1, 4, 9, 9)
    plain = net.feature_maps(x)
    assert [n for n, _ in plain] == ["stem", "layer1.0", "flatten1", "dense1"]
    inner = dict(net.feature_maps(x, inner=True))
    assert [i.name for i in net.all_infos()] == list(inner)
    assert "layer1.0.conv1" in inner and "layer1.0.downsample.1" in inner
    torch.testing.assert_close(inner["layer1.0"], dict(plain)["layer1.0"])
    keys = {k.removeprefix("layers.").rsplit(".", 1)[0] for k in net.state_dict()}
    assert {"layer1.0.conv1", "layer1.0.bn2", "layer1.0.downsample.0"} <= keys
    block = net.infos[1]
    assert block.params == sum(i.params for i in block.inner)
    for info in net.all_infos():
        assert tuple(inner[info.name].shape[1:]) == info.out_shape, info.name
    assert net.layers["layer1.0"] is net.layers.layer1[0]  # dotted names reach into groups


def test_architecture_round_trips_with_names_and_nesting() -> None:
    entries = [
        {"sequence": {"name": "features", "layers": [{"inverted_residual": {"filters": 4}}]}}
    ]
    net = _net(entries)
    again = build_network(parse_layers(net.architecture()), 3, 4, 9)
    assert again.infos == net.infos
    assert again.state_dict().keys() == net.state_dict().keys()


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            [{"conv": {"filters": 6, "groups": 4}}],
            "layer 1 (conv): groups: 4 groups must divide both the 4 input maps and the 6 filters",
        ),
        (
            [{"residual": {"layers": [{"conv": {"filters": 8}}], "shortcut": "identity"}}],
            "layer 1 (residual): shortcut: identity needs the main path to keep the input shape "
            "(4, 9, 9), it gives (8, 9, 9); use shortcut: projection",
        ),
        (
            [{"sequence": {"layers": [{"conv": {"filters": 0}}]}}],
            "layer 1 (sequence): layer 1 (conv): filters: expected a positive integer, got 0",
        ),
        (
            [{"basic_block": {"filters": 4, "shortcut": "maybe"}}],
            "layer 1 (basic_block): shortcut: expected one of auto, identity, projection, none, "
            "got 'maybe'",
        ),
        (
            [{"inverted_residual": {"filters": 4, "kernel": 4}}],
            "layer 1 (inverted_residual): kernel: expected an odd size, got 4",
        ),
        (
            [{"relu": {"name": "a.b"}}],
            "layer 1 (relu): name: expected letters, digits and underscores (not a "
            "torch.nn.Module attribute), got 'a.b'",
        ),
        (
            [{"relu": {"name": "x"}}, {"relu": {"name": "x"}}],
            "layer 2 (relu): name: 'x' is already taken",
        ),
        (
            [{"relu": {"name": "forward"}}],
            "layer 1 (relu): name: expected letters, digits and underscores (not a "
            "torch.nn.Module attribute), got 'forward'",
        ),
    ],
)
def test_block_errors_name_layer_field_and_value(entries: list, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_network(parse_layers(entries), 3, 4, 9)
    assert str(info.value) == message


def test_grad_cam_reaches_a_layer_inside_a_group() -> None:
    from cnnkit.inspection.gradcam import grad_cam

    entries = [
        {"sequence": {"name": "stem", "layers": [{"conv": {"filters": 4}}, "relu"]}},
        {"basic_block": {"name": "block", "filters": 4}},
    ]
    net = _net(entries)
    x = torch.randn(1, 4, 9, 9)
    heat, chosen = grad_cam(net, x, layer="stem.1")
    assert heat.shape == (9, 9) and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    assert chosen == int(net(x)[0].argmax())
    # The reference: the class score's gradient with respect to stem.1's maps, by autograd.
    maps = net.layers["stem.1"](net.layers["stem.0"](x)).detach().requires_grad_(True)
    score = net.forward_head(net.layers["block"](maps))[0, chosen]
    (grads,) = torch.autograd.grad(score, maps)
    cam = F.relu((grads.mean((2, 3), keepdim=True) * maps).sum(1))[0].detach()
    torch.testing.assert_close(torch.from_numpy(heat), cam / cam.max(), rtol=1e-4, atol=1e-5)
