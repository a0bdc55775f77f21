"""Atomic file writes: a crash or error never leaves a truncated file, and nothing is silently replaced."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


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


def file_sha256(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of the bytes of ``path`` (identifies a checkpoint by its content, not its name)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
