"""How big a network cnnkit agrees to build: checked on the shapes, before any tensor exists.

A layer list comes from files a user may have been handed (``--model x.yaml``, a run
directory's ``model.json``). Shape inference costs nothing, while building the network
allocates every weight at once: ``filters: 200000000`` or a 100,000-layer list would take
gigabytes and minutes before failing somewhere deep in PyTorch. ``check_budget`` reads the
``LayerInfo`` list that ``infer_shapes`` returns and refuses, with one line naming the
layer and the value, a network beyond any of these bounds. Each is far above what a CNN
trained on a CPU needs: the presets have at most 26 layers, 1.2 M parameters, 0.5 M output
values and 0.13 GFLOPs per image; ``fast`` on 1024x1024 images, the largest input cnnkit
takes, has 100 M output values and 8 GFLOPs per image.
"""

from __future__ import annotations

from collections.abc import Sequence

from cnnkit.errors import ConfigError
from cnnkit.models.layers import LayerInfo

__all__ = [
    "MAX_ACTIVATIONS",
    "MAX_FLOPS",
    "MAX_LAYERS",
    "MAX_PARAMS",
    "check_budget",
    "check_layer_count",
]

MAX_LAYERS = 1_000
MAX_PARAMS = 50_000_000  # 200 MB of float32 weights, about 800 MB with gradients and Adam
MAX_ACTIVATIONS = 1 << 27  # values in all layers' outputs for one image: 512 MiB in float32
MAX_FLOPS = 200_000_000_000  # per image: 25 times a ResNet-50 at 224x224


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _layer(infos: Sequence[LayerInfo], i: int) -> str:
    return f"layer {i + 1} ({infos[i].spec.type})"


def check_layer_count(count: int) -> None:
    """Refuse more than ``MAX_LAYERS`` layers (cheap enough to run before parsing them)."""
    if count > MAX_LAYERS:
        raise ConfigError(f"layers: {count:,} layers, more than the {MAX_LAYERS:,} cnnkit builds")


def check_budget(infos: Sequence[LayerInfo]) -> None:
    """Raise ``ConfigError`` when the network of ``infos`` is too large to build or run.

    Checked in order: the number of layers, the parameters of each layer and of all, the
    values each layer outputs for one image and their sum, the FLOPs for one image. The
    message names the layer that breaks the bound, or the largest one for a total.
    """
    check_layer_count(len(infos))
    if not infos:
        return
    params = [info.params for info in infos]
    values = [_numel(info.out_shape) for info in infos]
    flops = [info.flops for info in infos]
    for i, info in enumerate(infos):  # the first layer over a bound is the one to fix
        if params[i] > MAX_PARAMS:
            raise ConfigError(
                f"{_layer(infos, i)}: {params[i]:,} parameters, more than the {MAX_PARAMS:,} "
                "cnnkit builds; use fewer filters or units, or a smaller kernel"
            )
        if values[i] > MAX_ACTIVATIONS:
            raise ConfigError(
                f"{_layer(infos, i)}: {values[i]:,} output values per image (output "
                f"{info.out_shape}), more than the {MAX_ACTIVATIONS:,} cnnkit builds; use fewer "
                "filters, less padding or a smaller input"
            )
    for amounts, limit, what in (
        (params, MAX_PARAMS, "parameters"),
        (values, MAX_ACTIVATIONS, "output values per image"),
        (flops, MAX_FLOPS, "FLOPs per image"),
    ):
        total = sum(amounts)
        if total > limit:
            big = max(range(len(amounts)), key=amounts.__getitem__)
            raise ConfigError(
                f"the network has {total:,} {what}, more than the {limit:,} cnnkit builds "
                f"(the largest is {_layer(infos, big)} with {amounts[big]:,})"
            )
