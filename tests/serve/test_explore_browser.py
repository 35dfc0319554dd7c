"""The explorer page in a real browser: Debian's chromium, headless, driven by playwright.

As in ``test_browser.py``: never a downloaded browser (the tests skip without
``/usr/bin/chromium``), the real server on 127.0.0.1 at a free port. Chromium's fake media
device stands in for a camera. Screenshots of the overview and the pixel view are written to
``$CNNKIT_SCREENSHOTS`` when set (else the test's tmp folder) as test artefacts.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from browser import (
    FAKE_CAMERA,
    PHONE,
    draw_square,
    launch_chromium,
    open_page,
    serving,
    shape_png,
)
from cnnkit.model_io import load_model

pytestmark = pytest.mark.browser

EXPLORE = "/explore"  # the explorer's page
READ_PARTS = """() => Object.fromEntries([...document.querySelectorAll('#pixel-view [data-part]')]
    .map((n) => [n.dataset.part, [n.textContent, n.dataset.value]]))"""


@pytest.fixture(scope="module")
def browser():
    yield from launch_chromium(FAKE_CAMERA)


@pytest.fixture(scope="module")
def base_url(fast_trained_run, browser):
    run, _ = fast_trained_run
    with serving(run) as url:
        yield url


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("CNNKIT_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def upload(page, image: Path) -> None:
    page.set_input_files("#file", str(image))
    page.wait_for_selector(f"#status:has-text('{image.name}:')", timeout=30_000)


def click_cell(page, selector: str, y: int, x: int, h: int, w: int) -> None:
    box = page.locator(selector).bounding_box()
    page.mouse.click(
        box["x"] + (x + 0.5) * box["width"] / w, box["y"] + (y + 0.5) * box["height"] / h
    )


def forward_pass(run: Path, image: Path) -> dict[str, np.ndarray]:
    """Every layer's float32 output for ``image``, straight from ``Network.feature_maps``."""
    model, meta = load_model(run)
    pixels = torch.from_numpy(np.asarray(Image.open(image).convert("RGB"))[None].copy())
    with torch.no_grad():
        maps = model.eval().feature_maps(meta.preprocessing.to_model_input(pixels))
    return {name: t[0].numpy() for name, t in maps}


def assert_shown(parts: dict, name: str, value: float) -> None:
    """The page shows ``value`` for ``name``: exactly in data-value, to 5 digits in the text."""
    text, exact = parts[name]
    assert float(exact) == pytest.approx(value, rel=1e-6, abs=1e-12), name
    assert float(text) == pytest.approx(value, rel=1e-4, abs=1e-9), name


