"""Blocks: one layer entry in the YAML with its own sub-layers (see ``layer_base``).

- ``sequence``: a named group of layers (``nn.Sequential``; its layers are named 0, 1, ...
  unless named). It is transparent: its layers stand in its place in ``infos``, named by
  their path (``features.3``), so the state-dict keys match the network it mirrors.
- ``residual``: ``activation(layers(x) + shortcut(x))``. The shortcut is ``identity``,
  ``projection`` (a 1x1 convolution at the main path's stride and a batchnorm, named
  ``downsample`` as in torchvision), ``none`` (no addition) or ``auto`` (identity when the
  main path keeps the shape, else projection).
- ``basic_block`` and ``bottleneck``: ResNet's residual blocks (torchvision's layout:
  ``conv1``, ``bn1``, ..., ``downsample.0``/``.1``).
- ``inverted_residual``: MobileNetV2's block (expand 1x1, depthwise kxk, project 1x1, added to
  its input when the shape allows; torchvision's layout ``conv.0.0``, ``conv.0.1``, ...).

A block is one row of ``infos``; its sub-layers are in ``LayerInfo.inner`` and their outputs
in ``Network.feature_maps(x, inner=True)``. The named blocks expand into a ``residual`` with
named sub-layers, so adding another block is one record with an ``expand`` method.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.models import layer_types as _layer_types  # noqa: F401  (the layers blocks use)
from cnnkit.models.layer_base import (
    Fields,
    Inferred,
    LayerInfo,
    LayerSpec,
    LayerType,
    build_modules,
    infer_list,
    parse_entry,
    parse_list,
    register,
)

__all__ = ["Residual"]

SHORTCUTS = ("auto", "identity", "projection", "none")
ACTIVATIONS = {"relu": nn.functional.relu, "relu6": nn.functional.relu6, "gelu": nn.functional.gelu}


@register
class SequenceType(LayerType):
    kind = "sequence"
    aliases = ("group",)
    fields: ClassVar[dict[str, Any]] = {"layers": ...}
    explain = "A named group of layers, run one after the other."

    def check(self, f: Fields) -> None:
        f["layers"] = tuple(parse_list(f["layers"], f.where))

    def flatten(self, spec: LayerSpec, shape, where: str, path: str) -> list[LayerInfo]:
        """The group's layers in its place, named ``path.0``, ``path.1``, ... (or by name)."""
        return infer_list(spec.params["layers"], shape, where, path, by_index=True)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A residual block resolved for one input shape."""

    main: list[LayerInfo]  # the main path's layers, in order
    projection: list[LayerInfo]  # the shortcut's layers (``downsample.*``), if any
    shortcut: str  # identity, projection or none
    activation: str | None  # applied after the addition
    out: tuple[int, ...]


class _ResidualBase(LayerType):
    needs_maps = True

    def parts(self, spec: LayerSpec, shape, where: str) -> tuple[list[LayerSpec], str, str | None]:
        """(main path layers, shortcut, activation after the addition)."""
        raise NotImplementedError

    def plan(self, spec: LayerSpec, shape, where: str, path: str) -> Plan:
        layers, shortcut, activation = self.parts(spec, shape, where)
        main = infer_list(layers, shape, where, path)
        out = main[-1].out_shape
        if shortcut == "auto":
            shortcut = "identity" if out == tuple(shape) else "projection"
        projection: list[LayerInfo] = []
        if shortcut == "identity" and out != tuple(shape):
            raise ConfigError(
                f"{where}: shortcut: identity needs the main path to keep the input shape "
                f"{tuple(shape)}, it gives {out}; use shortcut: projection"
            )
        if shortcut == "projection":
            if len(out) != 3:
                raise ConfigError(f"{where}: shortcut: projection needs feature maps, got {out}")
            stride = math.ceil(shape[1] / out[1])
            if ((shape[1] - 1) // stride + 1, (shape[2] - 1) // stride + 1) != out[1:]:
                raise ConfigError(
                    f"{where}: shortcut: a 1x1 projection cannot turn {tuple(shape)} into {out}"
                )
            conv = {"conv": {"filters": out[0], "kernel": 1, "stride": stride, "bias": False}}
            specs = [parse_entry(where, conv), parse_entry(where, {"batchnorm": {}})]
            projection = infer_list(specs, shape, f"{where}: shortcut", f"{path}.downsample", True)
        return Plan(main, projection, shortcut, activation, out)

    def infer(self, spec: LayerSpec, shape, where: str, path: str) -> Inferred:
        plan = self.plan(spec, shape, where, path)
        inner = plan.main + plan.projection
        flops = sum(i.flops for i in inner)
        flops += math.prod(plan.out) * ((plan.shortcut != "none") + (plan.activation is not None))
        return Inferred(plan.out, sum(i.params for i in inner), flops, tuple(inner))

    def build(self, info: LayerInfo) -> nn.Module:
        plan = self.plan(info.spec, info.in_shape, "", info.name)
        return Residual(plan, info.name)


class Residual(nn.Module):
    """``activation(main(x) + shortcut(x))``: the main path's modules sit at their names
    (``conv1``, ``conv.0.0``), the projection at ``downsample``."""

    def __init__(self, plan: Plan, path: str) -> None:
        super().__init__()
        build_modules(plan.main + plan.projection, self, prefix=f"{path}.")
        self.main = [info.name.removeprefix(f"{path}.") for info in plan.main]
        self.shortcut = plan.shortcut
        self.activation = plan.activation

    def _finish(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.shortcut == "identity":
            y = y + x
        elif self.shortcut == "projection":
            y = y + self.downsample(x)
        return ACTIVATIONS[self.activation](y) if self.activation else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for name in self.main:
            y = self.get_submodule(name)(y)
        return self._finish(x, y)

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
        """The output and every sub-layer's output, named by module path (``conv1``)."""
        out, y = [], x
        for name in self.main:
            y = self.get_submodule(name)(y)
            out.append((name, y))
        if self.shortcut == "projection":
            s = x
            for name, module in self.downsample.named_children():
                s = module(s)
                out.append((f"downsample.{name}", s))
        return self._finish(x, y), out

    def extra_repr(self) -> str:
        return f"shortcut={self.shortcut}, activation={self.activation}"


