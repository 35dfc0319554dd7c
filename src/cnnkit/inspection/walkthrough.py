"""``cnnkit inspect``: what every layer of a trained model does to one of your images.

Writes PNGs (the input as the model sees it, kernels, feature maps, Grad-CAM), an
``inspect.json`` with the numbers, and an ``index.html`` that walks through the network layer
by layer. Images in the page are relative links to the PNGs beside it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cnnkit.errors import ConfigError
from cnnkit.files import write_folder
from cnnkit.inference import Classifier, load
from cnnkit.inspection.gradcam import default_cam_layer, grad_cam
from cnnkit.inspection.html import (
    esc,
    fragment,
    layer_help,
    page,
    picture,
    scores_table,
    table,
)
from cnnkit.inspection.maps import LayerOutput, layer_outputs
from cnnkit.inspection.render import (
    display_scale,
    heat_colours,
    map_grid,
    overlay,
    save_png,
    upscale,
    vector_strip,
)
from cnnkit.plots import kernel_figure

__all__ = ["InspectResult", "inspect_image", "select_layers"]

MAX_MAPS = 256  # feature maps drawn per layer
MAX_FILTERS, MAX_KERNEL_INPUTS = 16, 16  # kernel tiles drawn per conv layer (deep layers)
MAX_VALUES = 1024  # vectors up to this long are written out in inspect.json


@dataclass
class InspectResult:
    """What ``inspect_image`` found and wrote."""

    out: Path
    predicted: str
    probabilities: dict[str, float]
    cam_class: str
    cam_layer: str
    layers: list[dict[str, object]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def index(self) -> Path:
        return self.out / "index.html"

    def __repr__(self) -> str:
        sure = 100 * self.probabilities[self.predicted]
        return (
            f"InspectResult({self.predicted} ({sure:.1f}%); {len(self.layers)} layers, "
            f"Grad-CAM for {self.cam_class} from {self.cam_layer}; {self.index})"
        )

    def _repr_html_(self) -> str:
        """The page's pictures, read back from the PNGs it wrote, for a notebook cell."""
        probs = sorted(self.probabilities.items(), key=lambda kv: -kv[1])
        figures = [
            (name, caption) for name, caption in
            (("input.png", "the image as the model sees it"),
             ("gradcam.png", f"Grad-CAM for {self.cam_class} (from {self.cam_layer})"))
            if (self.out / name).is_file()
        ]  # fmt: skip
        head = "".join(
            f"<figure>{picture((self.out / n).read_bytes(), c, 192)}"
            f"<figcaption class='note'>{esc(c)}</figcaption></figure>"
            for n, c in figures
        )
        head += table(("class", "probability"), [(c, f"{100 * p:.2f}%") for c, p in probs])
        layers = []
        for rec in self.layers:
            file = self.out / str(rec["maps_png"])
            if file.is_file():
                shape = " x ".join(map(str, rec["out_shape"]))
                layers.append(
                    f"<p>{esc(rec['name'])} ({esc(rec['type'])}): {shape}, values "
                    f"{rec['min']:.4g} to {rec['max']:.4g}</p>"
                    + picture(file.read_bytes(), f"output of {rec['name']}")
                )
        body = (
            f"<p>Predicted <b>{esc(self.predicted)}</b>. The whole walk-through: "
            f"{esc(self.index)}</p><div class='row'>{head}</div>" + "".join(layers)
        )
        return fragment("Inside the network", body)


