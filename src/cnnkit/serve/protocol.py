"""uvicorn's h11 protocol with the timeouts uvicorn lacks, and a bound on waiting connections.

uvicorn has a keep-alive timeout between requests, but none for a request itself: its
keep-alive timer stops at the first byte, so a client that sends its headers one byte at a
time, or never finishes its body, holds a connection forever; 200 such sockets filled
``limit_concurrency`` and made ``/healthz`` answer 503. No ASGI middleware can see a request
before its headers are complete, so this is done in the protocol:

- **Header timeout**: a request's headers must be complete ``header_timeout`` seconds after the
  connection opens (or the previous response ends); otherwise the connection is closed, with
  a 408 when part of a request had arrived.
- **Body timeout** (a backstop): the body must be complete ``body_timeout`` seconds after the
  headers. The app's own ``BodyDeadline`` answers 408 first while it reads a body; this closes
  connections whose body nobody reads (an early 413 or 401 followed by a trickle).
- **Header size**: at most ``max_header_bytes`` of request line and headers (h11 enforces it
  only while they are incomplete; headers that arrive whole in one read get a 431 here).
- **Waiting connections**: at most ``max_waiting`` connections may wait for a complete
  request; a new one closes the one that has waited longest. Slow clients cannot take every
  connection slot, so requests that arrive whole (``/healthz``, real clients) keep being
  answered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["GuardedH11Protocol", "guarded_protocol"]

log = logging.getLogger("cnnkit")

LOG_EVERY_S = 10.0  # under attack: one warning per this many seconds, with a count
MAX_HEADER_BYTES = 16 * 1024  # request line and headers (h11's own default)
ANSWER = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
ANSWER += b"content-length: %d\r\n\r\n%s"


class GuardedH11Protocol(H11Protocol):
    """See the module docstring; ``guarded_protocol`` makes one class per server."""

    header_timeout: ClassVar[float] = 10.0
    body_timeout: ClassVar[float] = 30.0
    max_waiting: ClassVar[int] = 256
    max_header_bytes: ClassVar[int] = MAX_HEADER_BYTES
    waiting: ClassVar[dict[GuardedH11Protocol, None]]  # oldest first
    closed_count: ClassVar[list[float]]  # [closed since the last warning, when it was]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: str | None = None  # "headers" or "body" while a request is incomplete
        self._timer: asyncio.TimerHandle | None = None
        self._received = False  # any byte of the current request

    # ----------------------------------------------------------------- uvicorn's interface

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._track()

    def data_received(self, data: bytes) -> None:
        self._received = True
        if self.conn.their_state is h11.IDLE and self._head_too_long(data):
            why = f"request headers over {self.max_header_bytes:,} bytes"
            self._answer(b"431 Request Header Fields Too Large", why)
            self._set_phase(None)
            self.transport.close()
            return
        super().data_received(data)
        self._track()

    def _head_too_long(self, data: bytes) -> bool:
        """No end of the headers within ``max_header_bytes`` of what has arrived."""
        pending = self.conn.trailing_data[0] + data
        end = pending.find(b"\r\n\r\n", 0, self.max_header_bytes + 4)
        return end < 0 and len(pending) > self.max_header_bytes

    def _answer(self, status: bytes, why: str) -> None:
        body = json.dumps({"error": why}).encode()
        self.transport.write(ANSWER % (status, len(body), body))

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_phase(None)
        super().connection_lost(exc)

    # --------------------------------------------------------------------------- phases

    def _track(self) -> None:
        """Arm the timer that fits where the client is in its request."""
        if self.transport is None or self.transport.is_closing():
            self._set_phase(None)
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            self._set_phase("headers")
        elif state is h11.SEND_BODY:
            self._set_phase("body")
        else:  # the request is complete (or the connection is over): the app has it
            self._set_phase(None)

    def _set_phase(self, phase: str | None) -> None:
        if phase == self._phase:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting = type(self).waiting
        if phase is None:
            waiting.pop(self, None)
        elif self._phase is None:  # starts waiting: the longest waiting goes if it is full
            self._received = False
            while len(waiting) >= self.max_waiting:
                oldest = next(iter(waiting))
                oldest._close("headers" if oldest._phase == "headers" else "body", evicted=True)
            waiting[self] = None
        self._phase = phase
        if phase is not None:
            seconds = self.header_timeout if phase == "headers" else self.body_timeout
            self._timer = self.loop.call_later(seconds, self._close, phase)

    def _close(self, phase: str, evicted: bool = False) -> None:
        """Close this connection: its request's ``phase`` took too long (or it waited longest
        when a new connection needed the place)."""
        received = self._received
        self._set_phase(None)
        if self.transport is None or self.transport.is_closing():
            return
        if phase == "headers" and received and self.conn.their_state is h11.IDLE:
            self._answer(b"408 Request Timeout", "request headers not complete in time")
        self.transport.close()
        self._count_closed(phase, evicted)

    def _count_closed(self, phase: str, evicted: bool) -> None:
        cls = type(self)
        cls.closed_count[0] += 1
        now = time.monotonic()
        if now - cls.closed_count[1] >= LOG_EVERY_S:
            reason = (
                f"{self.max_waiting} connections were waiting for requests"
                if evicted
                else f"request {phase} not complete in time"
            )
            log.warning(
                "closed %d slow connection(s) (last one: %s)", int(cls.closed_count[0]), reason
            )
            cls.closed_count[:] = [0, now]


def guarded_protocol(
    header_timeout: float, body_timeout: float, max_waiting: int
) -> type[GuardedH11Protocol]:
    """A ``GuardedH11Protocol`` class with these limits and its own waiting list (one server's;
    uvicorn makes one protocol object per connection from the class it is given)."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {
            "header_timeout": header_timeout,
            "body_timeout": body_timeout,
            "max_waiting": max_waiting,
            "waiting": {},
            "closed_count": [0, float("-inf")],
        },
    )
