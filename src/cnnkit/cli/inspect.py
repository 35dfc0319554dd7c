"""``cnnkit explain conv|pool``, ``inspect`` and ``report``: see inside the network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cnnkit.cli._app import app, one_line_errors, out
from cnnkit.errors import ConfigError

explain_app = typer.Typer(
    no_args_is_help=True,
    help="The learning material's worked examples, step by step, or with your own numbers.",
)
app.add_typer(explain_app, name="explain")

MATRIX_HELP = "Rows separated by ';' or newlines, values by spaces or commas."


def _matrix(text: str | None, file: Path | None, option: str):
    """The matrix given inline or in a file, or None for the material's default."""
    from cnnkit.inspection.explain import parse_matrix, read_matrix_file

    if text is not None and file is not None:
        raise ConfigError(f"{option}: give {option} or {option}-file, not both")
    if file is not None:
        return read_matrix_file(file)
    if text is not None:
        return parse_matrix(text, option)
    return None


@explain_app.command("conv")
@one_line_errors
def explain_conv_cmd(
    image: Annotated[str | None, typer.Option(help=f"The image matrix. {MATRIX_HELP}")] = None,
    image_file: Annotated[Path | None, typer.Option(help="The image matrix from a file.")] = None,
    kernel: Annotated[str | None, typer.Option(help=f"The kernel. {MATRIX_HELP}")] = None,
    kernel_file: Annotated[Path | None, typer.Option(help="The kernel from a file.")] = None,
    stride: Annotated[int, typer.Option(help="Pixels the kernel moves each step.")] = 1,
    padding: Annotated[
        str,
        typer.Option(
            help="border: compute where the kernel fits, fill the edge with --pad-value (the "
            "material's way); zero: pad the image with zeros first."
        ),
    ] = "border",
    pad_value: Annotated[float, typer.Option(help="Edge value for --padding border.")] = 0.0,
    relu: Annotated[bool, typer.Option("--relu/--no-relu", help="Apply ReLU at the end.")] = True,
    all_steps: Annotated[bool, typer.Option(help="Write out every position's sum.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print every number as JSON.")] = False,
) -> None:
    """Apply a kernel to an image step by step (no options: the material's 6x6 example)."""
    from cnnkit.inspection.explain import explain_conv
    from cnnkit.inspection.explain_text import render_conv

    result = explain_conv(
        _matrix(image, image_file, "--image"),
        _matrix(kernel, kernel_file, "--kernel"),
        stride=stride,
        padding=padding,
        pad_value=pad_value,
        relu=relu,
    )
    if as_json:
        out.print(json.dumps(result.to_dict()), markup=False)
    else:
        out.print(render_conv(result, all_steps), markup=False)


@explain_app.command("pool")
@one_line_errors
def explain_pool_cmd(
    feature_map: Annotated[
        str | None, typer.Option("--map", help=f"The feature map. {MATRIX_HELP}")
    ] = None,
    map_file: Annotated[Path | None, typer.Option(help="The feature map from a file.")] = None,
    size: Annotated[int, typer.Option(help="Window side in pixels.")] = 2,
    stride: Annotated[int | None, typer.Option(help="Window step (default: --size).")] = None,
    all_steps: Annotated[bool, typer.Option(help="Show every window.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print every number as JSON.")] = False,
) -> None:
    """Max pooling window by window (no options: the material's ReLU map, 2x2, stride 2)."""
    from cnnkit.inspection.explain import explain_pool
    from cnnkit.inspection.explain_text import render_pool

    result = explain_pool(_matrix(feature_map, map_file, "--map"), size=size, stride=stride)
    if as_json:
        out.print(json.dumps(result.to_dict()), markup=False)
    else:
        out.print(render_pool(result, all_steps), markup=False)


