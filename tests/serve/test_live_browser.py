"""The live training page in a real browser: Debian's chromium, headless, driven by playwright
(never a downloaded browser: skipped without ``/usr/bin/chromium``), following a real training
run on 127.0.0.1. A screenshot is written to ``$CNNKIT_SCREENSHOTS`` when set."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from browser import launch_chromium, watched_page
from cnnkit.serve.live import watch_training
from cnnkit.training.loop import train
from conftest import tiny_config

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("single_thread")]

MAP_PICTURES = (
    "() => [...document.querySelectorAll('#overview canvas.map')].map((c) => c.toDataURL())"
)


@pytest.fixture(scope="module")
def browser():
    yield from launch_chromium()


def test_the_live_page_draws_every_epoch_then_says_training_finished(
    browser, tiny_shapes: Path, tmp_path: Path
) -> None:
    epochs = 3
    go_on = {e: threading.Event() for e in range(1, epochs + 1)}
    failures: list[BaseException] = []
    with watch_training(epochs, title="tiny shapes (fast)") as board:
        page, problems = watched_page(browser, viewport={"width": 1100, "height": 1000})
        page.goto(board.url)
        page.wait_for_selector("#run-info:has-text('tiny shapes')")
        assert "Waiting for the first epoch" in page.text_content("#status")

        def hook(row, model, data):
            board.epoch_end(row, model, data)
            if not go_on[row["epoch"]].wait(60):  # training waits until the page has it
                raise TimeoutError(f"the page never drew epoch {row['epoch']}")

        def run() -> None:
            try:
                train(tiny_config(tiny_shapes, epochs=epochs), tmp_path / "run",
                      progress=False, on_epoch=hook)  # fmt: skip
            except BaseException as exc:
                failures.append(exc)

        trainer = threading.Thread(target=run)
        trainer.start()
        seen: list[list[str]] = []
        try:
            for epoch in range(1, epochs + 1):
                page.wait_for_selector(f"#epochs tr[data-epoch='{epoch}']", timeout=60_000)
                assert page.locator("#epochs tbody tr").count() == epoch
                assert page.get_attribute("#overview", "data-epoch") == str(epoch)
                assert f"Epoch {epoch} of {epochs} done" in page.text_content("#status")
                assert page.locator("#loss-chart circle.val").count() == epoch
                seen.append(page.evaluate(MAP_PICTURES))
                go_on[epoch].set()
        finally:
            for event in go_on.values():
                event.set()
            trainer.join(120)
        assert not failures, failures
    page.wait_for_selector("body[data-finished='true']", timeout=30_000)
    status = page.text_content("#status")
    assert status.startswith(f"Training finished after {epochs} epochs"), status
    assert page.get_attribute("body", "data-updates") == str(epochs)  # one update per epoch
    assert all(len(s) == len(seen[0]) > 0 for s in seen)
    assert seen[0] != seen[-1]  # the maps of the fixed image change as the kernels learn
    assert "true label" in page.text_content("#maps-info")
    assert problems == []
    folder = Path(os.environ.get("CNNKIT_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / "live.png"), full_page=True)
    page.close()
