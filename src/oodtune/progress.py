"""Progress bars (rich) with rate and ETA for every long step: decoding, training, scoring."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def progress_enabled() -> bool:
    """Bars are on unless ``OODTUNE_PROGRESS=0`` (handy in CI logs and tests)."""
    return os.environ.get("OODTUNE_PROGRESS", "1") != "0"


class Bar:
    """One progress bar: ``advance(n)`` steps, ``update(rate=..., description=...)`` its fields, ``console`` to print
    above it."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: float = 1) -> None:
        self._progress.advance(self._task, n)

    def update(self, **fields: Any) -> None:
        self._progress.update(self._task, **fields)

    @property
    def console(self) -> Console:
        return self._progress.console


@contextmanager
def progress_bar(description: str, total: int | None, unit: str = "img") -> Iterator[Bar]:
    """A started progress bar (rich): bar, count, rate in ``unit``/s, elapsed and ETA; ``total=None`` when unknown.

    Disabled (but still usable) when ``progress_enabled()`` is false.
    """
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    bar = Progress(*columns, console=console, disable=not progress_enabled(), refresh_per_second=4,
                   transient=not sys.stderr.isatty())
    task = bar.add_task(description, total=total, rate="")
    with bar:
        yield Bar(bar, task)


def format_rate(count: float, seconds: float, unit: str = "img") -> str:
    """'12,345 img/s' style text for a throughput."""
    return f"{count / max(seconds, 1e-9):,.0f} {unit}/s"
