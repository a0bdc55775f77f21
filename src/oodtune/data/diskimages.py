"""Decoded images that stay on disk: a ``.npy`` file of shape (N, H, W, 3) uint8, read a batch at a time.

The file is a plain numpy ``.npy`` array, so ``np.load(path, mmap_mode="r")`` maps it; oodtune itself reads the
rows a batch needs with positional reads (``os.pread``) of runs of consecutive rows. Pages read that way live in the
operating system's page cache, which the kernel shrinks under pressure, and never in the process: a memory map
would count every page it touched towards the process's resident memory until the map is closed, so a pass over a
15 GB set would show a 15 GB process. Peak memory therefore stays at a few batches whatever the size of the set.

:class:`DiskImages` looks like the ``images`` array of an :class:`~oodtune.data.imageset.ImageSet` where that
matters (``len``, ``shape``, ``dtype``, indexing returns in-memory arrays); :meth:`DiskImages.view` is a lazy
subset (a seeded subsample or a held-out part of a large set costs no pixels).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from oodtune.errors import DataError

__all__ = ["DiskImages", "read_npy_header"]


def read_npy_header(path: Path) -> tuple[tuple[int, ...], int]:
    """(shape, byte offset of the data) of a C-ordered uint8 ``.npy`` file; DataError for anything else."""
    with open(path, "rb") as fh:
        try:
            major, _ = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fh)
        except ValueError as exc:
            raise DataError(f"{path}: not a .npy array ({exc}).") from None
        if fortran or dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise DataError(f"{path}: expected a C-ordered uint8 (N, H, W, 3) array, got {dtype} {shape}.")
        return tuple(int(s) for s in shape), fh.tell()


class DiskImages:
    """Rows ``index`` (default: all) of the (N, H, W, 3) uint8 ``.npy`` file at ``path`` (see module docstring).

    ``fingerprint`` is the content fingerprint of the whole file's set (the :meth:`ImageSet.fingerprint
    <oodtune.data.imageset.ImageSet.fingerprint>` it would have in memory, recorded when the file was written).
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, path: str | os.PathLike, fingerprint: str, index: np.ndarray | None = None) -> None:
        self.path = Path(path)
        self._base_shape, self._offset = read_npy_header(self.path)
        expected = self._offset + int(np.prod(self._base_shape))
        if self.path.stat().st_size != expected:
            raise DataError(f"{self.path}: {self.path.stat().st_size} bytes, expected {expected}; the file is "
                            "truncated. Delete it (it is a cache entry) and load the data again.")
        self.base_fingerprint = fingerprint
        self.index = None if index is None else np.asarray(index, dtype=np.int64)
        if self.index is not None and self.index.size and (self.index.min() < 0 or
                                                           self.index.max() >= self._base_shape[0]):
            raise IndexError(f"rows out of range for {self._base_shape[0]} images")
        self._fd: int | None = None
        self._lock = threading.Lock()
        self.bytes_read = 0  # counted for tests and benchmarks (a rank of a data-parallel run reads its shard)

    # -- array-like -------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        n = self._base_shape[0] if self.index is None else len(self.index)
        return (n, *self._base_shape[1:])  # type: ignore[return-value]

    @property
    def image_bytes(self) -> int:
        """Bytes of one decoded image (H * W * 3)."""
        return int(np.prod(self._base_shape[1:]))

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.image_bytes

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple[Any, ...] = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            out = self.read(np.asarray([int(key)]))[0]
        else:
            rows = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key)
            if rows.dtype == np.bool_:
                rows = np.flatnonzero(rows)
            out = self.read(rows)
        return out[(slice(None), *rest)] if rest and out.ndim == 4 else out[rest] if rest else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Every image in memory (what ``np.asarray`` gives); avoid it for large sets."""
        arr = self.read(np.arange(len(self)))
        return arr if dtype is None else arr.astype(dtype)

    def view(self, rows: np.ndarray) -> DiskImages:
        """The lazy subset ``self[rows]``: no pixels are read."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"rows out of range for {len(self)} images")
        rows = np.where(rows < 0, rows + len(self), rows)
        index = rows if self.index is None else self.index[rows]
        return DiskImages(self.path, self.base_fingerprint, index)

    def fingerprint(self) -> str:
        """The recorded content fingerprint for the whole file; for a subset, a digest of that and its rows."""
        if self.index is None:
            return self.base_fingerprint
        h = hashlib.sha256(f"{self.base_fingerprint}|rows".encode())
        h.update(np.ascontiguousarray(self.index).data)
        return h.hexdigest()

    # -- reading ----------------------------------------------------------------------------------
    def _descriptor(self) -> int:
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            return self._fd

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Images ``rows`` (positions in this view, in the order given) as a new (len(rows), H, W, 3) array.

        Rows are sorted and runs of consecutive file rows are read with one ``pread`` each."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = len(self)
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"rows out of range for {n} images")
        rows = np.where(rows < 0, rows + n, rows)
        file_rows = rows if self.index is None else self.index[rows]
        out = np.empty((len(rows), *self._base_shape[1:]), dtype=np.uint8)
        if not rows.size:
            return out
        order = np.argsort(file_rows, kind="stable")
        sorted_rows = file_rows[order]
        flat = out.reshape(len(rows), -1)
        fd, size = self._descriptor(), self.image_bytes
        breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True):
            first, count = int(sorted_rows[start]), int(stop - start)
            data = os.pread(fd, count * size, self._offset + first * size)
            if len(data) != count * size:
                raise DataError(f"{self.path}: short read (the file changed or was truncated); delete this cache "
                                "entry and load the data again.")
            flat[order[start:stop]] = np.frombuffer(data, dtype=np.uint8).reshape(count, size)
        self.bytes_read += len(rows) * size
        return out

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """Consecutive in-memory chunks of ``size`` images, in order."""
        for start in range(0, len(self), size):
            yield self.read(np.arange(start, min(start + size, len(self))))

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        with contextlib.suppress(OSError, TypeError, AttributeError):  # also at interpreter shutdown
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fd"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DiskImages({self.path.name}, shape={self.shape})"
