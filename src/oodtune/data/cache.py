"""On-disk cache of decoded datasets, outside the repository: each entry is a uint8 ``.npy`` array of the images
(memory-mappable) and a small ``.npz`` beside it (labels, class names, display name, content fingerprint).

Location: ``cache_dir`` argument, else ``$OODTUNE_CACHE``, else ``~/.cache/oodtune``. Entries are keyed by
dataset name, split, resolution and a fingerprint of the source (paths, sizes, mtimes), so editing or
replacing the source re-decodes it. Images are streamed into the ``.npy`` chunk by chunk as they are decoded (a data
set larger than memory is decoded once, never held whole), and both files are written atomically (temporary file,
fsync, ``os.replace``), images first: the ``.npz`` is the entry's commit mark, and an entry whose images are missing,
truncated or of another shape is rebuilt. A cache that cannot be written (read-only, full) only costs a re-decode
next time, with a warning.

A set whose decoded images fit in :func:`in_memory_limit` bytes (``$OODTUNE_IN_MEMORY_MB``, default 2048) is
loaded into memory; a larger one stays on disk (:class:`~oodtune.data.diskimages.DiskImages`) and training,
evaluation, calibration and prediction read it a batch at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import numpy as np

from oodtune.data.diskimages import DiskImages
from oodtune.data.imageset import ImageSet
from oodtune.errors import DataError
from oodtune.utils.atomic import remove_stale_temporaries, write_atomic

#: Bump when decoding rules change so old cache entries are ignored.
CACHE_VERSION = 2
#: Default of :func:`in_memory_limit`, in MiB.
DEFAULT_IN_MEMORY_MB = 2048


def default_cache_dir() -> Path:
    """``$OODTUNE_CACHE`` if set, else ``~/.cache/oodtune``."""
    env = os.environ.get("OODTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "oodtune"


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The cache folder to use for an explicit ``cache_dir`` or the default; a file in its place is an error."""
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"the cache folder {path} (env OODTUNE_CACHE, or cache_dir=) cannot be created: {existing} is "
                        "a file. Point OODTUNE_CACHE at a folder (the default is ~/.cache/oodtune).")
    return path


def _stat_token(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def file_fingerprint(path: str | os.PathLike) -> str:
    """Hex digest of a file's absolute path, size and mtime."""
    return hashlib.sha256(_stat_token(Path(path)).encode()).hexdigest()


def files_fingerprint(paths: Iterable[str | os.PathLike]) -> str:
    """Hex digest over the (ordered) path, size and mtime of many files."""
    h = hashlib.sha256()
    for p in paths:
        h.update(_stat_token(Path(p)).encode())
        h.update(b"\n")
    return h.hexdigest()


def cache_file(cache_dir: Path, name: str, split: str, resolution: int, fingerprint: str) -> Path:
    """Path of the cache entry for one (dataset, split, resolution, source) combination."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return cache_dir / "images" / f"{safe}-{split}-{resolution}px-v{CACHE_VERSION}-{fingerprint[:20]}.npz"


def in_memory_limit() -> int:
    """Largest decoded set (bytes) loaded into memory: ``$OODTUNE_IN_MEMORY_MB`` MiB (default 2048); larger sets
    stay on disk and are read a batch at a time."""
    env = os.environ.get("OODTUNE_IN_MEMORY_MB")
    try:
        mib = float(env) if env else DEFAULT_IN_MEMORY_MB
    except ValueError:
        raise DataError(f"OODTUNE_IN_MEMORY_MB={env!r} is not a number; give the size in MiB (e.g. 2048).") from None
    return int(mib * 2**20)


def images_file(path: Path) -> Path:
    """The ``.npy`` images file of the cache entry whose metadata is ``path`` (``.npz``)."""
    return path.with_suffix(".images.npy")


def load_cached(path: Path) -> ImageSet | None:
    """The cached ImageSet at ``path`` (in memory or on disk, see the module docstring), or None when absent. A
    damaged or incomplete entry is deleted and ignored, and so are temporaries that killed writers left beside it."""
    remove_stale_temporaries(path.parent)
    images_path = images_file(path)
    if not path.is_file() or not images_path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            labels = z["labels"] if "labels" in z.files else None
            classes, name = tuple(str(c) for c in z["classes"]), str(z["name"])
            fingerprint, shape = str(z["fingerprint"]), tuple(int(v) for v in z["shape"])
        disk = DiskImages(images_path, fingerprint)
        if disk.shape != shape:
            raise DataError(f"{images_path}: shape {disk.shape}, recorded {shape}")
        images = disk if disk.nbytes > in_memory_limit() else np.load(images_path, allow_pickle=False)
        return ImageSet(images=images, labels=labels, classes=classes, name=name)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, DataError):
        path.unlink(missing_ok=True)
        images_path.unlink(missing_ok=True)
        return None


def _write_npy(fh: IO[bytes], shape: tuple[int, ...], chunks: Iterable[np.ndarray], digest: hashlib._Hash) -> None:
    """A uint8 ``.npy`` of ``shape`` from consecutive ``chunks`` (each also fed to ``digest``)."""
    np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": shape})
    written = 0
    for chunk in chunks:
        data = np.ascontiguousarray(chunk, dtype=np.uint8)
        if data.shape[1:] != shape[1:]:
            raise DataError(f"decoded chunk of shape {data.shape} does not fit {shape}")
        digest.update(data.data)
        fh.write(data.data)
        written += len(data)
    if written != shape[0]:
        raise DataError(f"decoded {written} images, expected {shape[0]}")


def store_chunks(path: Path, shape: tuple[int, int, int, int], chunks: Iterable[np.ndarray],
                 labels: np.ndarray | None, classes: tuple[str, ...], name: str) -> bool:
    """Write a cache entry from image ``chunks`` (consecutive, together ``shape``), atomically (module docstring);
    the content fingerprint is computed on the way, exactly as :meth:`ImageSet.fingerprint` would. Returns False
    (with a warning) when the cache cannot be written."""
    digest = hashlib.sha256(json.dumps([list(shape), list(classes)]).encode())
    if labels is not None:
        labels = np.ascontiguousarray(labels, dtype=np.int64)
    try:
        write_atomic(images_file(path), lambda fh: _write_npy(fh, shape, chunks, digest))
        if labels is not None:
            digest.update(b"labels")
            digest.update(labels.data)
        arrays: dict[str, np.ndarray] = {
            "classes": np.asarray(classes, dtype=str) if classes else np.zeros(0, dtype="<U1"),
            "name": np.asarray(name), "fingerprint": np.asarray(digest.hexdigest()), "shape": np.asarray(shape),
        }
        if labels is not None:
            arrays["labels"] = labels
        write_atomic(path, lambda fh: np.savez(fh, **arrays))  # type: ignore[arg-type]
    except OSError as exc:
        warnings.warn(f"could not write the data cache {path} ({exc}); data will be decoded again next time. "
                      "Set OODTUNE_CACHE or cache_dir= to a writable folder.", stacklevel=3)
        return False
    return True


def save_cached(path: Path, data: ImageSet) -> None:
    """Write the in-memory set ``data`` to ``path`` atomically (a failure to write only costs a re-decode next
    time)."""
    images = np.asarray(data.images)
    n, h, w, c = images.shape
    chunks = (images[i : i + 4096] for i in range(0, n, 4096))
    store_chunks(path, (n, h, w, c), chunks, data.labels, data.classes, data.name)
