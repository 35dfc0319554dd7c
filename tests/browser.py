"""What the real-browser tests share: Debian's chromium driven by playwright (never a
downloaded browser: the tests skip when ``/usr/bin/chromium`` is missing; ``.ci/run``
installs it), and a real server on 127.0.0.1 that is ready before a page asks it anything."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cnnkit.serve import background_server, create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
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
