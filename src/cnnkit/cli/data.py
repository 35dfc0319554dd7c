"""``cnnkit data``: make and check folder data sets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cnnkit.cli._app import data_app, one_line_errors, out

# ------------------------------------------------------------------------------------ data


@data_app.command("shapes")
@one_line_errors
def data_shapes(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write <class>/*.png into.")],
    count: Annotated[int, typer.Option(help="Images per class.")] = 400,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Same seed, same images.")] = 0,
    style: Annotated[
        str,
        typer.Option(
            help="cnnkit (turned shapes on random backgrounds) or material (one dark upright "
            "shape on white, as the learning material draws them)."
        ),
    ] = "cnnkit",
    overwrite: Annotated[
        bool, typer.Option(help="Write into a folder that holds files cnnkit did not write.")
    ] = False,
) -> None:
    """Generate the running example: circles, squares and triangles."""
    from cnnkit.data.shapes import SHAPE_CLASSES, generate_shapes

    generate_shapes(out_dir, count=count, size=size, seed=seed, overwrite=overwrite, style=style)
    out.print(
        f"wrote {count * len(SHAPE_CLASSES)} images ({', '.join(SHAPE_CLASSES)}) to {out_dir}"
    )


@data_app.command("check")
@one_line_errors
def data_check(
    folder: Annotated[Path, typer.Argument(help="A folder data set.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Count images per class, sizes and modes; find bad files, duplicates and imbalance."""
    from cnnkit.data.check import check_folder

    report = check_folder(folder)
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
        return
    from rich.table import Table

    table = Table(title=f"{report.root}")
    table.add_column("class")
    for split in report.counts:
        table.add_column(split, justify="right")
    for name in report.classes:
        table.add_row(name, *(str(report.counts[s][name]) for s in report.counts))
    out.print(table)
    if report.sizes:
        w, h = report.sizes["width"], report.sizes["height"]
        out.print(
            f"sizes (min/median/max): width {w[0]}/{w[1]}/{w[2]}, height {h[0]}/{h[1]}/{h[2]}"
        )
    out.print("modes: " + ", ".join(f"{m} {n}" for m, n in report.modes.items()))
    for _path, reason in report.bad:
        out.print(f"bad file: {reason}", markup=False)
    for group in report.duplicates:
        out.print("identical: " + ", ".join(group), markup=False)
    for warning in report.warnings:
        out.print(f"warning: {warning}", markup=False)
    if not report.warnings:
        out.print("no problems found")
