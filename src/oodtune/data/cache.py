"""On-disk cache of decoded datasets (uint8 ``.npz``), outside the repository.

Location: ``cache_dir`` argument, else ``$OODTUNE_CACHE``, else ``~/.cache/oodtune``. Entries are keyed by
dataset name, split, resolution and a fingerprint of the source (paths, sizes, mtimes), so editing or
replacing the source re-decodes it. Files are written atomically (temporary file + ``os.replace``); a cache that
cannot be written (read-only, full) only costs a re-decode next time, with a warning.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from oodtune.data.imageset import ImageSet
from oodtune.errors import DataError
from oodtune.utils.atomic import remove_stale_temporaries, write_atomic

#: Bump when decoding rules change so old cache entries are ignored.
CACHE_VERSION = 1


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


def load_cached(path: Path) -> ImageSet | None:
    """The cached ImageSet at ``path``, or None when absent. A damaged entry is deleted and ignored, and so are
    temporaries that killed writers left beside it."""
    remove_stale_temporaries(path.parent)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            labels = z["labels"] if "labels" in z.files else None
            return ImageSet(
                images=z["images"], labels=labels, classes=tuple(str(c) for c in z["classes"]), name=str(z["name"])
            )
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, DataError):
        path.unlink(missing_ok=True)
        return None


def save_cached(path: Path, data: ImageSet) -> None:
    """Write ``data`` to ``path`` atomically (a failure to write only costs a re-decode next time)."""
    arrays: dict[str, np.ndarray] = {
        "images": data.images,
        "classes": np.asarray(data.classes, dtype=str) if data.classes else np.zeros(0, dtype="<U1"),
        "name": np.asarray(data.name),
    }
    if data.labels is not None:
        arrays["labels"] = data.labels
    try:
        write_atomic(path, lambda fh: np.savez(fh, **arrays))  # type: ignore[arg-type]
    except OSError as exc:
        warnings.warn(f"could not write the data cache {path} ({exc}); data will be decoded again next time. "
                      "Set OODTUNE_CACHE or cache_dir= to a writable folder.", stacklevel=3)
