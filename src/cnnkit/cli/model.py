"""``cnnkit model``: look at architectures."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cnnkit.cli._app import model_app, one_line_errors, out

# ----------------------------------------------------------------------------------- model


@model_app.command("summary")
@one_line_errors
def model_summary(
    model: Annotated[str, typer.Argument(help="A preset name or a YAML file of layers.")],
    image_size: Annotated[int | None, typer.Option(help="Input side in pixels.")] = None,
    classes: Annotated[int, typer.Option(help="Number of classes.")] = 3,
    channels: Annotated[int, typer.Option(help="Input channels (1 or 3).")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Each layer's output shape, parameters and FLOPs, with totals."""
    from cnnkit.models.summary import summarize

    info = summarize(model, image_size=image_size, classes=classes, channels=channels)
    if as_json:
        out.print_json(json.dumps(info))
        return
    from rich.table import Table

    table = Table(title=f"{info['name']}: input {tuple(info['input_shape'])}")
    for col in ("layer", "output shape", "parameters", "FLOPs"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in info["layers"]:
        table.add_row(
            row["name"], str(tuple(row["output_shape"])), f"{row['params']:,}", f"{row['flops']:,}"
        )
    table.add_row(
        "total", "", f"{info['total_params']:,}", f"{info['total_flops']:,}", style="bold"
    )
    out.print(table)


@model_app.command("list")
@one_line_errors
def model_list() -> None:
    """The built-in presets, with parameters and FLOPs (one image, a 10-class head)."""
    from cnnkit.models.registry import list_presets, load_model_spec
    from cnnkit.models.summary import summarize, with_units

    for name in list_presets():
        spec = load_model_spec(name)
        size = summarize(name, classes=10)
        weights = f", weights: {', '.join(spec.pretrained)}" if spec.pretrained else ""
        out.print(
            f"{name:8s} input {spec.input_size}x{spec.input_size}, "
            f"{with_units(size['total_params'])} parameters, "
            f"{with_units(size['total_flops'])} FLOPs{weights}  {spec.description}",
            markup=False,
        )
        settings = spec.recommended_settings()
        if settings:  # what `cnnkit train --model NAME` uses unless told otherwise
            out.print(f"         recommended: {', '.join(settings)}", markup=False)
