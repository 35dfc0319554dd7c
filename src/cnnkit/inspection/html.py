"""Small HTML helpers shared by the inspect pages, the run report and Jupyter's displays.

Pages are plain HTML with inline CSS: no scripts, no external URLs, so they open from disk
with no server and no network. Every piece of text that comes from the user (file names,
class names, config values) goes through ``esc``. ``fragment`` wraps the same tables and
pictures for a notebook cell (``_repr_html_``), with its style scoped to the fragment.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from cnnkit.inspection.maps import LayerOutput
from cnnkit.inspection.render import data_uri, map_grid
from cnnkit.models.layers import LAYER_TYPES, explain_layer

if TYPE_CHECKING:
    from cnnkit.models.network import Network

__all__ = [
    "CSS",
    "LAYER_HELP",
    "bars",
    "confusion_table",
    "esc",
    "fragment",
    "layer_help",
    "maps_html",
    "model_table",
    "page",
    "per_class_table",
    "picture",
    "scores_table",
    "table",
]

CSS = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1rem 1.5rem 3rem; color: #1d2330; background: #fcfcfd; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #d8dce4; }
h3 { font-size: 1.05rem; margin: 1.4rem 0 .3rem; }
table { border-collapse: collapse; margin: .5rem 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d8dce4; padding: .2rem .6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #eef1f6; }
pre { background: #f1f3f7; padding: .6rem .8rem; overflow-x: auto; font-size: 13px; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #d8dce4; }
img.photo { image-rendering: auto; }
.note { color: #5b6474; font-size: 13px; }
.warn { background: #fff4d6; border-left: 4px solid #e0a800; padding: .4rem .8rem; }
.good { background: #e5f6ea; border-left: 4px solid #2e9d52; padding: .4rem .8rem; }
.row { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
.row > figure { max-width: 48%; }
figure.card { max-width: 224px; }
.card { border: 1px solid #d8dce4; border-radius: 6px; padding: .5rem .7rem; background: #fff; }
figure { margin: 0; }
figcaption { font-size: 13px; color: #5b6474; }
nav a { margin-right: .8rem; }
"""

# What each layer type does, in the learning material's words where it has them: each layer
# type's record says it (``LayerType.explain``), so a new type brings its own sentence.
LAYER_HELP = {kind: record.explain for kind, record in LAYER_TYPES.items() if record.explain}


def layer_help(kind: str, last: bool = False) -> str:
    """The explanation of a layer type; the last layer's output is the class scores."""
    text = explain_layer(kind)
    if last:
        text += " Its outputs are the class scores (logits); softmax turns them into probabilities."
    return text.strip()


def esc(value: object) -> str:
    """Any value as HTML-safe text (quotes too, so it is safe in attributes); bytes of a file
    name that are not UTF-8 show as ``\\xe9`` instead of failing to write the page."""
    text = str(value).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return html.escape(text, quote=True)


def table(header: Sequence[str] | None, rows: Iterable[Sequence[object]], raw: bool = False) -> str:
    """An HTML table (no header row when ``header`` is None); cells are escaped unless
    ``raw`` (cells already HTML)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header or ())
    body = "".join(
        "<tr>" + "".join(f"<td>{c if raw else esc(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    thead = f"<thead><tr>{head}</tr></thead>" if header else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def page(title: str, body: str) -> str:
    """A complete HTML document with the shared stylesheet inline."""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def confusion_table(classes: Sequence[str], confusion: np.ndarray) -> str:
    """Rows: true class, columns: predicted; each cell shaded by its share of the row."""
    head = "".join(f"<th>{esc(c)}</th>" for c in classes)
    rows = []
    for name, counts in zip(classes, confusion, strict=True):
        total = max(int(counts.sum()), 1)
        cells = "".join(
            f"<td style='background: rgba(46, 110, 200, {0.85 * v / total:.2f})'>{int(v)}</td>"
            for v in counts
        )
        rows.append(f"<tr><th>{esc(name)}</th>{cells}</tr>")
    return (
        f"<table><thead><tr><th>true \\ predicted</th>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def maps_html(output: LayerOutput, most: int = 16) -> str:
    """One layer's feature maps as a heading with the raw range and an embedded grid."""
    shown = output.values[:most]  # (C', H, W)
    total = len(output.values)
    count = f"{len(shown)} of {total}" if len(shown) < total else str(total)
    grid = data_uri(map_grid(shown, cols=min(len(shown), 8)))
    return (
        f"<h3>{esc(output.name)} ({esc(output.type)}): {count} maps, values "
        f"{output.min:.3g} to {output.max:.3g}</h3>"
        f"<img src='{grid}' alt='feature maps of {esc(output.name)}'>"
    )


