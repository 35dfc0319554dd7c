"""ASGI middleware that guards the app: a bearer token, and a deadline for request bodies.

``BearerAuth`` answers 401 (``WWW-Authenticate: Bearer``) to any request for the model without
``Authorization: Bearer TOKEN``; the page, its static files and the health probes stay open
(a browser cannot send a header when it loads a page; the page then sends the token). Tokens
are compared as SHA-256 digests with ``hmac.compare_digest``: the time taken tells nothing
about the token, not even its length.

``BodyDeadline`` gives a request ``seconds`` from the end of its headers to the end of its
body; a client that stops half-way gets 408 and the connection is closed, instead of holding
a request (and its memory) open forever. Headers that never end are the protocol's business
(``protocol.GuardedH11Protocol``): no ASGI code runs before a request's headers are complete.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cnnkit.errors import ConfigError
from cnnkit.serve.uploads import ApiError

__all__ = ["OPEN_PATHS", "BearerAuth", "BodyDeadline", "check_token"]

OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/favicon.ico"})  # and /static/...
MIN_TOKEN_CHARS = 16


def check_token(token: str | None) -> str | None:
    """The token, or None for no authentication; ConfigError for one too short to be secret."""
    if token is None:
        return None
    token = token.strip()
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(
            f"token: expected at least {MIN_TOKEN_CHARS} printable characters without spaces, "
            f"got {len(token)} (make one with: python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))')"
        )
    return token


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class BearerAuth:
    """401 for requests outside ``OPEN_PATHS`` without the right bearer token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = _digest(token.encode())

    def _authorised(self, scope: Scope) -> bool | None:
        """True for the right token, False for a wrong one, None when none was sent."""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, credentials = value.strip().partition(b" ")
                if scheme.lower() != b"bearer":
                    return False
                return hmac.compare_digest(_digest(credentials.strip()), self.expected)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith("/static/"):
            await self.app(scope, receive, send)
            return
        authorised = self._authorised(scope)
        if authorised:
            await self.app(scope, receive, send)
            return
        challenge = 'Bearer realm="cnnkit"'
        if authorised is not None:
            challenge += ', error="invalid_token"'
        why = "missing" if authorised is None else "wrong"
        response = JSONResponse(
            {"error": f"{why} bearer token: send the header 'Authorization: Bearer TOKEN'"},
            401,
            {"www-authenticate": challenge, "cache-control": "no-store"},
        )
        await response(scope, receive, send)


class BodyDeadline:
    """408 and a closed connection when a request body is not complete within ``seconds``."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.seconds
        complete = False

        async def receive_in_time() -> Message:
            nonlocal complete
            if complete:  # the body is in: waiting for a disconnect has no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                raise ApiError(
                    408,
                    f"request body not complete after {self.seconds:g}s: send it faster",
                    {"connection": "close"},
                ) from None
            complete = message["type"] != "http.request" or not message.get("more_body")
            return message

        await self.app(scope, receive_in_time, send)
