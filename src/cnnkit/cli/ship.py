"""``cnnkit export`` and ``cnnkit serve``: ship a trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnnkit.cli._app import app, one_line_errors, out
from cnnkit.errors import ConfigError

FORMATS = ("onnx", "pt2")

# ---------------------------------------------------------------------------------- export


@app.command("export")
@one_line_errors
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory from 'cnnkit train'.")],
    fmt: Annotated[str, typer.Option("--format", help="onnx or pt2 (torch.export).")] = "onnx",
    out_file: Annotated[
        Path | None, typer.Option("--out", help="File to write (default RUN_DIR/model.onnx|pt2).")
    ] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's).")] = None,
    tolerance: Annotated[
        float, typer.Option(help="Largest allowed logit difference from PyTorch.")
    ] = 1e-3,
    check_images: Annotated[int, typer.Option(help="Images to verify the export on.")] = 64,
    quiet: Annotated[bool, typer.Option(help="Only warnings and the result.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace files at --out that cnnkit did not write.")
    ] = False,
) -> None:
    """Export a model (uint8 NHWC images in, normalisation inside) and verify it against PyTorch."""
    from cnnkit.export import export_onnx, export_pt2

    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if check_images < 1:
        raise ConfigError(f"--check-images: expected a positive integer, got {check_images}")
    if tolerance <= 0:
        raise ConfigError(f"--tolerance: expected a positive number, got {tolerance}")
    if fmt == "onnx":
        report = export_onnx(
            run_dir,
            out_file,
            opset=opset,
            tolerance=tolerance,
            check_images=check_images,
            overwrite=overwrite,
        )
    else:
        if opset is not None:
            raise ConfigError("--opset applies to --format onnx only")
        report = export_pt2(
            run_dir, out_file, tolerance=tolerance, check_images=check_images, overwrite=overwrite
        )
    out.print(report.summary(), markup=False)


# ----------------------------------------------------------------------------------- serve


@app.command("serve")
@one_line_errors
def serve_cmd(
    model: Annotated[Path, typer.Argument(help="A run directory, or an exported .onnx or .pt2.")],
    host: Annotated[
        str,
        typer.Option(help="Address to listen on (0.0.0.0: every interface; warned about)."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="CNNKIT_TOKEN",
            help="Require 'Authorization: Bearer TOKEN' (the page: open /#token=TOKEN).",
        ),
    ] = None,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body, in MB.")] = 10.0,
    max_queue: Annotated[int, typer.Option(help="Requests admitted before 503.")] = 32,
    timeout: Annotated[float, typer.Option(help="Seconds of model work per request.")] = 10.0,
    header_timeout: Annotated[
        float, typer.Option(help="Seconds for a request's headers to arrive.")
    ] = 10.0,
    body_timeout: Annotated[
        float, typer.Option(help="Seconds for a request's body to arrive (408 after).")
    ] = 30.0,
    quiet: Annotated[bool, typer.Option(help="Only warnings and errors.")] = False,
) -> None:
    """Serve predictions over HTTP (POST /predict) with a web page at /."""
    from cnnkit.serve import serve

    if not max_body_mb > 0:
        raise ConfigError(f"--max-body-mb: expected a positive number, got {max_body_mb}")
    serve(
        model,
        host,
        port,
        log_level="warning" if quiet else "info",
        token=token,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        max_queue=max_queue,
        timeout_s=timeout,
        header_timeout_s=header_timeout,
        body_timeout_s=body_timeout,
    )
