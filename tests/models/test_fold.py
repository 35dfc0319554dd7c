"""``models.fold``: batchnorm folded into convolutions, activations fused, bf16 copies.

The folded network is compared with the network it came from (micrograd's way: the same
input through the code under test and through a trusted reference, here the unfolded
network in eval mode). Tolerances follow the arithmetic: folding multiplies each filter by
batchnorm's scale before the sum instead of after it, a reordering that moves a float32
result by a few units in the last place of the values summed (about 1e-6 of the output's
range here); bf16 keeps 8 significant bits (relative error 2^-9 per rounding) over some 20
layers, so 5% of the range bounds it with room.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnkit.models import build_network, load_model_spec
from cnnkit.models import fold as fold_mod
from cnnkit.models.fold import FusedConv2d, fold_batchnorm, inference_copy
from cnnkit.models.layers import parse_layers

BACKBONES = ["efficientnet_lite0", "mobilenet_v2", "resnet18", "resnet50"]


def _with_statistics(net: nn.Module, seed: int = 0) -> nn.Module:
    """``net`` with batchnorm statistics and affine parameters far from their initial 0/1,
    so that folding them in wrongly could not go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return net.eval()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", BACKBONES)
def test_folding_gives_the_networks_outputs(name: str) -> None:
    net = _with_statistics(build_network(load_model_spec(name).layers, 5, 3, 32))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batchnorm(net)
    fused = inference_copy(net, torch.device("cpu"), "fp32")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = net(x)
        assert _relative(folded(x), reference) < 2e-5
        assert _relative(fused(x), reference) < 2e-5
    # every batchnorm right after a convolution is gone from the copies, none from the original
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, FusedConv2d) for m in fused.modules())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad for p in fused.parameters())


def test_a_batchnorm_that_follows_no_convolution_stays_and_counts() -> None:
    layers = parse_layers(
        [{"conv": {"filters": 4, "bias": True}}, "maxpool", "batchnorm", "relu6",
         {"conv": {"filters": 6, "groups": 2}}, "batchnorm", "relu"]
    )  # fmt: skip
    net = _with_statistics(build_network(layers, 3, 2, 8))
    fast = inference_copy(net, torch.device("cpu"), "fp32")
    kept = [m for m in fast.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(kept) == 1  # after the max pooling: a negative scale would not commute with it
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        assert _relative(fast(x), net(x)) < 2e-5


def test_without_onednn_the_fused_layers_compute_the_same(monkeypatch) -> None:
    net = _with_statistics(build_network(load_model_spec("mobilenet_v2").layers, 4, 3, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fast = inference_copy(net, torch.device("cpu"), "fp32")(x)
        monkeypatch.setattr(fold_mod, "_onednn_fusion", lambda dtype=None: False)
        plain = inference_copy(net, torch.device("cpu"), "fp32")(x)
        reference = net(x)
    assert _relative(plain, reference) < 2e-5
    assert _relative(fast, reference) < 2e-5


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_the_bf16_copy_stays_within_bf16_rounding(name: str) -> None:
    net = _with_statistics(build_network(load_model_spec(name).layers, 5, 3, 32))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    fast = inference_copy(net, torch.device("cpu"), "bf16")
    with torch.no_grad():
        got = fast(x)
        assert got.dtype == torch.float32  # inputs and outputs stay float32
        assert _relative(got, net(x)) < 5e-2
        # the pooled features (what a frozen backbone hands the head) too
        stop = net.head_start + 1
        assert _relative(fast.run_layers(x, 0, stop), net.run_layers(x, 0, stop)) < 5e-2
