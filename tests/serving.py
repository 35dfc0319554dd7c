"""What the server tests share: a model whose inference can be held back, and a wait."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from cnnkit.serve import ServedModel


class GatedModel(ServedModel):
    """A served model whose forward passes wait for ``gate`` once it is set (slow inference)."""

    gate: threading.Event | None = None

    def infer(self, batch):
        if self.gate is not None:
            self.gate.wait(10)
        return super().infer(batch)


def wait_until(
    condition: Callable[[], bool], seconds: float = 10.0, what: str = "timed out waiting"
) -> None:
    """Poll ``condition`` every 10 ms; fail with ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)
