"""``explain_pixel``: the arithmetic behind any value equals the network's own forward pass.

Every rule is checked the micrograd way: its float64 arithmetic against the float32 feature
maps PyTorch computes (``Network.feature_maps``), at every position of small maps, for every
layer type that has a rule; and the learning material's worked example gives its 155.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.errors import ConfigError
from cnnkit.inference import load
from cnnkit.inspection.explain import MATERIAL_IMAGE, MATERIAL_KERNEL
from cnnkit.inspection.maps import layer_outputs
from cnnkit.inspection.pixel import (
    NoPixelRule,
    cpu_classifier,
    explain_pixel,
    explain_value,
    render_pixel,
)
from cnnkit.inspection.pixel_rules import PIXEL_RULES
from cnnkit.model_io import save_model
from cnnkit.models.layers import LayerSpec, parse_layers, with_head
from cnnkit.models.network import Network
from conftest import model_meta

# Three networks that together hold every layer type with a rule, in unusual settings:
# padded and strided pooling, an even valid kernel with stride 2, a hidden dense + ReLU,
# a tempered head (scale after the last dense), frozen whitening, both global poolings.
NETWORKS = {
    "maps": [
        {"conv": {"filters": 4, "kernel": 3}},
        "batchnorm",
        "relu",
        {"maxpool": {"kernel": 3, "stride": 2, "padding": 1}},
        {"conv": {"filters": 3, "kernel": 2, "padding": "valid", "stride": 2}},
        "gelu",
        {"avgpool": {"kernel": 3, "stride": 1, "padding": 1}},
        "dropout2d",
        {"scale": {"factor": 0.5}},
        "flatten",
        {"dense": {"units": 5}},
        "relu",
        "dropout",
        "dense",
    ],
    "whiten": [{"whiten": {"kernel": 2}}, "relu", {"conv": {"filters": 5, "kernel": 3}}, "gmp"],
    "gap": [
        {"conv": {"filters": 3, "kernel": 5, "padding": 2}},
        "gap",
        "dense",
        {"scale": {"factor": 0.25}},
    ],
    # backbones' blocks: TensorFlow's SAME with its odd pad after (kernel 4: 1 before, 2
    # after), ReLU6, residual blocks with identity, projection and no shortcut
    "blocks": [
        {"conv": {"filters": 8, "kernel": 4, "padding": "tf_same", "bias": False}},
        "batchnorm",
        "relu6",
        {"inverted_residual": {"filters": 8, "expand": 2}},
        {"inverted_residual": {"filters": 6, "expand": 2, "stride": 2, "padding": "tf_same"}},
        {"basic_block": {"filters": 6}},
        {"bottleneck": {"filters": 2, "stride": 2}},
        {
            "residual": {
                "layers": [{"conv": {"filters": 8, "kernel": 1}}, "gelu"],
                "shortcut": "identity",
                "activation": "relu",
            }
        },
        "gap",
    ],
}


def build(name: str, seed: int = 0) -> tuple[Network, torch.Tensor]:
    """The network with learnt-looking numbers everywhere (biases, batchnorm statistics)."""
    torch.manual_seed(seed)
    net = Network(with_head(parse_layers(NETWORKS[name]), 3), (3, 9, 9))
    x = torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.3, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
            elif isinstance(module, nn.Conv2d | nn.Linear) and module.bias is not None:
                module.bias.uniform_(-0.2, 0.2)
        if name == "whiten":
            net.layers["whiten1"].fit(torch.randn(8, 3, 9, 9))
    return net.eval(), x


def positions(shape: tuple[int, ...]) -> list[tuple[int, tuple[int, int] | None]]:
    if len(shape) == 1:
        return [(k, None) for k in range(shape[0])]
    return [(k, (y, x)) for k in range(shape[0]) for y in range(shape[1]) for x in range(shape[2])]


def test_the_networks_cover_every_rule() -> None:
    kinds = {info.spec.type for name in NETWORKS for info in build(name)[0].infos}
    assert kinds == set(PIXEL_RULES)  # a new rule needs a place in NETWORKS


@pytest.mark.parametrize("name", list(NETWORKS))
def test_every_value_equals_the_forward_pass(name: str) -> None:
    net, x = build(name)
    with torch.no_grad():
        maps = {n: t[0].double().numpy() for n, t in net.feature_maps(x)}  # float32 -> exact
    outputs = layer_outputs(net, x)  # the same forward pass for every position (speed)
    for index, info in enumerate(net.infos):
        for k, at in positions(info.out_shape):
            ex = explain_value(net, x, info.name, k, at, outputs=outputs)
            truth = maps[info.name][k] if at is None else maps[info.name][k][at]
            assert ex.model_value == truth
            assert abs(ex.value - truth) <= ex.tolerance, (info.name, k, at, ex.value, truth)
            assert ex.matches
            for step in ex.after:
                if step["type"] != "softmax":
                    assert step["value"] == pytest.approx(step["model_value"], rel=1e-5, abs=1e-6)
            if ex.activation not in (None, "softmax", info.name):
                later = maps[ex.activation][k] if at is None else maps[ex.activation][k][at]
                assert ex.post_activation == pytest.approx(later, rel=1e-5, abs=1e-6)
            if index == len(net.infos) - 1:  # the head: softmax of the logits
                probs = torch.softmax(torch.from_numpy(maps[info.name]), 0).numpy()
                assert ex.activation == "softmax"
                assert ex.post_activation == pytest.approx(probs[k], rel=1e-5)


def test_the_materials_worked_example() -> None:
    """The material's 6x6 image and kernel as a one-filter conv with zero padding 1."""
    net = Network(
        parse_layers([{"conv": {"filters": 1, "kernel": 3, "bias": False}}, "relu"]), (1, 6, 6)
    )
    with torch.no_grad():
        net.layers["conv1"].weight.copy_(torch.tensor(MATERIAL_KERNEL).view(1, 1, 3, 3))
    x = torch.tensor(MATERIAL_IMAGE, dtype=torch.float32).view(1, 1, 6, 6)
    ex = explain_value(net, x, "conv1", 0, (1, 1))
    assert ex.value == 155 and ex.model_value == 155
    assert ex.parts["patch"][0] == [[255, 255, 255], [255, 255, 100], [255, 100, 100]]
    assert ex.parts["products"][0] == [[255, -255, 255], [-255, 0, -100], [255, -100, 100]]
    assert ex.parts["bias"] == 0 and not ex.parts["has_bias"]
    assert (ex.pre_activation, ex.post_activation, ex.activation) == (155, 155, "relu1")
    assert ex.to_dict()["display_value"] == ex.display_value
    assert "= (255 x 1) + (255 x -1) + (255 x 1) +" in render_pixel(ex)
    right = explain_value(net, x, "conv1", 0, (1, 2))
    assert (right.pre_activation, right.post_activation) == (-155, 0)
    corner = explain_value(net, x, "conv1", 0, (0, 0))  # the kernel over the zero padding
    assert corner.parts["origin"] == [-1, -1]
    assert corner.parts["inside"] == [[False] * 3, [False, True, True], [False, True, True]]
    assert corner.parts["patch"][0][0] == [0, 0, 0]
    assert "Cells outside the image are the padding: 0" in render_pixel(corner)
    # the ReLU map drawn 0-255: its largest value, 310, is white; 155 is half way
    relu = explain_value(net, x, "relu1", 0, (1, 1))
    assert (relu.display_min, relu.display_max, relu.display_value) == (0, 310, 128)