def scores_table(
    classes: Sequence[str], scores: Sequence[float], probabilities: Sequence[float] | None = None
) -> str:
    """A class-sized output (the dense layer's scores) as a table labelled with the class
    names, highest score first; with ``probabilities`` (softmax of the last layer) each row
    also gets its probability and a bar of that length."""
    order = sorted(range(len(classes)), key=lambda i: -float(scores[i]))
    rows = []
    for i in order:
        cells = [esc(classes[i]), f"{float(scores[i]):.4g}"]
        if probabilities is not None:
            p = float(probabilities[i])
            cells.append(f"{100 * p:.2f}%")
            cells.append(
                "<span style='display: inline-block; height: .8em; "
                f"width: {160 * p:.0f}px; background: #2e6ec8'></span>"
            )
        rows.append(cells)
    header = ("class", "score") + (("probability", "") if probabilities is not None else ())
    return table(header, rows, raw=True)


def model_table(model: Network) -> str:
    """Every layer's output shape, parameters and FLOPs, with the totals and the input."""
    rows = [
        (info.name, info.spec.type, " x ".join(map(str, info.out_shape)),
         f"{info.params:,}", f"{info.flops:,}")
        for info in model.infos
    ]  # fmt: skip
    total_p = sum(i.params for i in model.infos)
    total_f = sum(i.flops for i in model.infos)
    rows.append(("total", "", "", f"{total_p:,}", f"{total_f:,}"))
    shape = " x ".join(map(str, model.in_shape))
    return (
        f"<p>Input {shape}. FLOPs count one image's forward pass (a multiply-add is two).</p>"
        + table(("layer", "type", "output shape", "parameters", "FLOPs"), rows)
    )


def per_class_table(per_class: Sequence[Mapping[str, object]]) -> str:
    """Per-class precision, recall, F1 and support (``EvalResult.per_class``)."""
    rows = [
        (r["class"], f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", r["support"])
        for r in per_class
    ]
    return table(("class", "precision", "recall", "F1", "support"), rows)


def picture(image: np.ndarray | bytes, alt: str, width: int | None = None) -> str:
    """An embedded PNG (a uint8 array or PNG bytes), drawn ``width`` CSS pixels wide."""
    size = f" width='{width}'" if width else ""
    return f"<img src='{data_uri(image)}' alt='{esc(alt)}'{size}>"


def bars(probabilities: Mapping[str, float], most: int = 10) -> str:
    """The largest ``most`` probabilities as labelled horizontal bars, largest first."""
    top = sorted(probabilities.items(), key=lambda kv: -kv[1])[:most]
    rows = "".join(
        f"<tr><td>{esc(name)}</td><td class='bar'><span style='width: {100 * p:.1f}%'></span>"
        f"</td><td>{100 * p:.1f}%</td></tr>"
        for name, p in top
    )
    more = len(probabilities) - len(top)
    note = f"<p class='note'>and {more} more classes</p>" if more > 0 else ""
    return f"<table class='bars'><tbody>{rows}</tbody></table>{note}"


NOTEBOOK_CSS = """
.cnnkit table { border-collapse: collapse; margin: .3rem 0; font-variant-numeric: tabular-nums; }
.cnnkit th, .cnnkit td { border: 1px solid #d8dce4; padding: .1rem .5rem; text-align: right; }
.cnnkit th:first-child, .cnnkit td:first-child { text-align: left; }
.cnnkit img { image-rendering: pixelated; border: 1px solid #d8dce4; }
.cnnkit .note { color: #5b6474; font-size: 90%; }
.cnnkit .row { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
.cnnkit td.bar { width: 12rem; }
.cnnkit td.bar span { display: block; height: .8rem; background: #1f6feb; }
.cnnkit pre { font-size: 90%; }
"""


def fragment(title: str, body: str) -> str:
    """A notebook cell's display: a heading and ``body``, styled only inside itself."""
    return (
        f"<div class='cnnkit'><style>{NOTEBOOK_CSS}</style><p><b>{esc(title)}</b></p>{body}</div>"
    )
