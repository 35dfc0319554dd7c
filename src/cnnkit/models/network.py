"""``Network``: a CNN built from a validated layer list, with one interface for every tool.

Like timm's models it exposes ``forward_features`` (the convolutional part, up to the flatten
or global pooling) and ``forward_head`` (flatten and dense layers to class scores), plus
``feature_maps`` that returns every layer's output for inspection.

The modules sit at their layers' names under ``layers``: ``layers.conv1``, or for a network
with named groups (``sequence``) ``layers.features.3``. So a state-dict key is ``layers.`` and
then the layer's name and the parameter's name, exactly as in the network the names were
taken from (torchvision's ``layer1.0.conv1.weight`` is ``layers.layer1.0.conv1.weight``).
How each module is made and initialised is its layer type's business (``layer_types``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from cnnkit.models.layer_base import LayerInfo, LayerSpec, build_modules
from cnnkit.models.layer_types import GlobalAvgPool, GlobalMaxPool, Scale
from cnnkit.models.layers import infer_shapes
from cnnkit.models.whiten import Whiten

__all__ = ["GlobalAvgPool", "GlobalMaxPool", "LayerDict", "Network", "Scale", "Whiten"]


class LayerDict(nn.ModuleDict):
    """``nn.ModuleDict`` whose ``[name]`` also takes a dotted path (``layers["layer1.0"]``),
    so a layer is found by its ``LayerInfo.name`` wherever it sits."""

    def __getitem__(self, key: str) -> nn.Module:
        return self.get_submodule(key) if "." in key else super().__getitem__(key)


class Network(nn.Module):
    """A CNN whose ``infos[i]`` (in order) computes ``infos[i].out_shape`` from the one before."""

    def __init__(self, layers: list[LayerSpec], in_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.specs = list(layers)
        self.infos = infer_shapes(self.specs, in_shape)
        self.in_shape = in_shape
        self.layers = LayerDict()
        build_modules(self.infos, self.layers)
        # Index of the first layer of the head: the flatten/gap that ends the feature maps.
        self.head_start = next(
            (i for i, info in enumerate(self.infos) if len(info.out_shape) == 1), len(self.infos)
        )

    @property
    def num_classes(self) -> int:
        return self.infos[-1].out_shape[0]

    def architecture(self) -> list[dict[str, Any]]:
        """The layer list, as plain data (it rebuilds this network with ``Network``)."""
        return [spec.to_dict() for spec in self.specs]

    def _modules_in_order(self, start: int = 0, stop: int | None = None) -> Iterator[nn.Module]:
        # Looked up on every call: a module replaced in place (SyncBatchNorm) is found.
        for info in self.infos[start:stop]:
            yield self.layers[info.name]

    def run_layers(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The layers ``infos[start:stop]`` on ``x``, the output of ``infos[start - 1]``:
        ``run_layers(x, 0, head_start + 1)`` gives the pooled features ``(B, D)`` that the
        classification layers see, ``run_layers(v, head_start + 1)`` their class scores."""
        for module in self._modules_in_order(start, stop):
            x = module(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, C', H', W') the last feature maps."""
        for module in self._modules_in_order(0, self.head_start):
            x = module(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C', H', W') feature maps -> (B, classes) logits."""
        for module in self._modules_in_order(self.head_start):
            x = module(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, classes) logits; softmax of them gives the probabilities."""
        for module in self._modules_in_order():
            x = module(x)
        return x

    def feature_maps(self, x: torch.Tensor, inner: bool = False) -> list[tuple[str, torch.Tensor]]:
        """Every layer's output, in order, as ``(name, tensor)``, named as in ``infos``.

        ``inner``: a block's sub-layers' outputs come first, named by their module path
        (``layer1.0.conv1``, as ``LayerInfo.inner`` names them), then the block's own."""
        out = []
        for info in self.infos:
            module = self.layers[info.name]
            if inner and info.inner and hasattr(module, "maps"):
                x, maps = module.maps(x)
                out += [(f"{info.name}.{name}", tensor) for name, tensor in maps]
            else:
                x = module(x)
            out.append((info.name, x))
        return out

    def all_infos(self) -> list[LayerInfo]:
        """``infos`` with each block's sub-layers before it: one entry per map that
        ``feature_maps(x, inner=True)`` returns, in the same order."""
        out: list[LayerInfo] = []
        for info in self.infos:
            out += [*info.inner, info]
        return out