@register
class ResidualType(_ResidualBase):
    kind = "residual"
    fields: ClassVar[dict[str, Any]] = {"layers": ..., "shortcut": "auto", "activation": None}
    explain = (
        "A residual block adds its input (the shortcut) to what its layers compute, so the "
        "layers learn a correction to the input; very deep networks train well this way."
    )

    def check(self, f: Fields) -> None:
        f["layers"] = tuple(parse_list(f["layers"], f.where))
        f.choice("shortcut", SHORTCUTS)
        if f["activation"] is not None:
            f.choice("activation", tuple(ACTIVATIONS))

    def parts(self, spec, shape, where):
        p = spec.params
        return list(p["layers"]), p["shortcut"], p["activation"]


def _layers(where: str, entries: list[Any]) -> list[LayerSpec]:
    return [parse_entry(where, entry) for entry in entries]


def _bn(name: str | None, p: dict[str, Any] | None = None) -> dict[str, Any]:
    """A batchnorm entry (eps and momentum from ``p`` when given)."""
    named = {"name": name} if name is not None else {}
    p = p or {}
    return {"batchnorm": {**named, "eps": p.get("eps", 1e-5), "momentum": p.get("momentum", 0.1)}}


def _conv(name: str | None, filters: int, kernel: int, stride: int = 1, **more: Any) -> Any:
    """A convolution entry without bias (a batchnorm follows it)."""
    named = {"name": name} if name is not None else {}
    fields = {"filters": filters, "kernel": kernel, "stride": stride, "bias": False}
    return {"conv": {**named, **fields, **more}}


