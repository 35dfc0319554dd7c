"""The single layers of the learning material, one record each (see ``layer_base``).

Initialisation (the learning material's "random Gaussian"): conv kernels and dense weights are
drawn from a normal distribution with mean 0 and standard deviation ``sqrt(2 / fan_in)`` (He
initialisation, which keeps the signal's scale through ReLU layers), where ``fan_in`` is
``in_channels * kernel * kernel`` for a conv and ``in_features`` for a dense layer. Biases
start at 0; batchnorm at scale 1, shift 0.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.models.layer_base import Fields, Inferred, LayerInfo, LayerSpec, LayerType, register

__all__ = ["GlobalAvgPool", "GlobalMaxPool", "Scale", "TFSameConv2d"]


def _windows(where: str, shape: tuple[int, ...], k: int, s: int, pad: int, what: str):
    """(C, H', W') of a k x k window at stride s over padded (C, H, W) maps."""
    c, h, w = shape
    ho, wo = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    if ho < 1 or wo < 1:
        raise ConfigError(
            f"{where}: a {k}x{k} {what} does not fit the {h}x{w} input; use a larger image "
            "size or fewer layers"
        )
    return c, ho, wo


# ------------------------------------------------------------------------ convolution


class TFSameConv2d(nn.Conv2d):
    """A convolution padded as TensorFlow's ``SAME``: output side ``ceil(side / stride)``,
    the odd pixel of padding at the bottom and right. Networks ported from TensorFlow
    (EfficientNet-Lite) need it to give the same outputs; the padding is fixed for the input
    size the network was built for."""

    def __init__(self, *args: Any, pads: tuple[int, int, int, int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pads = pads  # (left, right, top, bottom), as F.pad takes them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, self.pads))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tf_same_pads={self.pads}"


def _tf_same(side: int, k: int, s: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow's SAME along one side."""
    total = max((math.ceil(side / s) - 1) * s + k - side, 0)
    return total // 2, total - total // 2