def test_the_tolerance_catches_a_forgotten_bias(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32's tolerance is tight: an explanation that leaves out the bias fails it."""
    net, x = build("gap")
    rule = PIXEL_RULES["conv"]

    def without_bias(ctx):
        answer = rule(ctx)
        return dataclasses.replace(answer, value=answer.value - answer.parts["bias"])

    monkeypatch.setitem(PIXEL_RULES, "conv", without_bias)
    outputs = layer_outputs(net, x)
    checked = [explain_value(net, x, "conv1", k, (4, 4), outputs=outputs) for k in range(3)]
    assert all(abs(ex.parts["bias"]) > 1e-3 for ex in checked)
    assert not any(ex.matches for ex in checked)


def test_a_strided_dilated_grouped_conv() -> None:
    """The rule reads the module's own stride, padding, dilation and groups (a depthwise
    conv from another block type is explained right, not as a plain conv)."""
    net, x = build("gap")
    conv = nn.Conv2d(3, 3, 5, stride=2, padding=4, dilation=2, groups=3)
    net.layers["conv1"] = conv
    with torch.no_grad():
        maps = dict(net.feature_maps(x))
    out = maps["conv1"][0]
    assert out.shape[0] == 3
    outputs = layer_outputs(net, x)
    for k, at in positions(tuple(out.shape)):
        ex = explain_value(net, x, "conv1", k, at, outputs=outputs)
        assert ex.parts["input_channels"] == [k]
        assert abs(ex.value - float(out[k][at])) <= ex.tolerance


def test_every_value_inside_the_blocks_equals_the_forward_pass() -> None:
    net, x = build("blocks")
    with torch.no_grad():
        maps = {n: t[0].double().numpy() for n, t in net.feature_maps(x, inner=True)}
    outputs = layer_outputs(net, x)
    inner = [i for info in net.infos for i in info.inner]
    assert {i.spec.type for i in inner} >= {"conv", "batchnorm", "relu", "relu6", "gelu"}
    for info in inner:
        for k, at in positions(info.out_shape):
            ex = explain_value(net, x, info.name, k, at, outputs=outputs)
            assert ex.model_value == maps[info.name][k][at]
            assert ex.matches, (info.name, k, at, ex.value, ex.model_value)
            for step in ex.after:
                assert step["value"] == pytest.approx(step["model_value"], rel=1e-5, abs=1e-6)


def test_unknown_layer_types_are_refused_not_guessed() -> None:
    net, x = build("gap")
    info = net.infos[1]
    net.infos[1] = dataclasses.replace(info, spec=LayerSpec("attention", {}))
    with pytest.raises(
        NoPixelRule, match="layer gap1: no pixel explanation for layer type 'attention' yet"
    ):
        explain_value(net, x, "gap1", 0)


@pytest.mark.parametrize(
    ("layer", "k", "at", "message"),
    [
        (
            "conv9",
            0,
            (0, 0),
            "layer: unknown layer 'conv9', expected one of: conv1, gap1, dense1, scale1",
        ),
        ("conv1", 3, (0, 0), r"map: conv1 has 3 maps \(0 to 2\), got 3"),
        ("conv1", 0, None, r"at: conv1 outputs maps; give the \(row, column\)"),
        ("conv1", 0, (9, 0), r"at: \(9, 0\) is outside conv1's 9x9 maps \(rows 0 to 8"),
        ("dense1", 0, (0, 0), "at: dense1 outputs a vector of 3 values, not maps"),
        ("dense1", -1, None, r"map: dense1 has 3 values \(0 to 2\), got -1"),
    ],
)
def test_bad_positions_are_clear_errors(layer, k, at, message) -> None:
    net, x = build("gap")
    with pytest.raises(ConfigError, match=message):
        explain_value(net, x, layer, k, at)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run directory of an untrained net on 16x16 RGB, and an image for it."""
    torch.manual_seed(3)
    layers = with_head(parse_layers([{"conv": {"filters": 4, "kernel": 3}}, "relu", "maxpool"]), 3)
    net = Network(layers, (3, 16, 16))
    run = tmp_path_factory.mktemp("pixel") / "run"
    save_model(run, net, model_meta(net))
    image = run.parent / "image.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(image)
    return run, image


def test_explain_pixel_on_a_run_shows_the_images_own_pixels(saved_run) -> None:
    run, image = saved_run
    ex = explain_pixel(run, image, "conv1", 2, (0, 5))
    assert ex.matches
    pixels = np.asarray(Image.open(image))  # already 16x16: the model sees it as it is
    data = ex.to_dict()
    assert data["pixels"][0][0] == [None, None, None]  # row -1: padding
    assert data["pixels"][1][1] == [float(v) for v in pixels[0, 4:7, 1]]  # green, row 0
    mean, std = data["normalisation"]["mean"][1], data["normalisation"]["std"][1]
    expected = (pixels[0, 4:7, 1] / 255 - mean) / std
    np.testing.assert_allclose(data["patch"][1][1], expected, rtol=1e-6)
    for key in ("products", "bias", "pre_activation", "post_activation", "display_value"):
        assert key in data
    assert np.asarray(data["products"]).shape == (3, 3, 3)  # input channel, row, column
    json.dumps(data, allow_nan=False)  # plain JSON, as the web endpoint sends it
    head = explain_pixel(run, image, "dense1", 1)
    assert head.label == "b" and head.activation == "softmax"
    assert head.parts["contributions"][0]["source"][0] in range(4)  # (map, row, column)


def test_a_gpu_classifier_is_explained_on_a_cpu_copy(saved_run, monkeypatch) -> None:
    """A GPU's convolutions may use TF32: explanations run a float32 copy on the CPU."""
    run, image = saved_run
    classifier = load(run, device="cpu", precision="fp32")
    assert cpu_classifier(classifier) is classifier
    monkeypatch.setattr(classifier, "device", torch.device("cuda"))  # as if loaded on a GPU
    copy = cpu_classifier(classifier)
    assert copy is not classifier and copy.device.type == "cpu" and copy.precision == "fp32"
    assert copy.model is not classifier.model
    for a, b in zip(copy.model.parameters(), classifier.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert explain_pixel(classifier, image, "conv1", 0, (1, 1)).matches


runner = CliRunner()


def test_cli_explain_pixel(saved_run) -> None:
    run, image = saved_run
    args = [
        "explain",
        "pixel",
        str(run),
        str(image),
        "--layer",
        "conv1",
        "--map",
        "1",
        "--at",
        "3,4",
    ]
    text = runner.invoke(app, args)
    assert text.exit_code == 0, text.output
    assert text.stdout.startswith("conv1 (conv), map 1, row 3, column 4:")
    assert "the model's own forward pass" in text.stdout and "0-255 display scale" in text.stdout
    data = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    ex = explain_pixel(run, image, "conv1", 1, (3, 4))
    assert data["pre_activation"] == ex.pre_activation and data["at"] == [3, 4]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--layer", "conv1", "--at", "3;4"],
            "error: --at: expected ROW,COLUMN such as 5,7, got '3;4'",
        ),
        (["--layer", "conv7", "--at", "3,4"], "error: --layer: unknown layer 'conv7'"),
        (["--layer", "conv1", "--map", "9", "--at", "3,4"], "error: --map: conv1 has 4 maps"),
        (["--layer", "conv1"], "error: --at: conv1 outputs maps"),
    ],
)
def test_cli_explain_pixel_errors_are_one_line(saved_run, extra, message) -> None:
    run, image = saved_run
    result = runner.invoke(app, ["explain", "pixel", str(run), str(image), *extra])
    assert result.exit_code == 1
    assert result.output.startswith(message) and result.output.count("\n") == 1
