"""Run the app with uvicorn: ``serve`` in the foreground, ``background_server`` for tests.

Both listen on 127.0.0.1 unless told otherwise; listening on every interface is allowed but
warned about, because the service has no authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from cnnkit.errors import ConfigError
from cnnkit.serve.app import ServeSettings, create_app
from cnnkit.serve.model import ServedModel

__all__ = ["ALL_INTERFACES", "background_server", "check_address", "serve"]

log = logging.getLogger("cnnkit")

ALL_INTERFACES = frozenset({"0.0.0.0", "::", "[::]", ""})


def check_address(host: str, port: int) -> None:
    """Refuse impossible ports; warn when the service would be reachable from other machines."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"--port: expected 1 to 65535, got {port!r}")
    if host in ALL_INTERFACES:
        log.warning(
            "listening on all interfaces (%s): anyone who can reach this machine on port %d "
            "can use the model, and there is no authentication",
            host or "0.0.0.0",
            port,
        )


def _uvicorn_config(app: FastAPI, host: str, port: int, log_level: str) -> Any:
    import uvicorn

    queue = app.state.settings.max_queue
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        server_header=False,
        timeout_keep_alive=5,
        # Connections beyond this get uvicorn's own 503: bounds memory under a flood.
        limit_concurrency=4 * queue + 64,
    )


def serve(
    model_source: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "info",
    **settings: Any,
) -> None:
    """Load the model (errors surface before anything listens) and serve it until Ctrl-C."""
    import uvicorn

    check_address(host, port)
    ServeSettings(**settings)  # refuse bad limits before the model is loaded
    app = create_app(ServedModel.load(model_source), **settings)
    log.info("serving %s on http://%s:%d/", model_source, host if host else "0.0.0.0", port)
    uvicorn.Server(_uvicorn_config(app, host, port, log_level)).run()


def _quiet_server(config: Any) -> Any:
    """A uvicorn server that sleeps until ``stop()`` instead of waking ten times a second to
    look for ``should_exit``: beside a training loop on a busy machine every such wake-up can
    make the training thread wait for the GIL (``train --live``). No Date header (that tick
    kept it fresh)."""
    import uvicorn

    class QuietServer(uvicorn.Server):
        async def main_loop(self) -> None:
            self.stopped = asyncio.Event()
            self.loop = asyncio.get_running_loop()
            if not self.should_exit:  # (a stop() that came before the loop ran)
                await self.stopped.wait()

        def stop(self) -> None:  # from any thread
            self.should_exit = True
            loop = getattr(self, "loop", None)
            if loop is not None:
                loop.call_soon_threadsafe(self.stopped.set)

    config.date_header = False
    return QuietServer(config)


@contextlib.contextmanager
def background_server(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 0,
    log_level: str = "warning",
    *,
    quiet: bool = False,
) -> Iterator[str]:
    """Serve ``app`` from a thread for the duration of a ``with``; yields its base URL.

    ``port=0`` takes a free port from the operating system. ``quiet``: the server's thread
    sleeps between requests (see ``_quiet_server``).
    """
    import uvicorn

    config = _uvicorn_config(app, host, port, log_level)
    server = _quiet_server(config) if quiet else uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="cnnkit-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        if quiet:
            server.stop()
        server.should_exit = True
        thread.join(timeout=10)
