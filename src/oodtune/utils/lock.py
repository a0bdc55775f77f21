"""One writer per output folder.

Two ``oodtune pretrain`` runs into one ``--out`` (or two benchmarks into one folder) would both report success
while one silently loses its work. :func:`output_lock` holds an advisory lock (``fcntl.flock``) on
``FOLDER/.oodtune.lock`` for as long as a command writes there; a second writer gets an
:class:`~oodtune.errors.OutputInUseError` naming the holder's process id. The kernel releases the lock when its
holder exits, however it exits (``kill -9`` included), so a stale lock file never blocks the next run: the file is
only a label for the error message. The lock is re-entrant within a process (the pipeline takes it before loading
data, the trainer again around training) and is taken by rank 0 only in a data-parallel job.

A **shared** lock (``output_lock(folder, shared=True)``) lets several processes write into one folder at once when
each writes only its own part of it — benchmark processes given different ``--only`` rows, whose runs the trainer
locks one by one and whose cached evaluations are content-addressed — while a writer of the whole folder (an
exclusive lock) still waits for none and is refused while any shared holder is alive, and the other way round.
Shared holders leave the lock file in place and its label untouched.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputInUseError
from .atomic import ensure_folder, storage_errors

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no locking, see _acquire
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "output_lock"]

LOCK_NAME = ".oodtune.lock"
_held: dict[Path, int] = {}  # folder -> how many nested output_lock blocks of this process hold it


def _holder_label() -> str:
    command = " ".join(shlex.quote(a) for a in sys.argv)[:300]
    return f"PID {os.getpid()} on {socket.gethostname()} ({command})"


def _acquire(path: Path, shared: bool = False) -> int | None:
    """An open descriptor of ``path`` holding its lock (exclusive, or ``shared``); None when this system cannot lock
    (warned)."""
    if fcntl is None:
        warnings.warn(f"no file locking on this system; make sure no other oodtune process writes into {path.parent}.",
                      stacklevel=4)
        return None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 1000).decode("utf-8", "replace").strip()
            os.close(fd)
            raise OutputInUseError(
                f"{path.parent} is in use by {holder or 'another process'}: two runs writing into one folder would "
                "overwrite each other. Wait for it to finish, or choose another output folder (--out)"
                + (". Benchmark processes with different --only rows or --seed seeds may share a folder; a run of "
                   "the whole grid may not." if shared or not holder else ".")
            ) from None
        except OSError as exc:  # e.g. a network file system without locks
            os.close(fd)
            warnings.warn(f"cannot lock {path} ({exc}); make sure no other oodtune process writes into "
                          f"{path.parent}.", stacklevel=4)
            return None
        try:  # a holder that just finished removes the file: then we locked a file nobody else will see
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            if not shared:
                os.ftruncate(fd, 0)
                os.write(fd, _holder_label().encode())
            return fd
        os.close(fd)


@contextmanager
def output_lock(folder: str | os.PathLike, *, shared: bool = False) -> Iterator[Path]:
    """Hold the lock of output ``folder`` (created if needed) for the block, exclusive or ``shared``; see the module
    docstring.

    A folder this block created and left empty is removed again, so a command that fails early leaves nothing.
    """
    folder = Path(folder)
    if int(os.environ.get("RANK", "0")) != 0:  # data-parallel job: rank 0 is the writer
        yield folder
        return
    existed = folder.exists()
    ensure_folder(folder)
    key = folder.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield folder
        finally:
            _held[key] -= 1
        return
    path = folder / LOCK_NAME
    with storage_errors(folder):
        fd = _acquire(path, shared)
    _held[key] = 1
    try:
        yield folder
    finally:
        del _held[key]
        if fd is not None:
            if not shared:  # a shared holder leaves the file to the others holding it
                path.unlink(missing_ok=True)  # before unlocking: a waiting process re-checks that its file is current
            os.close(fd)
        if not existed:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
