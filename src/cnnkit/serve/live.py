"""``cnnkit train --live``: a page that watches training, updated after every epoch.

    GET /live           the page (static files under ``serve/web``)
    GET /live/events    server-sent events: one ``epoch`` event per epoch, then ``finished``
    GET /live/state     the same as one JSON object (every epoch's metrics, the latest maps)

The training loop knows nothing of this: it calls ``LiveBoard.epoch_end(row, model, data)``
(its ``on_epoch`` hook) at the end of each epoch. That call runs one forward pass of one fixed
validation image on the training thread (the weights change as soon as it returns) and stores
the outputs; everything else (PNGs, JSON, HTTP) happens on the server's own thread, only when
a page is watching, and never makes training wait. Each event stream replays every epoch from
the first (or from ``Last-Event-ID``), so a page opened late still draws the whole curves; the
maps go with the newest epoch only. ``watch_training`` starts the server on a free loopback
port, and at the end (or on an error, or Ctrl-C) tells the pages why training stopped and
shuts the server down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from cnnkit.data.dataset import PreparedData
from cnnkit.errors import TrainingInterrupted
from cnnkit.inspection.maps import LayerOutput, layer_outputs
from cnnkit.inspection.render import data_uri
from cnnkit.models.network import Network
from cnnkit.serve.app import SecurityHeaders, ServeSettings, web_dir
from cnnkit.serve.explore import overview_json
from cnnkit.serve.runner import background_server, check_address

__all__ = ["LiveBoard", "announce_url", "create_live_app", "watch_training"]

log = logging.getLogger("cnnkit")

KEEP_ALIVE_S = 15.0  # a comment line on a quiet stream, so proxies keep it open
DELIVERY_WAIT_S = 3.0  # at the end, how long open pages get to receive the last event
NO_STORE = {"cache-control": "no-store"}


def _finite(value: Any) -> Any:
    """JSON has no NaN: a metric that is not a number (no validation images) becomes null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class LiveBoard:
    """What the live page shows, written by the training thread, read by the server's.

    ``epoch_end`` is the training loop's ``on_epoch`` hook; ``finish`` says why it ended.
    """

    def __init__(self, epochs: int | None = None, title: str = "") -> None:
        self.epochs = epochs  # planned epochs, for "epoch 3 of 12" (None: unknown)
        self.title = title
        self.url = ""  # the page, once the server is up
        self._lock = threading.Lock()
        self._rows: list[dict[str, Any]] = []
        self._snapshot: tuple[int, Network, np.ndarray, list[LayerOutput], tuple] | None = None
        self._rendered: tuple[int, dict[str, Any]] | None = None
        self._image: tuple[np.ndarray, str, str] | None = None  # pixels, true label, file name
        self._input: str | None = None
        self._finished: str | None = None
        self._streams = 0  # event streams open now
        # The streams sleep until the training thread says something changed: no polling, so
        # the server's thread never competes with training for the GIL between epochs.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None

    # ---------------------------------------------------------------- the training thread

    def epoch_end(self, row: dict[str, Any], model: Network, data: PreparedData) -> None:
        """Keep the epoch's metrics and the fixed image's feature maps (``on_epoch``).

        A failure to compute the maps is logged, never raised: watching must not stop
        training, and the epoch's figures are shown all the same."""
        snapshot = None
        try:
            if self._image is None:
                self._image = _fixed_image(data)
            pixels = self._image[0]
            x = data.preprocessing.to_model_input(torch.from_numpy(pixels[None].copy()))
            outputs = layer_outputs(model, x.contiguous())  # (values copied to numpy)
            snapshot = (model, pixels, outputs, tuple(data.classes))
        except Exception as exc:
            log.warning("live page: no feature maps for epoch %s: %s", row.get("epoch"), exc)
        with self._lock:
            self._rows.append({k: _finite(v) for k, v in row.items()})
            if snapshot is not None:
                self._snapshot = (len(self._rows), *snapshot)
        self._wake()

    def finish(self, message: str) -> None:
        """Training ended: the pages say ``message`` and their event streams close."""
        with self._lock:
            if self._finished is None:
                self._finished = message
        self._wake()

    def _wake(self) -> None:
        """Tell the waiting streams (on the server's loop) that there is news."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(self._notify)

    def _notify(self) -> None:  # on the server's loop
        if self._changed is not None:
            self._changed.set()
        self._changed = asyncio.Event()

    # ---------------------------------------------------------------- the server thread

    def rows(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._rows)

    @property
    def finished(self) -> str | None:
        return self._finished

    @property
    def streams(self) -> int:
        return self._streams

    def maps(self) -> dict[str, Any] | None:
        """The newest epoch's maps as the explorer's overview JSON (drawn once per epoch)."""
        with self._lock:
            snapshot, rendered = self._snapshot, self._rendered
        if snapshot is None:
            return None
        count, model, pixels, outputs, classes = snapshot
        if rendered is not None and rendered[0] == count:
            return rendered[1]
        body = overview_json(
            model, pixels, outputs, classes, grey=True, input_url=self._input_url(pixels)
        )
        with self._lock:
            body["epoch"] = self._rows[count - 1].get("epoch")
        if self._image is not None:
            body["label"], body["file"] = self._image[1], self._image[2]
        with self._lock:
            self._rendered = (count, body)
        return body

    def _input_url(self, pixels: np.ndarray) -> str:
        if self._input is None:  # the image is fixed: its PNG is made once
            self._input = data_uri(pixels)
        return self._input

    def state(self) -> dict[str, Any]:
        """Everything the page shows, as one JSON object."""
        return {
            "title": self.title,
            "epochs": self.epochs,
            "rows": self.rows(),
            "maps": self.maps(),
            "finished": self.finished,
        }

    async def events(self, after: int = 0) -> AsyncIterator[str]:
        """Server-sent events: each epoch after the first ``after``, then ``finished``."""
        self._streams += 1
        if self._loop is None:
            self._loop, self._changed = asyncio.get_running_loop(), asyncio.Event()
        try:
            yield "retry: 1000\n\n"
            sent = max(0, after)
            while True:
                changed = self._changed  # taken before reading: a later change sets it
                finished = self.finished  # read before the rows: none can follow it
                rows = self.rows()
                while sent < len(rows):
                    body: dict[str, Any] = {"row": rows[sent], "epochs": self.epochs}
                    sent += 1
                    if sent == len(rows):  # the maps go with the newest epoch only
                        body["maps"] = await asyncio.to_thread(self.maps)
                    yield f"id: {sent}\nevent: epoch\ndata: {json.dumps(body)}\n\n"
                if finished is not None:
                    body = {"message": finished, "epochs_run": len(rows)}
                    yield f"event: finished\ndata: {json.dumps(body)}\n\n"
                    return
                if sent == len(rows):  # nothing new: sleep until there is (or a keep-alive)
                    assert changed is not None
                    try:
                        await asyncio.wait_for(changed.wait(), KEEP_ALIVE_S)
                    except TimeoutError:
                        yield ": waiting for the next epoch\n\n"
        finally:
            self._streams -= 1


def _fixed_image(data: PreparedData) -> tuple[np.ndarray, str, str]:
    """The first validation image (the first training image without a validation split)."""
    part = data.val if len(data.val) else data.train
    pixels = np.array(part.images[0])  # (S, S, C) uint8, a copy (the cache may be a map)
    label = data.classes[int(part.labels[0])]
    name = str(part.paths[0]).replace("\\", "/").rsplit("/", 1)[-1] if len(part.paths) else ""
    return pixels, label, name


def create_live_app(board: LiveBoard) -> FastAPI:
    """The live page's app: the page, its event stream and its state, nothing else."""
    app = FastAPI(title="cnnkit live", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = ServeSettings()  # the runner's connection limits
    app.add_middleware(SecurityHeaders)

    @app.get("/", include_in_schema=False)
    @app.get("/live", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(web_dir() / "live.html", media_type="text/html; charset=utf-8")

    @app.get("/live/state")
    async def state() -> JSONResponse:
        return JSONResponse(await asyncio.to_thread(board.state), headers=NO_STORE)

    @app.get("/live/events")
    async def events(request: Request) -> StreamingResponse:
        raw = request.headers.get("last-event-id", "")
        after = int(raw) if raw.isdigit() else 0  # a reconnecting page resumes where it was
        return StreamingResponse(
            board.events(after),
            media_type="text/event-stream",
            headers={**NO_STORE, "x-accel-buffering": "no"},
        )

    app.mount("/static", StaticFiles(directory=web_dir()), name="static")
    return app


@contextlib.contextmanager
def watch_training(
    epochs: int | None = None,
    *,
    title: str = "",
    port: int = 0,
    announce: Callable[[str], None] | None = None,
) -> Iterator[LiveBoard]:
    """Serve the live page on 127.0.0.1 while the ``with`` block trains; yields the board
    whose ``epoch_end`` is the training loop's ``on_epoch`` hook.

    ``port=0`` takes a free port; ``announce(url)`` is told the page's address once it
    listens. On leaving the block the pages are told that training finished (or why it
    stopped: the error, or Ctrl-C), get a moment to receive it, and the server stops.
    """
    if port:
        check_address("127.0.0.1", port)
    board = LiveBoard(epochs, title)
    with background_server(create_live_app(board), "127.0.0.1", port, quiet=True) as url:
        board.url = f"{url}/live"
        if announce is not None:
            announce(board.url)
        try:
            yield board
        except KeyboardInterrupt:
            board.finish("Training stopped: interrupted (Ctrl-C).")
            raise
        except TrainingInterrupted as exc:  # how to resume: where the run was started
            board.finish(f"Training stopped: interrupted by {exc.signal}; checkpoint saved.")
            raise
        except BaseException as exc:
            board.finish(f"Training stopped: {exc or type(exc).__name__}")
            raise
        else:
            board.finish(_finished_message(board.rows()))
        finally:
            deadline = time.monotonic() + DELIVERY_WAIT_S
            while board.streams and time.monotonic() < deadline:
                time.sleep(0.02)


def announce_url(url: str) -> None:
    """Say where the page is: a link in a notebook, a line on stderr elsewhere."""
    from cnnkit.console import console, in_notebook

    if in_notebook():
        from IPython.display import HTML, display

        display(HTML(f"<p>Watch training live: <a href='{url}' target='_blank'>{url}</a></p>"))
    else:
        console.print(f"live: watch training at {url}", markup=False, soft_wrap=True)


def _finished_message(rows: list[dict[str, Any]]) -> str:
    scored = [r for r in rows if r.get("val_acc") is not None]
    text = f"Training finished after {len(rows)} epoch{'s' if len(rows) != 1 else ''}"
    if not scored:
        return text + "."
    best = max(scored, key=lambda r: r["val_acc"])
    return f"{text}: best validation accuracy {100 * best['val_acc']:.1f}% (epoch {best['epoch']})."
