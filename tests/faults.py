"""``python tests/faults.py FAULT ARGS...``: cnnkit's CLI with a crash injected from outside
the library, for the tests (and ``bench/resume_kill.py``) that kill runs where a real crash
would. Nothing in cnnkit reads a setting for these; they replace one of its functions here.

- ``checkpoint-write:N``: SIGKILL the N-th time a checkpoint folder holds its weights file
  but not yet its training state (a half-written checkpoint, never trusted on resume).
- ``rank-fails:R``: under torchrun, rank R raises at its first sum over the processes,
  while the other ranks already wait for it in the all-reduce.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from cnnkit.training import checkpoints, distributed

FAULTS = Path(__file__).resolve()  # this script, for the commands that run it


def kill_at_checkpoint_write(n: int) -> None:
    write_file, left = checkpoints._write_file, [n]

    def write(path: Path, data: bytes) -> None:
        if path.name == "state.pt":  # the weights are written, the state is not
            left[0] -= 1
            if left[0] <= 0:
                os.kill(os.getpid(), signal.SIGKILL)
        write_file(path, data)

    checkpoints._write_file = write


def fail_on_rank(rank: int) -> None:
    all_sum = distributed.all_sum

    def failing(info: distributed.DistInfo, values: object) -> object:
        if info.enabled and info.rank == rank:
            raise RuntimeError(f"simulated failure on rank {rank}")
        return all_sum(info, values)  # type: ignore[arg-type]

    distributed.all_sum = failing  # type: ignore[assignment]


def command(fault: str, *args: str) -> list[str]:
    """The command line that runs ``cnnkit ARGS`` with ``fault``."""
    return [sys.executable, str(FAULTS), fault, *args]


def main() -> None:
    fault, *args = sys.argv[1:]
    kind, _, value = fault.partition(":")
    inject = {"checkpoint-write": kill_at_checkpoint_write, "rank-fails": fail_on_rank}[kind]
    inject(int(value or "1"))
    from cnnkit.cli import main as cnnkit

    sys.argv = ["cnnkit", *args]
    cnnkit()


if __name__ == "__main__":
    main()
