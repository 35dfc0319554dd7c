"""Run the app with uvicorn: ``serve`` in the foreground, ``background_server`` for tests.

Both listen on 127.0.0.1 unless told otherwise. Any address other machines can reach is
allowed but warned about: the address is resolved as the operating system will bind it, so
``0``, ``::0``, an empty host or a host name are seen for what they are. Connections go
through ``protocol.GuardedH11Protocol`` (header and body timeouts, bounded waiting).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from cnnkit.errors import ConfigError
from cnnkit.serve.app import create_app, make_settings
from cnnkit.serve.guard import check_token
from cnnkit.serve.model import ServedModel
from cnnkit.serve.protocol import MAX_HEADER_BYTES, guarded_protocol

__all__ = [
    "background_server",
    "bind_port",
    "bound_addresses",
    "check_address",
    "serve",
]

log = logging.getLogger("cnnkit")

BODY_TIMEOUT_GRACE_S = 2.0  # the app answers 408 first; the protocol closes after this


def bound_addresses(host: str, port: int = 0) -> list[str]:
    """The addresses a server told to listen on ``host`` binds: ``0`` is 0.0.0.0, ``::0`` is
    ``::``, an empty host is every interface, a name is each address it resolves to."""
    try:
        found = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(
            "{setting}: cannot resolve {value!r} ({why})", setting="host", value=host, why=exc
        ) from None
    return sorted({str(info[4][0]) for info in found})


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 zone (%eth0) is not part of it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_address(host: str, port: int, token: bool = False) -> list[str]:
    """Refuse impossible ports and unknown hosts; warn when other machines could connect.
    Returns the addresses that will be bound."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(
            "{setting}: expected 1 to 65535, got {value!r}", setting="port", value=port
        )
    addresses = bound_addresses(host, port)
    exposed = [a for a in addresses if not _is_loopback(a)]
    if exposed:
        who = (
            "requests need the bearer token, which travels as plain HTTP"
            if token
            else "anyone who can reach it can use the model: there is no authentication "
            "(set --token or CNNKIT_TOKEN)"
        )
        log.warning(
            "listening on %s port %d, reachable from other machines: %s; put a TLS reverse "
            "proxy in front (see the README's Security section)",
            ", ".join(exposed),
            port,
            who,
        )
    return addresses


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
                "port {value} is in use ({where}): stop what holds it or pick another with "
                "{setting}",
                setting="port",
                value=port,
                where=where,
            ) from None
        raise ConfigError(f"cannot listen on {where} ({exc.strerror or exc})") from None
    return sock


def _uvicorn_config(app: FastAPI, host: str, port: int, log_level: str) -> Any:
    import uvicorn

    settings = app.state.settings
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        server_header=False,
        timeout_keep_alive=5,
        # Connections beyond this get uvicorn's own 503: bounds memory under a flood. Those
        # waiting for a complete request are at most max_waiting of them (the protocol).
        limit_concurrency=4 * settings.max_queue + 64 + settings.max_waiting,
        http=guarded_protocol(
            settings.header_timeout_s,
            settings.body_timeout_s + BODY_TIMEOUT_GRACE_S,
            settings.max_waiting,
        ),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )


def serve(
    model_source: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "info",
    token: str | None = None,
    **settings: Any,
) -> None:
    """Load the model (errors surface before anything listens) and serve it until Ctrl-C.

    ``token``: require ``Authorization: Bearer TOKEN`` (see ``create_app``)."""
    import uvicorn

    make_settings(**settings)  # refuse bad limits, tokens and hosts before loading the model
    token = check_token(token)
    check_address(host, port, token is not None)
    sock = bind_port(host, port)  # a busy port is one error line, before the model loads
    try:
        app = create_app(ServedModel.load(model_source), token=token, **settings)
        shown = f"[{host}]" if ":" in host else host or "0.0.0.0"
        log.info("serving %s on http://%s:%d/", model_source, shown, port)
        uvicorn.Server(_uvicorn_config(app, host, port, log_level)).run(sockets=[sock])
    finally:
        sock.close()


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