@register
class Conv(LayerType):
    kind = "conv"
    aliases = ("conv2d",)
    fields: ClassVar[dict[str, Any]] = {
        "filters": ...,
        "kernel": 3,
        "stride": 1,
        "padding": "same",
        "bias": True,
        "groups": 1,  # N: N independent convolutions over C/N maps each; depthwise: one per map
    }
    needs_maps = True
    explain = (
        "A convolution slides each of its kernels over all the input maps and writes one "
        "weighted sum per position: one new feature map per kernel."
    )

    def check(self, f: Fields) -> None:
        f.int("filters")
        k = f.int("kernel")
        f.int("stride")
        if f["padding"] == "same":
            if k % 2 == 0:
                raise f.fail("padding", f"'same' needs an odd kernel, got kernel {k}")
            f["padding"] = k // 2
        elif f["padding"] == "valid":
            f["padding"] = 0
        elif f["padding"] != "tf_same":
            f.int("padding", lo=0)
        f.bool("bias")
        if f["groups"] != "depthwise":
            f.int("groups")

    def groups(self, spec: LayerSpec, c: int, where: str) -> int:
        p = spec.params
        g = c if p["groups"] == "depthwise" else p["groups"]
        if c % g or p["filters"] % g:
            raise ConfigError(
                f"{where}: groups: {g} groups must divide both the {c} input maps and the "
                f"{p['filters']} filters"
            )
        return g

    def infer(self, spec: LayerSpec, shape, where, path) -> Inferred:
        p = spec.params
        c, h, w = shape
        k, s, filters = p["kernel"], p["stride"], p["filters"]
        g = self.groups(spec, c, where)
        if p["padding"] == "tf_same":
            ho, wo = math.ceil(h / s), math.ceil(w / s)
        else:
            _, ho, wo = _windows(where, shape, k, s, p["padding"], "kernel")
        params = filters * (c // g) * k * k + (filters if p["bias"] else 0)
        return Inferred((filters, ho, wo), params, 2 * (c // g) * k * k * filters * ho * wo)

    def build(self, info: LayerInfo) -> nn.Module:
        p, (c, h, w) = info.spec.params, info.in_shape
        k, s = p["kernel"], p["stride"]
        g = self.groups(info.spec, c, "")
        args = (c, p["filters"], k, s)
        if p["padding"] != "tf_same":
            conv = nn.Conv2d(*args, p["padding"], groups=g, bias=p["bias"])
        else:
            (left, right), (top, bottom) = _tf_same(w, k, s), _tf_same(h, k, s)
            if left == right == top == bottom:  # symmetric: a plain padded convolution
                conv = nn.Conv2d(*args, left, groups=g, bias=p["bias"])
            else:
                conv = TFSameConv2d(
                    *args, groups=g, bias=p["bias"], pads=(left, right, top, bottom)
                )
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (c // g * k * k)))
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        return conv


# ------------------------------------------------------------------------ activations


@register
class ReLU(LayerType):
    kind = "relu"
    explain = "ReLU (rectified linear unit) sets every negative value to 0."

    def build(self, info: LayerInfo) -> nn.Module:
        return nn.ReLU()


@register
class GELU(LayerType):
    kind = "gelu"
    explain = "GELU is a smooth ReLU: large negative values become 0, small ones are damped."

    def build(self, info: LayerInfo) -> nn.Module:
        return nn.GELU()


# ------------------------------------------------------------------------ pooling


class _Pool(LayerType):
    fields: ClassVar[dict[str, Any]] = {"kernel": 2, "stride": None, "padding": 0}
    needs_maps = True
    module: type[nn.Module]

    def check(self, f: Fields) -> None:
        k = f.int("kernel")
        if f["stride"] is None:
            f["stride"] = k
        f.int("stride")
        f.int("padding", lo=0)
        if f["padding"] * 2 > k:
            raise f.fail("padding", f"at most half the kernel ({k // 2}), got {f['padding']}")

    def infer(self, spec, shape, where, path) -> Inferred:
        p = spec.params
        k = p["kernel"]
        out = _windows(where, shape, k, p["stride"], p["padding"], "window")
        return Inferred(out, 0, math.prod(out) * k * k)

    def build(self, info: LayerInfo) -> nn.Module:
        p = info.spec.params
        return self.module(p["kernel"], p["stride"], p["padding"])


@register
class MaxPool(_Pool):
    kind = "maxpool"
    aliases = ("pool", "maxpool2d")
    module = nn.MaxPool2d
    explain = (
        "Max pooling keeps only the largest value of each window: fewer values, the "
        "strongest features stay."
    )


@register
class AvgPool(_Pool):
    kind = "avgpool"
    module = nn.AvgPool2d
    explain = "Average pooling keeps the mean of each window: fewer values, smoothed."


class GlobalAvgPool(nn.Module):
    """(B, C, H, W) -> (B, C): the mean of each feature map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class GlobalMaxPool(nn.Module):
    """(B, C, H, W) -> (B, C): the largest value of each feature map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3))


class _GlobalPool(LayerType):
    needs_maps = True
    module: type[nn.Module]

    def infer(self, spec, shape, where, path) -> Inferred:
        return Inferred((shape[0],), 0, math.prod(shape))

    def build(self, info: LayerInfo) -> nn.Module:
        return self.module()


@register
class GAP(_GlobalPool):
    kind = "gap"  # global average pooling: (C, H, W) -> (C,)
    aliases = ("global_avgpool",)
    module = GlobalAvgPool
    explain = "Global average pooling reduces each feature map to its mean: one number per map."


@register
class GMP(_GlobalPool):
    kind = "gmp"  # global max pooling: (C, H, W) -> (C,), "is this feature anywhere?"
    aliases = ("global_maxpool",)
    module = GlobalMaxPool
    explain = (
        "Global max pooling reduces each feature map to its largest value: one number per "
        "map (is this feature anywhere in the image?)."
    )


# ------------------------------------------------------------------------ regularisation


class _Dropout(LayerType):
    module: type[nn.Module]

    def check(self, f: Fields) -> None:
        f["rate"] = f.number("rate", "a number from 0 to below 1", lambda v: 0 <= v < 1)

    def build(self, info: LayerInfo) -> nn.Module:
        return self.module(info.spec.params["rate"])


@register
class Dropout2d(_Dropout):
    kind = "dropout2d"
    fields: ClassVar[dict[str, Any]] = {"rate": 0.2}
    needs_maps = True
    module = nn.Dropout2d
    explain = (
        "Dropout randomly drops whole feature maps while training to prevent overfitting. "
        "When the model predicts (eval mode) it is the identity: these maps equal the layer "
        "before."
    )


@register
class Dropout(_Dropout):
    kind = "dropout"
    fields: ClassVar[dict[str, Any]] = {"rate": 0.5}
    module = nn.Dropout
    explain = (
        "Dropout randomly drops values while training to prevent overfitting. When the model "
        "predicts (eval mode) it is the identity: its output equals its input."
    )


@register
class BatchNorm(LayerType):
    kind = "batchnorm"
    aliases = ("batchnorm2d", "bn")
    # scale: learn the gain
    fields: ClassVar[dict[str, Any]] = {"momentum": 0.1, "eps": 1e-5, "scale": True}
    needs_maps = True
    explain = (
        "Batch normalisation rescales each map with the mean and variance learnt in "
        "training, so the next layer sees values in a steady range."
    )

    def check(self, f: Fields) -> None:
        f.bool("scale")
        for name in ("momentum", "eps"):
            f.number(name, "a number between 0 and 1", lambda v: 0 < v < 1)

    def infer(self, spec, shape, where, path) -> Inferred:
        return Inferred(shape, 2 * shape[0], 2 * math.prod(shape))

    def build(self, info: LayerInfo) -> nn.Module:
        p = info.spec.params
        norm = nn.BatchNorm2d(info.in_shape[0], eps=p["eps"], momentum=p["momentum"])
        norm.weight.requires_grad_(p["scale"])  # scale false: the gain stays 1
        return norm


# ------------------------------------------------------------------------ head


@register
class Flatten(LayerType):
    kind = "flatten"
    explain = "Flattening lays the feature maps out as one vector for the fully connected layers."

    def infer(self, spec, shape, where, path) -> Inferred:
        return Inferred((math.prod(shape),), 0, 0)

    def build(self, info: LayerInfo) -> nn.Module:
        return nn.Flatten()


@register
class Dense(LayerType):
    kind = "dense"
    aliases = ("linear", "fc")
    fields: ClassVar[dict[str, Any]] = {"units": None}
    explain = "A fully connected layer: every output is a weighted sum of all inputs."

    def check(self, f: Fields) -> None:
        if f["units"] is not None:
            f.int("units")

    def infer(self, spec, shape, where, path) -> Inferred:
        if len(shape) != 1:
            raise ConfigError(
                f"{where}: needs a vector as input; put a flatten or gap layer before it "
                f"(input is {shape})"
            )
        units = spec.params["units"]
        if units is None:
            raise ConfigError(f"{where}: units: required except on the last dense layer")
        return Inferred((units,), shape[0] * units + units, 2 * shape[0] * units)

    def build(self, info: LayerInfo) -> nn.Module:
        n = info.in_shape[0]
        dense = nn.Linear(n, info.spec.params["units"])
        nn.init.normal_(dense.weight, 0.0, math.sqrt(2.0 / n))
        nn.init.zeros_(dense.bias)
        return dense


class Scale(nn.Module):
    """Multiply by a constant (a fixed temperature on the logits)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


@register
class ScaleType(LayerType):
    kind = "scale"
    # multiply by a constant: tempers the logits of a fast model
    fields: ClassVar[dict[str, Any]] = {"factor": 1.0}
    explain = "Multiplies every value by a constant (it tempers the class scores)."

    def check(self, f: Fields) -> None:
        f.number("factor", "a positive number", lambda v: v > 0)

    def build(self, info: LayerInfo) -> nn.Module:
        return Scale(info.spec.params["factor"])


# ------------------------------------------------------------------------ for backbones


@register
class ReLU6(LayerType):
    kind = "relu6"
    explain = (
        "ReLU6 sets every negative value to 0 and caps values at 6 (MobileNet's activation: "
        "a bounded range suits low-precision arithmetic)."
    )

    def build(self, info: LayerInfo) -> nn.Module:
        return nn.ReLU6()
