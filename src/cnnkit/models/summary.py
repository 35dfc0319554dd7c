"""``cnnkit model summary``: every layer's output shape, parameters and FLOPs."""

from __future__ import annotations

from typing import Any

from cnnkit.config import INPUT_SIDES, input_side_ok
from cnnkit.models.layers import infer_shapes, with_head
from cnnkit.models.limits import check_budget
from cnnkit.models.registry import load_model_spec

__all__ = ["summarize", "with_units"]


def summarize(
    model: str, image_size: int | None = None, classes: int = 3, channels: int = 3
) -> dict[str, Any]:
    """Per-layer shapes, parameters and forward FLOPs for one image, and their totals."""
    from cnnkit.errors import ConfigError

    spec = load_model_spec(model)
    size = image_size or spec.input_size
    if isinstance(classes, bool) or classes < 2:
        raise ConfigError(
            "{setting}: expected at least 2, got {value}", setting="classes", value=classes
        )
    if channels not in (1, 3):
        raise ConfigError(
            "{setting}: expected 1 or 3, got {value}", setting="channels", value=channels
        )
    if not input_side_ok(size):
        raise ConfigError(
            "{setting}: expected {low} to {high} pixels, got {value}",
            setting="image_size", value=size, limit=INPUT_SIDES, low=INPUT_SIDES[0],
            high=INPUT_SIDES[1],
        )  # fmt: skip
    infos = infer_shapes(with_head(list(spec.layers), classes), (channels, size, size))
    check_budget(infos)  # what cnnkit would refuse to build is not summarised as fine
    rows = [
        {
            "name": i.name,
            "type": i.spec.type,
            "output_shape": list(i.out_shape),
            "params": i.params,
            "flops": i.flops,
        }
        for i in infos
    ]
    return {
        "name": spec.name,
        "input_shape": [channels, size, size],
        "layers": rows,
        "total_params": sum(r["params"] for r in rows),
        "total_flops": sum(r["flops"] for r in rows),
    }


def with_units(n: float) -> str:
    """``11.7M``, ``27.0k``, ``3.64G``: three significant figures and an SI prefix."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"