@app.command("inspect")
@one_line_errors
def inspect_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory from 'cnnkit train'.")],
    image: Annotated[Path, typer.Argument(help="The image to look at.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for index.html and PNGs.")],
    layers: Annotated[
        list[str] | None,
        typer.Option(help="Only these layers (repeat or comma-separate), e.g. conv1,relu1."),
    ] = None,
    class_name: Annotated[
        str | None, typer.Option("--class", help="Grad-CAM for this class (default: predicted).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Write into a folder that holds files cnnkit did not write.")
    ] = False,
) -> None:
    """Kernels, every layer's feature maps, Grad-CAM and probabilities for one image."""
    from cnnkit.inspection.walkthrough import inspect_image

    result = inspect_image(
        run_dir, image, out_dir, layers=layers, class_name=class_name, overwrite=overwrite
    )
    top = sorted(result.probabilities.items(), key=lambda kv: -kv[1])
    out.print(
        f"{image}: {result.predicted} (" + ", ".join(f"{c} {100 * p:.1f}%" for c, p in top) + ")",
        markup=False,
    )
    out.print(
        f"Grad-CAM for {result.cam_class} from {result.cam_layer}; {len(result.layers)} layers; "
        f"open {result.index}",
        markup=False,
    )


@app.command("report")
@one_line_errors
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory from 'cnnkit train'.")],
    data: Annotated[
        Path | None, typer.Option(help="Data folder (default: the one the run trained on).")
    ] = None,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Where to write (default: RUN_DIR/report.html).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace files at --out that cnnkit did not write.")
    ] = False,
) -> None:
    """One self-contained report.html: config, model, curves, scores, mistakes, feature maps."""
    from cnnkit.reporting import write_report

    path = write_report(run_dir, data, out_file, overwrite=overwrite)
    out.print(f"report: {path}", markup=False)


# ----------------------------------------------------------------------------- pixel, explore


def _at(text: str | None) -> tuple[int, int] | None:
    """``--at Y,X`` (row, column) as two integers."""
    if text is None:
        return None
    parts = text.replace(" ", "").split(",")
    try:
        row, col = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--at: expected ROW,COLUMN such as 5,7, got {text!r}") from None
    return row, col


@explain_app.command("pixel")
@one_line_errors
def explain_pixel_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory from 'cnnkit train'.")],
    image: Annotated[Path, typer.Argument(help="The image the model looks at.")],
    layer: Annotated[
        str, typer.Option(help="The layer, e.g. conv1 ('cnnkit inspect' names them).")
    ],
    map_index: Annotated[
        int, typer.Option("--map", help="The feature map (for a vector layer: the value).")
    ] = 0,
    at: Annotated[
        str | None, typer.Option(help="ROW,COLUMN of the value in the map, from 0 (maps only).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print every number as JSON.")] = False,
) -> None:
    """Why one value of a feature map is what it is: the patch, kernel, products, sum, bias,
    activation and display value, with your model's numbers."""
    from cnnkit.inspection.pixel import explain_pixel, render_pixel

    try:
        result = explain_pixel(run_dir, image, layer, map_index, _at(at))
    except ConfigError as exc:  # the library names its parameters; here they are flags
        text = str(exc)
        for name in ("layer", "map", "at"):
            if text.startswith(f"{name}: "):
                raise ConfigError(f"--{text}") from None
        raise
    if as_json:
        out.print(json.dumps(result.to_dict()), markup=False)
    else:
        out.print(render_pixel(result), markup=False)


@app.command("explore")
@one_line_errors
def explore_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory from 'cnnkit train'.")],
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    quiet: Annotated[bool, typer.Option(help="Only warnings and errors.")] = False,
) -> None:
    """Click through your network in the browser: every layer's maps, the kernels, and the
    arithmetic behind any value (the same server as 'cnnkit serve', page /explore)."""
    from cnnkit.model_io import load_model
    from cnnkit.serve import serve

    load_model(run_dir)  # a run directory (an ONNX file has no network to look inside)
    out.print(f"explorer: http://{host or '0.0.0.0'}:{port}/explore", markup=False)
    serve(run_dir, host, port, log_level="warning" if quiet else "info")
