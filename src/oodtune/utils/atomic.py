"""Safe output files: atomic writes, temporaries a later run can clean up, and clear errors when a disk is full or
a folder is read-only.

* A file is written to a temporary sibling, fsync'ed and moved into place (``os.replace``), so a crash never leaves
  a truncated file; with ``overwrite=False`` an existing file is never replaced, not even by a concurrent writer.
* New files get the usual permissions (``0o666`` minus the umask), not ``mkstemp``'s ``0o600``.
* Temporary names carry the host and process id of their writer (``.NAME.tmp-HOST-PID-RANDOM``); a process killed
  with ``kill -9`` cannot remove its own, so every later write into the same folder removes those whose writer is
  no longer running (:func:`remove_stale_temporaries`).
* A full disk, a quota, a read-only folder or a file where a folder should be become a :class:`StorageError` that
  names the path and the fix (:func:`storage_error`), instead of whatever the writing library raised.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ..errors import StorageError

__all__ = [
    "check_writable", "csv_text", "ensure_folder", "file_sha256", "remove_stale_temporaries", "storage_error",
    "storage_errors", "temporary_path", "write_atomic", "write_csv", "write_text_atomic",
]

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:40]
_TEMPORARY = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9]*)-(?P<pid>\d+)-[0-9a-f]+$")

#: errno -> what it means for an output, in words.
_NO_SPACE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "the file is larger than this system allows (file size limit)"}
_NOT_WRITABLE = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                 errno.EROFS: "the file system is read-only",
                 errno.ENOTDIR: "a part of the path is a file, not a folder"}


def temporary_path(path: str | os.PathLike) -> Path:
    """A new name beside ``path`` for a temporary file or folder, tagged with this host and process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries (see :func:`temporary_path`) in ``folder`` whose writer, a process on this host, is no
    longer running; returns what was removed. Temporaries of live processes and of other hosts are kept."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(os.fspath(folder)))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMPORARY.match(entry.name)
        if m is None or m["host"] != _HOST or int(m["pid"]) == os.getpid() or _running(int(m["pid"])):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def storage_error(exc: BaseException, path: str | os.PathLike, fix: str = "") -> StorageError | None:
    """A :class:`StorageError` naming ``path``, the reason and ``fix`` when ``exc`` (or an exception it was raised
    from or during, e.g. torch's ``RuntimeError`` around an ``OSError``) is a full disk or an unwritable location;
    else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, StorageError):
            return seen
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE:
            return StorageError(f"cannot write {path}: {_NO_SPACE[seen.errno]}. Free some space"
                                f"{' or ' + fix if fix else ''}; the previous file, if any, is unchanged.")
        if isinstance(seen, OSError) and seen.errno in _NOT_WRITABLE:
            where = f" ({seen.filename})" if seen.filename else ""
            return StorageError(f"cannot write {path}: {_NOT_WRITABLE[seen.errno]}{where}. "
                                f"{fix[:1].upper() + fix[1:] if fix else 'Choose a writable location'}.")
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def storage_errors(path: str | os.PathLike, fix: str = "") -> Iterator[None]:
    """Within this block, a full disk or an unwritable location becomes a :class:`StorageError` about ``path``
    (see :func:`storage_error`); other exceptions pass unchanged."""
    try:
        yield
    except BaseException as exc:
        error = storage_error(exc, path, fix)
        if error is None or error is exc:
            raise
        raise error from exc


def ensure_folder(folder: str | os.PathLike, fix: str = "") -> Path:
    """Create ``folder`` (and its parents) if needed; a file in the way or a read-only parent is a StorageError."""
    folder = Path(folder)
    try:
        with storage_errors(folder, fix):
            folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StorageError(f"{folder} is a file, not a folder; {fix or 'choose another location'}.") from None
    return folder


def check_writable(folder: str | os.PathLike, fix: str = "") -> Path:
    """Make sure files can be created in ``folder`` (creating it if needed) before any work is spent: a
    :class:`StorageError` names the problem otherwise."""
    folder = ensure_folder(folder, fix)
    probe = temporary_path(folder / "write-test")
    with storage_errors(folder, fix):
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    probe.unlink(missing_ok=True)
    return folder


def _place(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``path``; without ``overwrite``, atomically refuse an existing ``path``."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists, even if another writer created it a moment ago
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) or choose another output path.") \
            from None
    except OSError:  # no hard links on this file system: check, then replace
        if path.exists():
            raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) or choose another output "
                                  "path.") from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], object], *, overwrite: bool = True) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, fsync it and move it into place (module docstring).

    With ``overwrite=False`` an existing ``path`` raises FileExistsError instead of being replaced. On any
    error (or interrupt) the temporary file is removed and ``path`` is left as it was; a full disk or an
    unwritable folder raises :class:`StorageError`.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) or choose another output path.")
    ensure_folder(path.parent)
    remove_stale_temporaries(path.parent)
    tmp = temporary_path(path)
    try:
        with storage_errors(path):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            _place(tmp, path, overwrite)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
def file_sha256(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of the bytes of ``path`` (identifies a checkpoint by its content, not its name)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
