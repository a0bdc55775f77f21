"""Progress bars (rich) with rate and ETA for every long step: decoding, training, scoring."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def progress_enabled() -> bool:
    """Bars are on unless ``OODTUNE_PROGRESS=0`` (handy in CI logs and tests)."""
    return os.environ.get("OODTUNE_PROGRESS", "1") != "0"


@contextmanager
def progress_bar(description: str, total: int, unit: str = "img") -> Iterator[Progress]:
    """A started rich ``Progress`` with one task (id 0): bar, count, rate in ``unit``/s, elapsed and ETA.

    Callers use ``bar.advance(0, n)`` and ``bar.update(0, description=...)``. Disabled (but still usable)
    when ``progress_enabled()`` is false.
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
    bar.add_task(description, total=total, rate="")
    with bar:
        yield bar


def format_rate(count: float, seconds: float, unit: str = "img") -> str:
    """'12,345 img/s' style text for a throughput."""
    return f"{count / max(seconds, 1e-9):,.0f} {unit}/s"
