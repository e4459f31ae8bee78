"""A rich progress bar for ``wait``; silent when disabled or not on a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from aigc_core.jobs import JobView

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


class JobProgress:
    def __init__(self, view: JobView, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._view = view
        self._read_at = 0.0

    def __enter__(self) -> JobProgress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(f"job {self._view.id[:8]}", total=self._view.item_count,
                                                 detail="")
        return self

    def refresh(self, read: Callable[[], JobView], every_s: float = 0.2) -> None:
        """After a chunk: read the job's view and show it, only when a bar is shown and at most every
        ``every_s`` (a status read is three queries; chunks of a fast job end hundreds of times a second)."""
        if self._progress is None or time.monotonic() - self._read_at < every_s:
            return
        self._read_at = time.monotonic()
        self.update(read())

    def update(self, view: JobView) -> None:
        if self._progress is None:
            return
        c = view.counts
        reused = f" (reused {c['reused']})" if c.get("reused") else ""
        detail = f"ok {c.get('succeeded', 0)}{reused}  failed {c.get('failed', 0)}  {view.status.value}"
        if p := view.progress:
            total = p.get("total_steps") or "?"
            detail = f"step {p.get('step')}/{total}  loss {_f(p.get('loss'))}  eval {_f(p.get('eval_loss'))}"
        assert self._task is not None  # added in __enter__ with the bar
        self._progress.update(self._task, completed=view.done, detail=detail)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()


def _f(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "-"
