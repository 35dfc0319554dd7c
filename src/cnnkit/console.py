"""Where cnnkit's messages go: the ``cnnkit`` logger, shown through one rich console.

Library code logs (``logging.getLogger("cnnkit")``); the CLI calls ``setup_logging`` so those
messages print as plain lines on stderr, above any progress bar, which shares this console.
"""

from __future__ import annotations

import logging
import sys

from rich.console import Console

__all__ = ["console", "in_notebook", "setup_logging"]

console = Console(stderr=True, highlight=False)


class _ConsoleHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.levelno >= logging.WARNING:
                text = f"warning: {text}"
            console.print(text, markup=False, highlight=False, soft_wrap=True)
        except Exception:
            self.handleError(record)


def setup_logging(verbose: bool = True) -> None:
    """Show cnnkit's info (or only warnings) on the console; idempotent."""
    logger = logging.getLogger("cnnkit")
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
    logger.propagate = False


def in_notebook() -> bool:
    """Whether this code runs in a Jupyter kernel (IPython's shell there has a kernel)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None