def test_click_a_map_and_a_pixel(browser, base_url, fast_trained_run, tmp_path, shots) -> None:
    run, _ = fast_trained_run
    page, problems = open_page(browser, base_url, EXPLORE, viewport={"width": 1280, "height": 900})
    image = shape_png(tmp_path / "circle.png", "circle")
    upload(page, image)
    model, _ = load_model(run)
    columns = page.locator("#overview .column")
    assert columns.count() == len(model.infos) + 1  # the input, then every layer
    assert page.locator("#overview .column[data-layer='conv1'] .map-thumb").count() == 16
    assert sorted(page.locator(".class-row").evaluate_all("r => r.map(b => b.dataset.class)")) == [
        "circle",
        "square",
        "triangle",
    ]
    page.locator("#overview-card").screenshot(path=str(shots / "explore-overview.png"))

    page.click(".map-thumb[data-layer='conv2'][data-map='3']")
    page.wait_for_selector("#map-card:not([hidden]) .source-pair")
    assert page.locator(".source-pair").count() == 16  # conv2 reads 16 maps of maxpool1
    assert page.locator(".kernel-canvas").count() == 16
    assert page.locator("#map-title").text_content() == "3. conv2, map 3"
    assert page.locator("#kernels-legend .num").count() == 2  # -m ... +m: centred on zero
    low, high = page.locator("#kernels-legend .num").evaluate_all(
        "n => n.map(x => +x.dataset.value)"
    )
    assert low == -high and high > 0

    y, x = 5, 9
    click_cell(page, "#map-canvas", y, x, 16, 16)
    page.wait_for_selector("#pixel-view .sums")
    assert (
        page.locator("#pixel-view h3").text_content() == f"conv2 (conv), map 3, row {y}, column {x}"
    )
    parts = page.evaluate(READ_PARTS)

    # the JSON endpoint, asked for the same value of the same (model-sized) image
    overview = httpx.post(f"{base_url}/explore/maps", files={"f": image.read_bytes()}).json()
    sized = base64.b64decode(overview["input"].split(",", 1)[1])
    url = f"{base_url}/explore/pixel?layer=conv2&map=3&y={y}&x={x}"
    answer = httpx.post(url, files={"f": ("i.png", sized, "image/png")}).json()
    for name in ("sum", "bias", "value", "model_value", "pre_activation", "post_activation"):
        assert_shown(parts, name, answer[name])
    assert parts["display_value"][0] == str(answer["display_value"])
    for i, total in enumerate(answer["channel_sums"][:8]):
        assert_shown(parts, f"channel-sum-{i}", total)
    for i, step in enumerate(answer["after"]):
        assert_shown(parts, f"after-{i}", step["value"])
    cells = page.locator(".term[data-channel='0'] table.patch td")  # padding cells show 0
    patch = cells.evaluate_all("c => c.map(td => (td.querySelector('.num') || {dataset: {}})"
                               ".dataset.value || '0')")  # fmt: skip
    assert [float(v) for v in patch] == pytest.approx(
        np.ravel(answer["patch"][0]).tolist(), rel=1e-6
    )

    # the forward pass: the value, its batchnorm and ReLU after, and the grey level drawn
    maps = forward_pass(run, image)
    truth = float(maps["conv2"][3, y, x])
    assert float(parts["value"][1]) == pytest.approx(truth, abs=answer["tolerance"])
    assert float(parts["model_value"][1]) == pytest.approx(truth, rel=1e-5, abs=1e-6)
    assert answer["activation"] == "relu2"
    assert float(parts["post_activation"][1]) == pytest.approx(
        float(maps["relu2"][3, y, x]), rel=1e-5, abs=1e-6
    )
    fmap = maps["conv2"][3]
    grey = round(float((truth - fmap.min()) * 255 / (fmap.max() - fmap.min())))
    assert abs(int(parts["display_value"][0]) - grey) <= 1  # float32 vs float64 rounding

    page.locator("#pixel-card").screenshot(path=str(shots / "explore-pixel.png"))
    page.locator("#map-card").screenshot(path=str(shots / "explore-map.png"))

    # all 16 input maps on request, then the animation, one input map at a time
    page.click("#pixel-view button:has-text('Show all 16 input maps')")
    assert page.locator("#pixel-view .term").count() == 16
    page.click("#animate")
    page.wait_for_selector(".term.active")
    assert page.locator("#step-status").text_content().startswith("Step 1 of 20: map 0:")
    page.click("#animate")  # pause
    page.click("#step-next")
    assert page.locator("#step-status").text_content().startswith("Step 2 of 20: map 1:")
    assert page.locator(".source-pair.active").get_attribute("data-channel") == "1"
    assert problems == []  # no script error and no Content-Security-Policy violation
    page.close()


def test_keyboard_only(browser, base_url, tmp_path) -> None:
    page, problems = open_page(browser, base_url, EXPLORE, viewport={"width": 1100, "height": 800})
    upload(page, shape_png(tmp_path / "square.png", "square", seed=4))
    page.focus(".map-thumb[data-layer='relu1'][data-map='2']")
    page.keyboard.press("Enter")
    page.wait_for_selector("#map-card:not([hidden]) .source-pair")
    page.focus("#map-canvas")
    for key in ("ArrowDown", "ArrowDown", "ArrowRight", "ArrowRight", "ArrowRight", "Enter"):
        page.keyboard.press(key)
    page.wait_for_selector("#pixel-view .sums")
    assert page.locator("#pixel-view h3").text_content() == "relu1 (relu), map 2, row 2, column 3"
    parts = page.evaluate(READ_PARTS)
    assert float(parts["post_activation"][1]) == max(0.0, float(parts["pre_activation"][1]))
    page.focus("#step-next")
    page.keyboard.press("Enter")
    assert page.locator("#step-status").text_content().startswith("Step 1 of")
    assert problems == []
    page.close()


def test_a_class_shows_its_logit_and_softmax(browser, base_url, tmp_path) -> None:
    page, problems = open_page(browser, base_url, EXPLORE, viewport={"width": 1100, "height": 800})
    image = shape_png(tmp_path / "triangle.png", "triangle", seed=5)
    upload(page, image)
    page.click(".class-row[data-class='triangle']")
    page.wait_for_selector("#pixel-view table.contributions")
    assert page.locator("#pixel-view h3").text_content().endswith("(triangle)")
    assert page.locator("#map-card").is_hidden()
    parts = page.evaluate(READ_PARTS)
    overview = httpx.post(f"{base_url}/explore/maps", files={"f": image.read_bytes()}).json()
    k = overview["classes"].index("triangle")
    assert_shown(parts, "post_activation", overview["probabilities"][k])  # the softmax
    assert_shown(parts, "model_value", overview["layers"][-1]["values"][k])  # the logit
    assert problems == []
    page.close()


