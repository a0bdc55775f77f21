"""Progress for every long step (decoding, training, scoring): rate and ETA.

On a terminal, a rich progress bar (bars started while one is shown join its display). When stderr is not a
terminal (a log file, CI, a pipe), plain one-line reports instead -- ``decoding cifar10: 12,288/50,000 (25%),
1,234 img/s, elapsed 0:00:10, ETA 0:00:30`` -- at most one every :data:`PLAIN_INTERVAL` seconds and one when the
step ends: no control characters, no blank lines, no wrapping at 80 columns. ``OODTUNE_PROGRESS`` chooses:
``0`` off, ``plain`` or ``rich`` forced, anything else (default) by terminal.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time
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

__all__ = [
    "PLAIN_INTERVAL", "Bar", "ConsoleHandler", "console", "format_rate", "progress_bar", "progress_enabled",
    "progress_mode",
]

console = Console(stderr=True, soft_wrap=True)  # messages are never wrapped: paths stay copyable

#: Seconds between two plain progress lines of one step.
PLAIN_INTERVAL = 10.0


def progress_mode() -> str:
    """``off``, ``plain`` or ``rich`` (see the module docstring)."""
    env = os.environ.get("OODTUNE_PROGRESS", "1").strip().lower()
    if env == "0":
        return "off"
    if env in ("plain", "rich"):
        return env
    return "rich" if sys.stderr.isatty() else "plain"


def progress_enabled() -> bool:
    """Progress is shown unless ``OODTUNE_PROGRESS=0`` (handy in tests)."""
    return progress_mode() != "off"


class Bar:
    """One step's progress: ``advance(n)`` units done, ``update(rate=..., description=...)`` its fields."""

    def advance(self, n: float = 1) -> None:
        """``n`` more units done."""

    def update(self, **fields: Any) -> None:
        """Set ``description`` and/or display fields (``rate``)."""


class _RichBar(Bar):
    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: float = 1) -> None:
        self._progress.advance(self._task, n)

    def update(self, **fields: Any) -> None:
        self._progress.update(self._task, **fields)


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class _PlainBar(Bar):
    """One line per :data:`PLAIN_INTERVAL` seconds, written straight to stderr (see the module docstring)."""

    def __init__(self, description: str, total: int | None, unit: str) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.done = 0.0
        self.rate = ""
        self.start = self.last = time.monotonic()
        self.shown = -1.0  # ``done`` at the last report

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        parts = [f"{self.done:,.0f}/{self.total:,}" if self.total else f"{self.done:,.0f} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        if self.rate:
            parts.append(self.rate)
        text = f"{self.description}: {', '.join(parts)}, elapsed {_clock(elapsed)}"
        if self.total and 0 < self.done < self.total:
            text += f", ETA {_clock(elapsed * (self.total - self.done) / self.done)}"
        return text

    def emit(self, final: bool = False) -> None:
        if final and self.shown == self.done:
            return  # the last report already says where the step ended
        sys.stderr.write(self.line() + "\n")
        sys.stderr.flush()
        self.last, self.shown = time.monotonic(), self.done

    def advance(self, n: float = 1) -> None:
        self.done += n
        if time.monotonic() - self.last >= PLAIN_INTERVAL:
            self.emit()

    def update(self, **fields: Any) -> None:
        self.rate = str(fields.get("rate", self.rate))
        self.description = str(fields.get("description", self.description))


_shown: Progress | None = None  # the rich display on screen, which nested bars join


@contextmanager
def progress_bar(description: str, total: int | None, unit: str = "img") -> Iterator[Bar]:
    """Progress of one step of ``total`` units (None when unknown), shown as :func:`progress_mode` says: bar,
    count, rate in ``unit``/s, elapsed and ETA. Always usable; a no-op when progress is off."""
    global _shown
    mode = progress_mode()
    if mode == "off":
        yield Bar()
        return
    if mode == "plain":
        plain = _PlainBar(description, total, unit)
        yield plain
        plain.emit(final=True)
        return
    if _shown is not None:  # nested in a step already on screen: one more line of that display
        task = _shown.add_task(description, total=total, rate="")
        try:
            yield _RichBar(_shown, task)
        finally:
            _shown.remove_task(task)
        return
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
    progress = Progress(*columns, console=console, refresh_per_second=4)
    task = progress.add_task(description, total=total, rate="")
    with progress:
        _shown = progress
        try:
            yield _RichBar(progress, task)
        finally:
            _shown = None


class ConsoleHandler(logging.Handler):
    """A logging handler for command-line programs: each record as one line on the shared stderr console (above
    a progress bar, never wrapped); warnings and errors prefixed with their level."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text, style = self.format(record), None
            if record.levelno >= logging.WARNING:
                text = f"{record.levelname.lower()}: {text}"
                style = "yellow" if record.levelno == logging.WARNING else "red"
            console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)
        except Exception:  # noqa: BLE001 - logging must never raise; the standard handlers report this way too
            self.handleError(record)


def format_rate(count: float, seconds: float, unit: str = "img") -> str:
    """'12,345 img/s' style text for a throughput."""
    return f"{count / max(seconds, 1e-9):,.0f} {unit}/s"
