"""A progress bar for Jupyter: plain HTML (a ``<progress>`` element and one line of figures)
updated in place through IPython's display handles, so it needs no ipywidgets.

It has the few methods of ``rich.progress.Progress`` the training loop calls (``add_task``,
``reset``, ``update``, and use as a context manager); the loop does not know which it has.
Unlike the terminal's bar it stays after training, showing the last epoch's figures.
"""

from __future__ import annotations

import html
from typing import Any

__all__ = ["NotebookProgress"]


class NotebookProgress:
    """One HTML bar in the cell's output, redrawn on ``update`` and ``reset``."""

    def __init__(self) -> None:
        self._fields: dict[str, Any] = {}
        self._total = 1
        self._completed = 0
        self._handle: Any = None

    def __enter__(self) -> NotebookProgress:
        from IPython.display import HTML, display

        self._handle = display(HTML(self.html()), display_id=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._draw()

    def add_task(self, description: str, total: int = 1, **fields: Any) -> int:
        self._total, self._fields = max(int(total), 1), dict(fields)
        self._draw()
        return 0

    def reset(self, task: int, total: int | None = None, completed: int = 0, **fields: Any) -> None:
        if total is not None:
            self._total = max(int(total), 1)
        self._completed = completed
        self._fields.update(fields)
        self._draw()

    def update(self, task: int, completed: int | None = None, **fields: Any) -> None:
        if completed is not None:
            self._completed = completed
        self._fields.update(fields)
        self._draw()

    def html(self) -> str:
        """The bar as HTML: the epoch, a ``<progress>`` of the epoch's steps, the figures."""
        f = {k: html.escape(str(v)) for k, v in self._fields.items()}
        figures = f"loss {f.get('loss', '-')} &middot; acc {f.get('acc', '-')}"
        if f.get("speed"):
            figures += f" &middot; {f['speed']}"
        return (
            "<div class='cnnkit-progress'>"
            f"<span>epoch {f.get('epoch', '')}</span> "
            f"<progress value='{self._completed}' max='{self._total}'></progress> "
            f"<span>{self._completed}/{self._total} steps &middot; {figures}</span></div>"
        )

    def _draw(self) -> None:
        if self._handle is not None:
            from IPython.display import HTML

            self._handle.update(HTML(self.html()))
