"""What the real-browser tests share: Debian's chromium driven by playwright (never a
downloaded browser: the tests skip when ``/usr/bin/chromium`` is missing; ``.ci/run``
installs it), and a real server on 127.0.0.1 that is ready before a page asks it anything."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cnnkit.data.shapes import draw_shape
from cnnkit.serve import background_server, create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PHONE = {  # a phone-sized screen, for new_page and open_page
    "viewport": {"width": 390, "height": 844},
    "device_scale_factor": 2,
    "is_mobile": True,
    "has_touch": True,
}
FAKE_CAMERA = [
    "--use-fake-device-for-media-stream",  # a generated video instead of a camera
    "--use-fake-ui-for-media-stream",  # and no permission prompt
]


def launch_chromium(extra_args: list[str] | None = None) -> Iterator[Any]:
    """For a module-scoped ``browser`` fixture: headless chromium, closed afterwards."""
    if not CHROMIUM.exists():
        pytest.skip(f"needs {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS + (extra_args or []), headless=True
        )
        yield chromium
        chromium.close()


@contextlib.contextmanager
def serving(source: Path, **app_options: Any) -> Iterator[str]:
    """A real server for ``source`` (run directory or export), ready to answer."""
    with background_server(create_app(source, **app_options)) as url:
        with httpx.Client(base_url=url, timeout=10) as client:
            for _ in range(500):
                if client.get("/readyz").status_code == 200:
                    break
            else:
                pytest.fail("the server never became ready")
        yield url


def watched_page(browser, init_script: str | None = None, **context: Any) -> tuple[Any, list[str]]:
    """A fresh page that records console errors, page errors and dialogs (there should be
    none): (page, the list they are appended to)."""
    page = browser.new_page(**context)
    if init_script:
        page.add_init_script(init_script)
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    return page, problems


def open_page(
    browser, url: str, path: str = "/", init_script: str | None = None, **context: Any
) -> tuple[Any, list[str]]:
    """``watched_page`` at ``url + path`` (the prediction page or ``/explore``), once it has
    shown the model. Selectors and function predicates only: a string expression would need
    eval(), which the pages' Content-Security-Policy forbids."""
    page, problems = watched_page(browser, init_script, **context)
    page.goto(url + path)
    page.wait_for_selector("#model-info:has-text('classes')")
    shown = page.locator("#model-info").text_content() or ""
    assert re.search(r"\b\d+×\d+\b", shown), shown  # the input size, from /model's preprocessing
    return page, problems


def draw_square(page: Any, box: dict[str, float]) -> None:
    """Draw a square with the mouse on the canvas whose bounding ``box`` is given, half its
    width across and centred (a drawing the page then classifies or explores)."""
    cx, cy, r = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, box["width"] / 4
    page.mouse.move(cx - r, cy - r)
    page.mouse.down()
    for x, y in ((cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r), (cx - r, cy - r)):
        page.mouse.move(x, y, steps=8)
    page.mouse.up()


def shape_png(path: Path, kind: str, seed: int = 2) -> Path:
    """A 32x32 shape (the test models' own input size) written to ``path``."""
    draw_shape(kind, 32, np.random.default_rng(seed)).save(path)
    return path
