"""Atomic file writes: a crash or error never leaves a truncated file, and nothing is silently replaced."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], object], *, overwrite: bool = True) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, fsync it and ``os.replace`` it into place.

    With ``overwrite=False`` an existing ``path`` raises FileExistsError instead of being replaced. On any
    error (or interrupt) the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) or choose another output path.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """UTF-8 ``text`` to ``path`` atomically (see ``write_atomic``)."""
    return write_atomic(path, lambda fh: fh.write(text.encode("utf-8")), overwrite=overwrite)


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """``rows`` as CSV text with a header: ``columns``, or every key in the order it first appears."""
    cols = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *,
              overwrite: bool = True) -> Path:
    """:func:`csv_text` of ``rows`` to ``path`` atomically (see ``write_atomic``)."""
    return write_text_atomic(path, csv_text(rows, columns), overwrite=overwrite)