@register
class BasicBlock(_ResidualBase):
    kind = "basic_block"
    fields: ClassVar[dict[str, Any]] = {"filters": ..., "stride": 1, "shortcut": "auto"}
    explain = (
        "A ResNet basic block: two 3x3 convolutions with batchnorm, added to the block's "
        "input (through a 1x1 convolution when the shape changes), then ReLU."
    )

    def check(self, f: Fields) -> None:
        f.int("filters")
        f.int("stride")
        f.choice("shortcut", SHORTCUTS)

    def parts(self, spec, shape, where):
        p = spec.params
        layers = [
            _conv("conv1", p["filters"], 3, p["stride"], padding=1),
            _bn("bn1"),
            {"relu": {"name": "relu"}},
            _conv("conv2", p["filters"], 3, padding=1),
            _bn("bn2"),
        ]
        return _layers(where, layers), p["shortcut"], "relu"


@register
class Bottleneck(_ResidualBase):
    kind = "bottleneck"
    fields: ClassVar[dict[str, Any]] = {
        "filters": ...,  # the inner width; the block outputs filters * expansion maps
        "stride": 1,
        "expansion": 4,
        "groups": 1,
        "width": None,  # the 3x3 convolution's maps (default: filters)
        "shortcut": "auto",
    }
    explain = (
        "A ResNet bottleneck block: a 1x1 convolution narrows the maps, a 3x3 convolution "
        "works on the narrow maps, a 1x1 convolution widens them again; the result is added "
        "to the block's input (through a 1x1 convolution when the shape changes), then ReLU."
    )

    def check(self, f: Fields) -> None:
        for name in ("filters", "stride", "expansion", "groups"):
            f.int(name)
        if f["width"] is not None:
            f.int("width")
        f.choice("shortcut", SHORTCUTS)

    def parts(self, spec, shape, where):
        p = spec.params
        width = p["width"] or p["filters"]
        layers = [
            _conv("conv1", width, 1),
            _bn("bn1"),
            {"relu": {"name": "relu1"}},
            _conv("conv2", width, 3, p["stride"], padding=1, groups=p["groups"]),
            _bn("bn2"),
            {"relu": {"name": "relu2"}},
            _conv("conv3", p["filters"] * p["expansion"], 1),
            _bn("bn3"),
        ]
        return _layers(where, layers), p["shortcut"], "relu"


@register
class InvertedResidual(_ResidualBase):
    kind = "inverted_residual"
    fields: ClassVar[dict[str, Any]] = {
        "filters": ...,
        "expand": 6,  # the depthwise convolution works on input maps x expand
        "kernel": 3,
        "stride": 1,
        "activation": "relu6",
        "padding": "same",  # or tf_same (networks ported from TensorFlow)
        "eps": 1e-5,  # batchnorm's
        "momentum": 0.1,
    }
    explain = (
        "An inverted residual block (MobileNetV2): a 1x1 convolution widens the maps, a "
        "depthwise convolution filters each map on its own, a 1x1 convolution narrows them "
        "again; when the shape allows, the block's input is added to the result."
    )

    def check(self, f: Fields) -> None:
        for name in ("filters", "expand", "stride"):
            f.int(name)
        if f.int("kernel") % 2 == 0:
            raise f.fail("kernel", f"expected an odd size, got {f['kernel']}")
        f.choice("activation", ("relu", "relu6"))
        f.choice("padding", ("same", "tf_same"))
        for name in ("momentum", "eps"):
            f.number(name, "a number between 0 and 1", lambda v: 0 < v < 1)

    def parts(self, spec, shape, where):
        p = spec.params
        hidden = shape[0] * p["expand"]
        act = p["activation"]
        # torchvision's layout: conv = [[expand, bn, act]], [depthwise, bn, act], project, bn
        stages = []
        if p["expand"] != 1:
            stages.append({"sequence": {"layers": [_conv(None, hidden, 1), _bn(None, p), act]}})
        depthwise = _conv(
            None, hidden, p["kernel"], p["stride"], padding=p["padding"], groups="depthwise"
        )
        stages.append({"sequence": {"layers": [depthwise, _bn(None, p), act]}})
        stages += [_conv(None, p["filters"], 1), _bn(None, p)]
        layers = _layers(where, [{"sequence": {"name": "conv", "layers": stages}}])
        keeps = p["stride"] == 1 and shape[0] == p["filters"]
        return layers, "identity" if keeps else "none", None
