"""``inspect_image``: PNGs equal to a direct computation, a page that links only to them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cnnkit.data.images import load_image, to_model_input
from cnnkit.errors import ConfigError
from cnnkit.inspection.maps import normalize_map
from cnnkit.inspection.render import display_scale, upscale
from cnnkit.inspection.walkthrough import inspect_image, select_layers
from cnnkit.model_io import load_model
from cnnkit.plots import kernel_figure


@pytest.fixture(scope="module")
def inspected(trained_run, shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One inspection of a triangle, under a file name that needs escaping."""
    run_dir, _ = trained_run
    folder = tmp_path_factory.mktemp("inspect")
    image = folder / "tri <b>&'x'.png"
    shutil.copy(sorted((shapes_dir / "triangle").iterdir())[0], image)
    result = inspect_image(run_dir, image, folder / "out")
    return run_dir, image, result


def _model_input(run_dir: Path, image: Path) -> tuple[torch.Tensor, object]:
    model, meta = load_model(run_dir)
    pixels = load_image(
        image, meta.preprocessing.size, meta.preprocessing.channels, meta.preprocessing.resize
    )
    x = to_model_input(
        torch.from_numpy(pixels[None].copy()), meta.preprocessing.mean, meta.preprocessing.std
    )
    return x, model.eval()


def test_feature_map_pngs_equal_direct_computation(inspected) -> None:
    run_dir, image, result = inspected
    x, model = _model_input(run_dir, image)
    conv = model.layers["conv1"]
    with torch.no_grad():
        ref = F.conv2d(x, conv.weight, conv.bias, 1, 1)[0].numpy()  # (F, S, S)
        bn = model.layers["batchnorm1"]
        after_bn = F.batch_norm(
            torch.from_numpy(ref)[None], bn.running_mean, bn.running_var, bn.weight, bn.bias,
            training=False, eps=bn.eps,
        )  # fmt: skip
        relu = F.relu(after_bn)
        pooled = F.max_pool2d(relu, 2)[0].numpy()
    for name, values in (("conv1", ref), ("maxpool1", pooled)):
        grid = np.asarray(Image.open(result.out / f"maps_{name}.png"))
        side = values.shape[1]
        scale = display_scale(side)
        cols = int(np.ceil(np.sqrt(len(values))))
        tile = side * scale
        for k in (0, len(values) - 1):
            r, c = divmod(k, cols)
            top, left = 1 + r * (tile + 1), 1 + c * (tile + 1)
            got = grid[top : top + tile, left : left + tile]
            want = upscale(normalize_map(values[k]), scale)
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, (name, k)
    record = next(r for r in result.layers if r["name"] == "conv1")
    assert record["min"] == pytest.approx(float(ref.min()), abs=1e-4)
    assert record["max"] == pytest.approx(float(ref.max()), abs=1e-4)
    assert record["channel_max"][0] == pytest.approx(float(ref[0].max()), abs=1e-4)


def test_kernels_png_shows_first_layer_as_rgb(inspected) -> None:
    run_dir, _, result = inspected
    model, _ = load_model(run_dir)
    weight = model.layers["conv1"].weight.detach().numpy()  # (F, 3, 3, 3)
    drawn = np.asarray(Image.open(result.out / "kernels_conv1.png"))
    figure = kernel_figure(weight, rgb=True)  # checked tile by tile in test_plots
    np.testing.assert_array_equal(drawn, figure.image)
    left, top, right, bottom = figure.tiles[(0, "colour")]
    tile = drawn[top:bottom, left:right]
    scale = (right - left) // 3
    np.testing.assert_array_equal(tile, upscale(normalize_map(weight[0]).transpose(1, 2, 0), scale))
    deeper = np.asarray(Image.open(result.out / "kernels_conv2.png"))
    shown = model.layers["conv2"].weight.detach().numpy()[:16, :16]  # the first 16 of each
    np.testing.assert_array_equal(deeper, kernel_figure(shown).image)  # a tile per input


def test_the_class_scores_are_labelled_with_the_class_names(inspected) -> None:
    _, _, result = inspected
    html = result.index.read_text()
    dense = html.split("<section id='dense1'>", 1)[1].split("</section>", 1)[0]
    assert "The 3 class scores of dense1." in dense and "<img" not in dense
    record = next(r for r in result.layers if r["name"] == "dense1")
    for name, score in zip(("circle", "square", "triangle"), record["values"], strict=True):
        probability = f"{100 * result.probabilities[name]:.2f}%"
        assert f"<td>{name}</td><td>{score:.4g}</td>" in dense and probability in dense


def test_every_layer_and_file_is_there(inspected) -> None:
    run_dir, image, result = inspected
    model, _ = load_model(run_dir)
    assert [r["name"] for r in result.layers] == [i.name for i in model.infos]
    for name in ("input.png", "gradcam.png", "gradcam_heat.png", "index.html", "inspect.json"):
        assert (result.out / name).is_file()
    assert all(p.is_file() for p in result.files)
    summary = json.loads((result.out / "inspect.json").read_text())
    assert summary["predicted"] == result.predicted
    assert sum(summary["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert summary["gradcam"] == {"class": result.predicted, "layer": "relu4"}
    with torch.no_grad():
        probs = torch.softmax(model.eval()(_model_input(run_dir, image)[0]), 1)[0]
    assert result.probabilities["triangle"] == pytest.approx(float(probs[2]), abs=1e-5)


def test_page_links_only_local_pngs_and_escapes_names(inspected) -> None:
    _, _, result = inspected
    html = result.index.read_text()
    sources = re.findall(r"<img[^>]* src='([^']*)'", html)
    assert len(sources) >= 3 + len(result.layers)
    for src in sources:
        assert "/" not in src and src.endswith(".png") and (result.out / src).is_file()
    assert "tri &lt;b&gt;&amp;&#x27;x&#x27;.png" in html and "<b>&" not in html
    assert "http" not in html and "<script" not in html
    assert "identity" in html  # dropout is explained as the identity in eval mode
    for record in result.layers:
        assert f"id='{record['name']}'" in html


def test_layers_and_class_options(trained_run, shapes_dir: Path, tmp_path: Path) -> None:
    run_dir, _ = trained_run
    image = sorted((shapes_dir / "circle").iterdir())[0]
    result = inspect_image(
        run_dir, image, tmp_path, layers=["relu1,conv2", "conv1"], class_name="square"
    )
    assert [r["name"] for r in result.layers] == ["conv1", "relu1", "conv2"]
    assert result.cam_class == "square"
    assert not (tmp_path / "maps_maxpool1.png").exists()
    with pytest.raises(ConfigError) as info:
        inspect_image(run_dir, image, tmp_path, layers=["conv9"])
    assert str(info.value).startswith("layers: unknown layer 'conv9', expected names from: conv1")
    with pytest.raises(ConfigError) as info:
        inspect_image(run_dir, image, tmp_path, class_name="hexagon")
    assert str(info.value) == (
        "class_name: unknown class 'hexagon', expected one of: circle, square, triangle"
    )


def test_select_layers_keeps_network_order() -> None:
    assert select_layers(["a", "b", "c"], None) == ["a", "b", "c"]
    assert select_layers(["a", "b", "c"], ["c", " a "]) == ["a", "c"]
