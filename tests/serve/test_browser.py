"""The web page in a real browser: Debian's chromium, headless, driven by playwright.

Never a downloaded browser: the tests skip when ``/usr/bin/chromium`` is missing
(``apt-get install chromium``; ``.ci/run`` installs it). The server is the real one, uvicorn
on 127.0.0.1 at a free port, serving the session's trained run.
"""

from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image

from browser import PHONE, draw_square, launch_chromium, open_page, serving, shape_png
from cnnkit.serve import background_server, create_app

pytestmark = pytest.mark.browser

ALL_MAPS_LOADED = """() => {
  const maps = [...document.querySelectorAll('#layers img.map')];
  return maps.length > 0 && maps.every((img) => img.complete && img.naturalWidth > 0);
}"""
# Visible images that failed to load (or have no source): what shows a broken-image icon.
BROKEN_IMAGES = """() => [...document.images]
  .filter((img) => img.getClientRects().length > 0 && getComputedStyle(img).visibility !== 'hidden')
  .filter((img) => img.complete && img.naturalWidth === 0)
  .map((img) => img.id || img.alt || img.src.slice(0, 40))"""
DESKTOP = {"viewport": {"width": 1100, "height": 900}}


@pytest.fixture(scope="module")
def browser():
    yield from launch_chromium()


@pytest.fixture(scope="module")
def base_url(trained_run, browser):
    run, _ = trained_run
    with serving(run) as url:
        yield url


@pytest.fixture(scope="module")
def onnx_url(trained_run, browser, tmp_path_factory):
    from cnnkit.export import export_onnx

    run, _ = trained_run
    report = export_onnx(run, tmp_path_factory.mktemp("onnx") / "model.onnx", check_images=8)
    with serving(report.path) as url:
        yield url


def broken_images(page) -> list[str]:
    """The visible images on ``page`` that show a broken-image icon (none, in every state)."""
    page.wait_for_load_state("load")
    return page.evaluate(BROKEN_IMAGES)


def test_upload_shows_probabilities_feature_maps_and_grad_cam(browser, base_url, tmp_path):
    page, problems = open_page(browser, base_url, viewport={"width": 1100, "height": 900})
    image = shape_png(tmp_path / "circle.png", "circle")
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#probabilities .bar-row", timeout=30_000)
    page.wait_for_function(ALL_MAPS_LOADED, timeout=30_000)

    rows = page.locator("#probabilities .bar-row")
    assert rows.count() == 3
    assert sorted(rows.evaluate_all("rows => rows.map(r => r.dataset.class)")) == [
        "circle",
        "square",
        "triangle",
    ]
    answer = httpx.post(
        f"{base_url}/predict", content=image.read_bytes(), headers={"content-type": "image/png"}
    ).json()["predictions"][0]
    assert rows.first.get_attribute("data-class") == answer["class"]  # the top bar is first
    assert page.locator("#status").text_content().startswith(answer["class"])
    assert page.locator("#preview-name").text_content() == "circle.png"

    layers = page.locator("#layers .layer")
    assert layers.count() == 15  # conv, batchnorm, relu (and pooling) of four blocks
    assert layers.first.locator("h3").text_content().startswith("conv1 · conv · 16 maps of 32×32")
    assert page.locator("#gradcam").is_visible()
    assert page.evaluate("document.getElementById('gradcam-image').naturalWidth") == 32
    page.screenshot(path=str(tmp_path / "desktop.png"), full_page=True)
    assert (tmp_path / "desktop.png").stat().st_size > 10_000
    assert problems == []  # no script error and no Content-Security-Policy violation
    page.close()


def test_drawing_on_a_phone_sized_screen(browser, base_url, tmp_path):
    page, problems = open_page(browser, base_url, **PHONE)
    box = page.locator("#canvas").bounding_box()
    assert box is not None and box["width"] <= 390
    draw_square(page, box)
    page.click("#classify-drawing")
    page.wait_for_selector("#probabilities .bar-row", timeout=30_000)
    page.wait_for_function(ALL_MAPS_LOADED, timeout=30_000)
    assert page.locator("#preview-name").text_content() == "drawing.png"
    # a closed outline is filled, like the shapes the model learnt from
    top = page.locator("#probabilities .bar-row").first
    assert top.get_attribute("data-class") == "square"
    drawn = page.evaluate(
        "(() => { const c = document.getElementById('canvas');"
        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let dark = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 128) dark++;"
        " return dark; })()"
    )
    assert drawn > 1000  # the stroke is on the canvas
    # nothing sticks out sideways on a phone
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
    assert problems == []
    page.close()