def test_the_camera(browser, base_url) -> None:
    page, problems = open_page(browser, base_url, EXPLORE, viewport={"width": 1100, "height": 800})
    page.click("#camera-start")
    page.wait_for_selector("#camera-capture:not([hidden])", timeout=15_000)
    page.wait_for_function("() => document.getElementById('camera').videoWidth > 0")
    page.click("#camera-capture")
    page.wait_for_selector("#status:has-text('camera.png:')", timeout=30_000)
    assert page.locator("#overview .map-thumb").count() > 0
    page.click("#camera-stop")
    assert page.locator("#camera").is_hidden() and page.locator("#camera-start").is_visible()
    assert problems == []
    page.close()


def test_without_a_camera_the_page_still_works(browser, base_url, tmp_path) -> None:
    no_camera = "Object.defineProperty(navigator, 'mediaDevices', {value: undefined});"
    page, problems = open_page(
        browser, base_url, EXPLORE, no_camera, viewport={"width": 900, "height": 800}
    )
    assert page.locator("#camera-start").is_disabled()
    assert (
        page.locator("#camera-status").text_content()
        == "This browser offers no camera to this page."
    )
    upload(page, shape_png(tmp_path / "circle.png", "circle"))
    assert problems == []
    page.close()


def test_validation_images_with_their_true_labels(browser, base_url) -> None:
    page, problems = open_page(browser, base_url, EXPLORE, viewport={"width": 1100, "height": 800})
    page.click("#samples-load")
    page.wait_for_selector(".sample", timeout=30_000)
    assert page.locator(".sample").count() == 18  # six of each class
    assert page.locator("#samples-status").text_content() == (
        "18 of the 120 validation images, with their true labels."
    )
    page.locator(".sample[data-label='triangle']").first.click()
    page.wait_for_selector("#overview .true-label")
    assert page.locator("#overview .true-label").text_content() == "true label: triangle"
    assert "true label triangle" in page.locator("#status").text_content()
    assert problems == []
    page.close()


def test_phone_width(browser, base_url, shots) -> None:
    page, problems = open_page(browser, base_url, EXPLORE, **PHONE)
    box = page.locator("#canvas").bounding_box()
    draw_square(page, box)
    page.click("#use-drawing")
    page.wait_for_selector("#status:has-text('drawing.png:')", timeout=30_000)
    page.tap(".map-thumb[data-layer='conv1'][data-map='0']")
    page.wait_for_selector("#map-card:not([hidden]) .source-pair")
    canvas = page.locator("#map-canvas").bounding_box()
    assert canvas["x"] >= 0 and canvas["x"] + canvas["width"] <= 390
    click_cell(page, "#map-canvas", 0, 0, 32, 32)  # the corner: the kernel over the padding
    page.wait_for_selector("#pixel-view .sums")
    assert page.locator(".term[data-channel='0'] table.patch td.padding").count() == 5
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing sticks out
    page.screenshot(path=str(shots / "explore-phone.png"))
    assert problems == []
    page.close()


def test_a_drawing_and_a_dropped_file_are_explored(browser, base_url, tmp_path) -> None:
    page, problems = open_page(browser, base_url, EXPLORE, viewport={"width": 1100, "height": 900})
    box = page.locator("#canvas").bounding_box()
    page.mouse.move(box["x"] + 20, box["y"] + 20)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] - 20, box["y"] + box["height"] - 20, steps=8)
    page.mouse.up()
    page.click("#use-drawing")
    page.wait_for_selector("#status:has-text('drawing.png:')", timeout=30_000)
    assert page.locator("#overview .column").count() > 1

    image = shape_png(tmp_path / "dropped.png", "square")
    page.evaluate(
        """(bytes) => {
            const file = new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"});
            const transfer = new DataTransfer();
            transfer.items.add(file);
            document.getElementById("dropzone").dispatchEvent(
                new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
        }""",
        list(image.read_bytes()),
    )
    page.wait_for_selector("#status:has-text('dropped.png:')", timeout=30_000)
    assert problems == []
    page.close()
