"""Stop an in-process training run as Ctrl-C would, at a chosen optimizer step."""

from __future__ import annotations

import os
import signal

import pytest

from cnnkit.training import optim


def interrupt_at(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """SIGINT this process right after the optimizer steps numbered in ``steps`` (counted
    from 1 over this session): the loop saves a checkpoint after that step and raises
    ``TrainingInterrupted``, as when a user presses Ctrl-C."""
    real, count = optim.Schedule.step, [0]

    def step(self: optim.Schedule) -> None:
        real(self)
        count[0] += 1
        if count[0] in steps:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(optim.Schedule, "step", step)