def select_layers(names: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    """The layer names asked for (comma lists allowed), in network order; all when None."""
    if not wanted:
        return list(names)
    asked = [w.strip() for item in wanted for w in item.split(",") if w.strip()]
    unknown = [w for w in asked if w not in names]
    if unknown:
        raise ConfigError(
            "{setting}: unknown layer {value!r}, expected names from: {names}",
            setting="layers",
            value=unknown[0],
            names=", ".join(names),
        )
    return [n for n in names if n in asked]


def _class_index(classes: Sequence[str], name: str | None) -> int | None:
    if name is None:
        return None
    if name not in classes:
        raise ConfigError(
            "{setting}: unknown class {value!r}, expected one of: {classes}",
            setting="class_name",
            value=name,
            classes=", ".join(classes),
        )
    return list(classes).index(name)


def inspect_image(
    run_dir: str | Path,
    image: str | Path,
    out: str | Path,
    *,
    layers: Sequence[str] | None = None,
    class_name: str | None = None,
    overwrite: bool = False,
) -> InspectResult:
    """Run ``image`` through the model of ``run_dir`` and write the walk-through to ``out``.

    An ``out`` folder holding files cnnkit did not write is refused unless ``overwrite``.
    """
    classifier = load(run_dir, device="cpu", precision="fp32")
    model = classifier.model
    names = [info.name for info in model.infos]
    chosen = select_layers(names, layers)
    cam_index = _class_index(classifier.classes, class_name)
    pixels = classifier.preprocess(image)  # (S, S, C) uint8, exactly as in training
    folder = Path(out)

    x = _model_input(classifier, pixels)  # (1, C, S, S)
    outputs = layer_outputs(model, x)
    probs = torch.softmax(torch.from_numpy(outputs[-1].values), dim=0).numpy()
    heat, used = grad_cam(model, x, cam_index)
    cam_layer = default_cam_layer(model)
    classes = classifier.classes
    result = InspectResult(
        out=folder,
        predicted=classes[int(np.argmax(probs))],
        probabilities={c: float(p) for c, p in zip(classes, probs, strict=True)},
        cam_class=classes[used],
        cam_layer=cam_layer,
    )

    def write_all(work: Path) -> None:
        """Every file of the walk-through, into ``work`` (a fresh folder)."""
        scale = display_scale(pixels.shape[0], target=192, most=8)
        save_png(upscale(pixels, scale), work / "input.png")
        save_png(upscale(overlay(pixels, heat), scale), work / "gradcam.png")
        save_png(upscale(heat_colours(heat), scale), work / "gradcam_heat.png")
        names = ["input.png", "gradcam.png", "gradcam_heat.png"]
        for index, output in enumerate(outputs):
            if output.name not in chosen:
                continue
            info = model.infos[index]
            record = _layer_record(output, info.in_shape, info.out_shape)
            record["last"] = index == len(outputs) - 1
            record["maps_png"], record["maps_note"] = _write_maps(output, work)
            names.append(record["maps_png"])
            if info.spec.type == "conv":
                weight = model.layers[info.name].weight  # (F, C, k, k)
                record["kernels_rgb"] = index == 0 and weight.shape[1] == 3
                record["kernels_png"], record["kernels_note"] = _write_kernels(
                    weight, info.name, record["kernels_rgb"], work
                )
                names.append(record["kernels_png"])
            result.layers.append(record)
        (work / "inspect.json").write_text(json.dumps(_summary(result, image), indent=2))
        (work / "index.html").write_text(_html(result, image, classifier))
        result.files = [folder / name for name in [*names, "inspect.json", "index.html"]]

    # A folder of cnnkit's own earlier output is replaced; anyone else's is refused.
    write_folder(folder, write_all, overwrite=overwrite)
    return result


def _model_input(classifier: Classifier, pixels: np.ndarray) -> torch.Tensor:
    batch = torch.from_numpy(pixels[None].copy())  # (1, S, S, C) uint8
    return classifier.meta.preprocessing.to_model_input(batch).contiguous()


def _layer_record(output: LayerOutput, in_shape: tuple, out_shape: tuple) -> dict:
    record: dict = {
        "name": output.name,
        "type": output.type,
        "in_shape": list(in_shape),
        "out_shape": list(out_shape),
        "min": output.min,
        "max": output.max,
    }
    if output.is_map:
        flat = output.values.reshape(output.values.shape[0], -1)  # (C, H*W)
        record["channel_min"] = [float(v) for v in flat.min(1)]
        record["channel_max"] = [float(v) for v in flat.max(1)]
    elif output.values.size <= MAX_VALUES:  # short vectors: the numbers themselves
        record["values"] = [float(v) for v in output.values]
    return record


def _write_maps(output: LayerOutput, folder: Path) -> tuple[str, str]:
    name = f"maps_{output.name}.png"
    if output.is_map:
        shown = output.values[:MAX_MAPS]
        grid = map_grid(shown)
        note = (
            ""
            if len(shown) == len(output.values)
            else f"first {MAX_MAPS} of {len(output.values)} maps"
        )
    else:
        grid = vector_strip(output.values)
        note = ""
    save_png(grid, folder / name)
    return name, note


def _write_kernels(weight: torch.Tensor, name: str, rgb: bool, folder: Path) -> tuple[str, str]:
    w = weight.detach().float().cpu().numpy()  # (F, C, k, k)
    f, c = w.shape[:2]
    shown = w[:MAX_FILTERS] if rgb else w[:MAX_FILTERS, :MAX_KERNEL_INPUTS]
    notes = []
    if len(shown) < f:
        notes.append(f"first {len(shown)} of {f} kernels")
    if not rgb and shown.shape[1] < c:
        notes.append(f"first {shown.shape[1]} of {c} input channels")
    file = f"kernels_{name}.png"
    save_png(kernel_figure(shown, rgb=rgb).image, folder / file)
    return file, ", ".join(notes)


def _summary(result: InspectResult, image: str | Path) -> dict[str, object]:
    return {
        "image": str(image),
        "predicted": result.predicted,
        "probabilities": {k: round(v, 6) for k, v in result.probabilities.items()},
        "gradcam": {"class": result.cam_class, "layer": result.cam_layer},
        "layers": result.layers,
    }


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _layer_section(
    rec: dict,
    n: int,
    classes: Sequence[str] | None = None,
    probabilities: Sequence[float] | None = None,
) -> str:
    """One layer's part of the page; ``classes`` labels its outputs when they are the class
    scores (the last dense layer's and those of the layers after it)."""
    kind = rec["type"]
    shape_in = " x ".join(map(str, rec["in_shape"]))
    shape_out = " x ".join(map(str, rec["out_shape"]))
    parts = [
        f"<section id='{esc(rec['name'])}'><h3>{n}. {esc(rec['name'])} ({esc(kind)})</h3>",
        f"<p>{esc(layer_help(kind, rec['last']))}</p>",
        f"<p class='note'>input {shape_in} &rarr; output {shape_out}; raw values from "
        f"{_fmt(rec['min'])} to {_fmt(rec['max'])}.</p>",
    ]
    parts.append("<div class='row'>")
    if "kernels_png" in rec:
        note = f" ({esc(rec['kernels_note'])})" if rec["kernels_note"] else ""
        layout = (
            "its colour pattern (normalised on its own: the colour it responds to), then its "
            "red, green and blue weights"
            if rec["kernels_rgb"]
            else "one tile per input channel"
        )
        parts.append(
            f"<figure><img src='{esc(rec['kernels_png'])}' alt='kernels of {esc(rec['name'])}'>"
            f"<figcaption>The kernels{note}, numbered; each shows {layout}, on one colour "
            "scale for the layer centred on zero (blue negative, white zero, red positive; "
            "the bar gives the values).</figcaption></figure>"
        )
    if len(rec["out_shape"]) == 3:
        note = f" ({esc(rec['maps_note'])})" if rec["maps_note"] else ""
        caption = (
            f"The {rec['out_shape'][0]} feature maps{note}, each normalised to 0-255 on its own "
            "(black = its minimum, white = its maximum; a constant map is black)."
        )
    else:
        caption = (
            f"The {rec['out_shape'][0]} values, normalised together, 32 per row "
            "(black = minimum, white = maximum)."
        )
    if classes is not None and len(rec.get("values", ())) == len(classes):
        parts.append(  # class scores: labelled with the class names, not grey cells
            "<figure>"
            + scores_table(classes, rec["values"], probabilities)
            + f"<figcaption>The {len(classes)} class scores of {esc(rec['name'])}."
            "</figcaption></figure></div></section>"
        )
        return "\n".join(parts)
    parts.append(
        f"<figure><img src='{esc(rec['maps_png'])}' alt='output of {esc(rec['name'])}'>"
        f"<figcaption>{caption}</figcaption></figure></div></section>"
    )
    return "\n".join(parts)


def _html(result: InspectResult, image: str | Path, classifier: Classifier) -> str:
    name = Path(image).name
    meta, pre = classifier.meta, classifier.meta.preprocessing
    probs = sorted(result.probabilities.items(), key=lambda kv: -kv[1])
    prob_rows = [(c, f"{100 * p:.2f}%") for c, p in probs]
    nav = " ".join(f"<a href='#{esc(r['name'])}'>{esc(r['name'])}</a>" for r in result.layers)
    body = [
        f"<h1>Inside the network: {esc(name)}</h1>",
        f"<p class='note'>Model {esc(meta.model_name or 'custom')} trained on "
        f"{len(meta.classes)} classes; the image is resized to {pre.size}x{pre.size} "
        f"({esc(pre.resize)}), {pre.channels} channel(s), as in training.</p>",
        f"<p>Predicted <b>{esc(result.predicted)}</b> "
        f"({100 * result.probabilities[result.predicted]:.2f}%).</p>",
        "<div class='row'>",
        "<figure class='card'><img class='photo' src='input.png' alt='input image'>"
        "<figcaption>The image as the model sees it.</figcaption></figure>",
        "<figure class='card'><img class='photo' src='gradcam.png' alt='Grad-CAM overlay'>"
        f"<figcaption>Grad-CAM for <b>{esc(result.cam_class)}</b> (from "
        f"{esc(result.cam_layer)}): bright areas pushed the model towards this class."
        "</figcaption></figure>",
        "<figure class='card'><img class='photo' src='gradcam_heat.png' alt='Grad-CAM heat map'>"
        "<figcaption>The heat map alone (dark = no evidence, yellow = most).</figcaption>"
        "</figure>",
        f"<div class='card'><b>Probabilities</b>{table(('class', 'probability'), prob_rows)}</div>",
        "</div>",
        "<h2>Layer by layer</h2>",
        "<p>Every layer's output for this image, in order. Dropout layers are the identity "
        "when the model predicts (eval mode), so their maps equal the layer before.</p>",
        f"<nav>{nav}</nav>",
    ]
    # the last dense layer's outputs and those after it are class scores: label them
    dense = [k for k, rec in enumerate(result.layers) if rec["type"] == "dense"]
    probs = [result.probabilities[c] for c in meta.classes]
    for k, rec in enumerate(result.layers):
        scores = bool(dense) and k >= dense[-1]
        labels = meta.classes if scores else None
        body.append(_layer_section(rec, k + 1, labels, probs if scores and rec["last"] else None))
    return page(f"cnnkit inspect: {name}", "\n".join(body))
