"""Run the app with uvicorn: ``serve`` in the foreground, ``background_server`` for tests.

Both listen on 127.0.0.1 unless told otherwise; listening on every interface is allowed but
warned about, because the service has no authentication.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from cnnkit.errors import ConfigError
from cnnkit.serve.app import ServeSettings, create_app
from cnnkit.serve.model import ServedModel

__all__ = ["ALL_INTERFACES", "background_server", "bind_port", "check_address", "serve"]

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


def bind_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for uvicorn to listen on; a port that another process
    holds is one ``ConfigError`` line, before the model is loaded (uvicorn would log a
    traceback-like error and exit 3)."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        where = f"{host or '0.0.0.0'}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} is in use ({where}): stop what holds it or pick another with --port"
            ) from None
        raise ConfigError(f"cannot listen on {where} ({exc.strerror or exc})") from None
    return sock


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
    sock = bind_port(host, port)
    try:
        app = create_app(ServedModel.load(model_source), **settings)
        log.info("serving %s on http://%s:%d/", model_source, host if host else "0.0.0.0", port)
        uvicorn.Server(_uvicorn_config(app, host, port, log_level)).run(sockets=[sock])
    finally:
        sock.close()


@contextlib.contextmanager
def background_server(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
) -> Iterator[str]:
    """Serve ``app`` from a thread for the duration of a ``with``; yields its base URL.

    ``port=0`` takes a free port from the operating system.
    """
    import uvicorn

    server = uvicorn.Server(_uvicorn_config(app, host, port, log_level))
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
        server.should_exit = True
        thread.join(timeout=10)