def test_dropping_an_image_classifies_it(browser, base_url, tmp_path):
    page, problems = open_page(browser, base_url, viewport={"width": 800, "height": 700})
    data = list(shape_png(tmp_path / "square.png", "square", seed=4).read_bytes())
    page.evaluate(
        """(bytes) => {
            const file = new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"});
            const transfer = new DataTransfer();
            transfer.items.add(file);
            const zone = document.getElementById("dropzone");
            zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true}));
            zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
        }""",
        data,
    )
    page.wait_for_selector("#probabilities .bar-row", timeout=30_000)
    assert page.locator("#preview-name").text_content() == "dropped.png"
    assert not page.locator("#dropzone").evaluate("z => z.classList.contains('over')")
    assert problems == []
    page.close()


def test_a_hostile_file_name_is_shown_as_text(browser, base_url, tmp_path):
    page, problems = open_page(browser, base_url, viewport={"width": 800, "height": 700})
    name = '<img src=x onerror="alert(1)">.png'
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "white").save(buffer, format="PNG")
    page.set_input_files(
        "#file", files=[{"name": name, "mimeType": "image/png", "buffer": buffer.getvalue()}]
    )
    page.wait_for_selector("#probabilities .bar-row", timeout=30_000)
    assert page.locator("#preview-name").text_content() == name
    assert page.locator("img[src='x']").count() == 0
    assert problems == []
    page.close()


def test_a_bad_upload_shows_the_servers_message(browser, base_url):
    page, problems = open_page(browser, base_url, viewport={"width": 800, "height": 700})
    page.set_input_files(
        "#file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"just text"}]
    )
    page.wait_for_selector("#status.error", timeout=30_000)
    assert (
        page.locator("#status")
        .text_content()
        .startswith("notes.png: not an image in a supported format")
    )
    # the browser logs the 400 response itself; nothing else may go wrong
    assert all("400" in p for p in problems)
    page.close()


def test_the_page_uses_a_token_given_in_the_url_fragment(browser, trained_run, tmp_path):
    token = "browser-token-0123456789abcdef"
    run, _ = trained_run
    with background_server(create_app(run, token=token)) as url:
        page = browser.new_page(viewport={"width": 800, "height": 700})
        page.goto(url + "/")
        page.wait_for_selector("#model-info:has-text('not available')")
        assert "missing bearer token" in page.locator("#model-info").text_content()
        assert "/#token=TOKEN" in page.locator("#model-info").text_content()
        page.close()
        page = browser.new_page(viewport={"width": 800, "height": 700})  # a new tab
        page.goto(url + f"/#token={token}")
        page.wait_for_selector("#model-info:has-text('classes')")
        assert page.url == url + "/"  # taken out of the address bar (and its history)
        assert page.evaluate("() => sessionStorage.getItem('cnnkit-token')") == token
        page.set_input_files("#file", str(shape_png(tmp_path / "c.png", "circle")))
        page.wait_for_selector("#probabilities .bar-row", timeout=30_000)
        page.close()


# ------------------------------------------------------------------ no broken images, ever


@pytest.mark.parametrize("screen", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_no_broken_images_on_first_load(browser, base_url, screen):
    page, problems = open_page(browser, base_url, **screen)
    assert broken_images(page) == []
    assert not page.locator("#gradcam").is_visible()  # nothing to show yet
    assert not page.locator("#preview-figure").is_visible()
    assert problems == []
    page.close()


@pytest.mark.parametrize("screen", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_no_broken_images_when_serving_an_onnx_file(browser, onnx_url, screen, tmp_path):
    page, problems = open_page(browser, onnx_url, **screen)
    assert broken_images(page) == []
    assert "exported onnx file" in page.locator("#explain-status").text_content()
    page.set_input_files("#file", str(shape_png(tmp_path / "square.png", "square")))
    page.wait_for_selector("#probabilities .bar-row", timeout=30_000)
    page.wait_for_selector("#preview-figure:not([hidden])", timeout=10_000)
    assert broken_images(page) == []
    assert not page.locator("#gradcam").is_visible()  # an ONNX file has no maps to show
    assert problems == []
    page.close()


@pytest.mark.parametrize("screen", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_a_bad_upload_clears_the_previous_maps_and_shows_no_broken_preview(
    browser, base_url, screen, tmp_path
):
    page, problems = open_page(browser, base_url, **screen)
    page.set_input_files("#file", str(shape_png(tmp_path / "circle.png", "circle")))
    page.wait_for_function(ALL_MAPS_LOADED, timeout=30_000)
    assert page.locator("#gradcam").is_visible() and page.locator("#preview").is_visible()
    assert broken_images(page) == []

    page.set_input_files(
        "#file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"just text"}]
    )
    page.wait_for_selector("#status.error", timeout=30_000)
    page.wait_for_selector("#preview", state="hidden", timeout=5_000)  # nor can the browser
    assert broken_images(page) == []
    assert page.locator("#layers .layer").count() == 0  # the circle's maps are gone
    assert not page.locator("#gradcam").is_visible()
    assert page.locator("#probabilities .bar-row").count() == 0
    assert all("400" in p for p in problems)
    page.close()
