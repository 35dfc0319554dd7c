"""``MemoryBudget``: the bytes that requests may hold at once, shared by all of them.

Each request takes from the budget what it is about to hold, before it holds it: its body
while it streams in, then the decoded size of its images (width x height x 4 bytes, at the
scale they are decoded at) before they go to the model. A request that could never fit is
refused with 413 by the per-request limits; one that does not fit *now*, because others hold
the budget, gets 503 with ``Retry-After``. A request gives its bytes back when its model work
has really finished, even if its caller timed out, so a slow decode can never be counted out
while it still holds memory.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from types import TracebackType

__all__ = ["Hold", "MemoryBudget"]

MB = 1024 * 1024


class MemoryBudget:
    """A thread-safe count of the bytes held by requests, at most ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        return self._held

    def take(self, n: int) -> bool:
        """Add ``n`` bytes if they fit under the limit; False (nothing taken) otherwise."""
        with self._lock:
            if self._held + n > self.limit:
                return False
            self._held += n
            return True

    def give_back(self, n: int) -> None:
        with self._lock:
            self._held -= n

    def hold(self) -> Hold:
        """What one request holds, given back when its ``with`` ends (see ``Hold``)."""
        return Hold(self)


class Hold:
    """One request's share of a ``MemoryBudget``.

    ``with budget.hold() as hold:`` ... ``hold.take(n, what)`` for each thing held; at the
    end of the ``with`` everything is given back, or, after ``release_with(future)``, when
    that future is done (the worker still decodes after the request timed out).
    """

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.bytes = 0
        self._future: Future | None = None

    def take(self, n: int) -> bool:
        """Take ``n`` more bytes; False when the budget is busy."""
        if n and not self.budget.take(n):
            return False
        self.bytes += n
        return True

    def release_with(self, future: Future) -> None:
        """Give the bytes back when ``future`` is done instead of at the end of the ``with``."""
        self._future = future

    def _give_back(self, _: object = None) -> None:
        taken, self.bytes = self.bytes, 0
        self.budget.give_back(taken)

    def __enter__(self) -> Hold:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._future is not None:
            self._future.add_done_callback(self._give_back)  # now, if it is already done
        else:
            self._give_back()
