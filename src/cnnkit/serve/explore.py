"""The explorer page (``GET /explore``) and the JSON it reads, added to the serving app.

    GET  /explore                    the page (static files under ``serve/web``)
    POST /explore/maps               image -> every layer's maps (PNG) or values, probabilities
    POST /explore/map?layer=&map=    image -> one map's values, the input maps and kernels
    POST /explore/pixel?layer=&map=&y=&x=   image -> ``explain_pixel``'s arithmetic (JSON)
    GET  /explore/samples            validation images of the run's data folder, true labels

Every POST takes the image as the other endpoints do (raw body or multipart, same limits).
The page sends the model-sized picture ``/explore/maps`` returns for the later calls, so each
click costs one small forward pass. The model work runs on the app's one model thread, on a
float32 CPU copy of the network (the pixel arithmetic is checked against that forward pass).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from torch import nn

from cnnkit.errors import CnnkitError, ConfigError, DataError
from cnnkit.inference import Classifier
from cnnkit.inspection.maps import LayerOutput, layer_outputs, normalize_map, normalize_maps
from cnnkit.inspection.pixel import NoPixelRule, cpu_classifier, explain_value, find_layer
from cnnkit.inspection.pixel_rules import PIXEL_RULES
from cnnkit.inspection.render import data_uri, vector_strip
from cnnkit.models.network import Network
from cnnkit.serve.uploads import ApiError, read_images

__all__ = [
    "add_explore_routes",
    "map_detail",
    "overview",
    "overview_json",
    "validation_samples",
]

MAX_MAPS = 256  # maps per layer drawn in the overview
MAX_VECTOR = 256  # a longer vector (a big flatten) is sent as a picture, not as numbers
MAX_SOURCE_VALUES = 1 << 16  # input-map values sent with a map (always at least one map)
SAMPLES_PER_CLASS = 6
NO_STORE = {"cache-control": "no-store"}


# ----------------------------------------------------------------------------- computing


def _forward(
    classifier: Classifier, image: Any
) -> tuple[np.ndarray, torch.Tensor, list[LayerOutput]]:
    """(pixels (S, S, C) uint8, model input (1, C, S, S), every layer's output)."""
    meta = classifier.meta
    pixels = classifier.preprocess(image)
    x = meta.preprocessing.to_model_input(torch.from_numpy(pixels[None].copy())).contiguous()
    return pixels, x, layer_outputs(classifier.model, x)


def overview(classifier: Classifier, image: Any) -> dict[str, Any]:
    """Every layer's output for one image, as the overview draws it, and the probabilities:
    the softmax of this forward pass's logits (without a model's test-time mirror average)."""
    pixels, _, outputs = _forward(classifier, image)
    return overview_json(classifier.model, pixels, outputs, classifier.classes)


def overview_json(
    model: Network,
    pixels: np.ndarray,
    outputs: list[LayerOutput],
    classes: Sequence[str],
    *,
    grey: bool = False,
    input_url: str | None = None,
) -> dict[str, Any]:
    """The overview's JSON from a forward pass already made: the input ``pixels`` (S, S, C)
    uint8, each layer's maps as PNG data URLs (or its values), the class probabilities.

    ``grey`` sends each layer's maps as one block instead: ``{"grey": base64 of the uint8
    (maps, H, W) values normalised to 0-255 map by map, "ranges": [[min, max], ...]}``, about
    fifty times cheaper to make than a PNG per map, and no picture of a long vector. The live
    training page (``serve.live``) asks for that after every epoch, while training goes on
    beside it, with its fixed image's ``input_url`` made once."""
    logits = outputs[-1].values.astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    layers = []
    for info, out in zip(model.infos, outputs, strict=True):
        entry: dict[str, Any] = {
            "name": info.name,
            "type": info.spec.type,
            "in_shape": list(info.in_shape),
            "out_shape": list(info.out_shape),
            "min": out.min,
            "max": out.max,
            "explain": info.spec.type in PIXEL_RULES,
        }
        if out.is_map and grey:
            shown = out.values[:MAX_MAPS]
            flat = shown.reshape(len(shown), -1)
            entry["grey"] = base64.b64encode(normalize_maps(shown).tobytes()).decode("ascii")
            entry["ranges"] = np.stack([flat.min(1), flat.max(1)], 1).astype(float).tolist()
        elif out.is_map:
            entry["maps"] = [
                {
                    "image": data_uri(normalize_map(v)),
                    "min": float(v.min()),
                    "max": float(v.max()),
                }
                for v in out.values[:MAX_MAPS]
            ]
        elif out.values.size <= MAX_VECTOR:
            entry["values"] = out.values.tolist()
        elif not grey:
            entry["strip"] = data_uri(vector_strip(out.values))
        layers.append(entry)
    classes = list(classes)
    best = int(np.argmax(probs))
    return {
        "input": input_url or data_uri(pixels),
        "input_shape": list(model.in_shape),
        "classes": classes,
        "class": classes[best],
        "probabilities": probs.tolist(),
        "layers": layers,
    }


def map_detail(classifier: Classifier, image: Any, layer: str, map: int) -> dict[str, Any]:
    """One map's values with the input maps (and kernels) it was computed from."""
    model = classifier.model
    index = find_layer(model, layer)
    info = model.infos[index]
    if len(info.out_shape) != 3:
        raise ConfigError(f"layer: {layer} outputs a vector, not maps: explain one of its values")
    if isinstance(map, bool) or not 0 <= map < info.out_shape[0]:
        raise ConfigError(f"map: {layer} has {info.out_shape[0]} maps, got {map!r}")
    _, x, outputs = _forward(classifier, image)
    source = x[0].double().numpy() if index == 0 else outputs[index - 1].values
    module = model.layers[info.name]
    kernels, bias, channels = None, None, []
    if isinstance(module, nn.Conv2d):
        weight = module.weight.detach().double().cpu().numpy()  # (F, C / groups, kh, kw)
        per_group = weight.shape[1]
        group = map // (weight.shape[0] // module.groups)
        channels = list(range(group * per_group, (group + 1) * per_group))
        kernels = weight[map]
        bias = float(module.bias.detach()[map]) if module.bias is not None else None
    elif len(info.in_shape) == 3 and info.in_shape[0] == info.out_shape[0]:
        channels = [map]  # pooling and position-wise layers: the same map before
    per_map = int(np.prod(source.shape[1:])) if source.ndim == 3 else 0
    shown = channels[: max(1, MAX_SOURCE_VALUES // max(per_map, 1))]
    values = outputs[index].values[map]
    return {
        "layer": info.name,
        "type": info.spec.type,
        "map": map,
        "values": values.tolist(),
        "min": float(values.min()),
        "max": float(values.max()),
        "input_layer": "the image" if index == 0 else outputs[index - 1].name,
        "input_channels": len(channels),
        "inputs": [{"channel": c, "values": source[c].tolist()} for c in shown],
        "kernels": None
        if kernels is None
        else [{"channel": c, "values": kernels[i].tolist()} for i, c in enumerate(shown)],
        "bias": bias,
        "explain": info.spec.type in PIXEL_RULES,
    }


def pixel_detail(
    classifier: Classifier, image: Any, layer: str, map: int, at: tuple | None
) -> dict:
    """``explain_pixel``'s answer as JSON, from the same forward pass the page drew."""
    pixels, x, outputs = _forward(classifier, image)
    meta = classifier.meta
    explanation = explain_value(
        classifier.model, x, layer, map, at,
        pixels=pixels, mean=meta.preprocessing.mean, std=meta.preprocessing.std,
        classes=meta.classes, outputs=outputs,
    )  # fmt: skip
    return explanation.to_dict()


def validation_samples(run_dir: Path, classifier: Classifier, per_class: int) -> dict[str, Any]:
    """The first ``per_class`` validation images of each class, at the model's input size,
    with their true labels: the split training validated on, from the run's data folder."""
    from cnnkit.config import RunConfig, load_yaml
    from cnnkit.data.dataset import load_split

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise DataError(f"the run does not record its data folder ({config_path} is missing)")
    config = RunConfig.from_dict(load_yaml(config_path))
    folder = Path(config.data.path) if config.data.path else None
    if folder is None or not folder.is_dir():
        raise DataError(f"the run's data folder {folder} no longer exists")
    meta = classifier.meta
    pre = meta.preprocessing
    split = load_split(folder, "val", meta.classes, config.data, pre.size, pre.channels)
    samples = []
    for label in range(len(meta.classes)):
        for i in np.flatnonzero(split.labels == label)[:per_class]:
            samples.append({"index": int(i), "label": meta.classes[label],
                            "image": data_uri(np.asarray(split.images[int(i)]))})  # fmt: skip
    return {"folder": str(folder), "split": "val", "total": len(split), "samples": samples}


# ----------------------------------------------------------------------------- HTTP


def _int(request: Request, name: str, required: bool = True) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        if required:
            raise ApiError(400, f"missing query parameter {name!r}")
        return None
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, f"{name}: expected a whole number, got {raw[:40]!r}") from None


def _status(exc: CnnkitError) -> int:
    if isinstance(exc, NoPixelRule):
        return 501
    return 404 if isinstance(exc, DataError) else 400


def add_explore_routes(app: FastAPI, run_dir: Path | None) -> None:
    """Add the explorer's page and endpoints to ``app`` (made by ``create_app``), which holds
    the served model, its worker, upload limits and ``run_model`` in ``app.state``."""
    from cnnkit.serve.app import web_dir

    state = app.state
    cached: dict[str, Any] = {}

    def classifier() -> Classifier:
        if "cpu" not in cached:  # on the model thread: never two at once
            cached["cpu"] = cpu_classifier(state.served.classifier)
        return cached["cpu"]

    async def on_model_thread(work: Callable[[], Any]) -> Any:
        """``work()``'s result, run on the model thread; cnnkit's errors become HTTP errors."""
        if not state.served.can_explain:
            raise ApiError(501, "the explorer needs a run directory; this server runs an ONNX file")
        with state.budget.hold() as hold:
            try:
                return await state.run_model(state.worker.submit(work), hold)
            except CnnkitError as exc:
                raise ApiError(_status(exc), str(exc)) from None

    def answer(body: Any) -> JSONResponse:
        return JSONResponse(body, headers=NO_STORE)

    async def with_image(request: Request, fn: Callable[..., Any], *args: Any) -> JSONResponse:
        """``fn(the CPU classifier, the uploaded image, *args)`` on the model thread, as JSON;
        the upload counts against the server's memory budget as /predict's do."""
        if not state.served.can_explain:
            raise ApiError(501, "the explorer needs a run directory; this server runs an ONNX file")
        with state.budget.hold() as hold:
            uploads = await read_images(request, state.upload_limits, hold)
            if len(uploads) != 1:
                raise ApiError(400, f"the explorer takes one image, got {len(uploads)}")
            image = uploads[0].image

            def work() -> Any:
                with image:  # its decoded pixels are freed as soon as the work is done
                    return fn(classifier(), image, *args)

            try:
                return answer(await state.run_model(state.worker.submit(work), hold))
            except CnnkitError as exc:
                raise ApiError(_status(exc), str(exc)) from None

    @app.get("/explore", include_in_schema=False)
    async def explore_page() -> FileResponse:
        return FileResponse(web_dir() / "explore.html", media_type="text/html; charset=utf-8")

    @app.post("/explore/maps")
    async def explore_maps(request: Request) -> JSONResponse:
        return await with_image(request, overview)

    @app.post("/explore/map")
    async def explore_map(request: Request) -> JSONResponse:
        layer, index = request.query_params.get("layer", ""), _int(request, "map")
        return await with_image(request, map_detail, layer, index)

    @app.post("/explore/pixel")
    async def explore_pixel(request: Request) -> JSONResponse:
        layer, index = request.query_params.get("layer", ""), _int(request, "map")
        y, x = _int(request, "y", required=False), _int(request, "x", required=False)
        if (y is None) != (x is None):
            raise ApiError(400, "give both y and x (a map position) or neither (a vector value)")
        at = None if y is None else (y, x)
        return await with_image(request, pixel_detail, layer, index, at)

    @app.get("/explore/samples")
    async def explore_samples() -> JSONResponse:
        if run_dir is None:
            raise ApiError(404, "this server was not started from a run directory")
        if "samples" not in cached:  # decoded once (the data set's cache makes it quick)
            cached["samples"] = await on_model_thread(
                lambda: validation_samples(run_dir, classifier(), SAMPLES_PER_CLASS)
            )
        return answer(cached["samples"])
