"""What the on-disk cache holds, and removing it: ``oodtune cache``.

The cache folder (:func:`~oodtune.data.cache.default_cache_dir`: ``$OODTUNE_CACHE``, else ``~/.cache/oodtune``)
has one sub-folder per kind: ``images`` (decoded image sets), ``segmentation`` (decoded frames and label maps),
``extracted`` (archives unpacked once), ``trunk`` (frozen segmentation trunk features, the largest:
:mod:`oodtune.training.trunk_cache`), and any other a later version adds. An *entry* is what one data set, split and
size (or one archive, or one frozen trunk) put there: the files sharing a name up to its first dot, or one
sub-folder. Everything in the cache is rebuilt on demand, so removing an entry only costs the time to rebuild it;
a process using an entry while it is removed keeps reading the files it has open (on POSIX systems), and a later
run rebuilds the entry.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .cache import default_cache_dir

__all__ = ["CacheEntry", "cache_entries", "remove_entries"]


@dataclass(frozen=True)
class CacheEntry:
    """One entry of the cache: its kind (sub-folder), name, files, disk usage in bytes (allocated blocks, what
    removing it frees) and newest modification time."""

    kind: str
    name: str
    paths: tuple[Path, ...]
    size: int
    modified: float  # seconds since the epoch, the newest file's

    def age_days(self, now: float | None = None) -> float:
        return ((time.time() if now is None else now) - self.modified) / 86400


def _walk(path: Path) -> tuple[int, float]:
    """(disk usage in bytes, newest mtime) of a file or a folder and everything under it (links not followed)."""
    st = path.lstat()
    size, newest = st.st_blocks * 512, st.st_mtime
    if path.is_dir() and not path.is_symlink():
        for child in path.rglob("*"):
            st = child.lstat()
            size, newest = size + st.st_blocks * 512, max(newest, st.st_mtime)
    return size, newest


def cache_entries(root: str | Path | None = None) -> list[CacheEntry]:
    """Every entry of the cache at ``root`` (default: :func:`~oodtune.data.cache.default_cache_dir`), by kind and
    name (module docstring); an absent cache has none."""
    base = Path(root) if root is not None else default_cache_dir()
    if not base.is_dir():
        return []
    entries: list[CacheEntry] = []
    for kind in sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink()):
        groups: dict[str, list[Path]] = {}
        for child in sorted(kind.iterdir()):
            groups.setdefault(child.name.split(".", 1)[0] or child.name, []).append(child)
        for name, paths in groups.items():
            walked = [_walk(p) for p in paths]
            entries.append(CacheEntry(kind.name, name, tuple(paths), sum(w[0] for w in walked),
                                      max(w[1] for w in walked)))
    return entries


def remove_entries(kinds: list[str], *, root: str | Path | None = None,
                   older_than_days: float | None = None) -> list[CacheEntry]:
    """Remove the entries of the named ``kinds`` (``all``: every kind) not modified for ``older_than_days`` (None:
    every one); returns what was removed. A kind the cache does not hold is a ConfigError naming the kinds it has."""
    entries = cache_entries(root)
    present = sorted({e.kind for e in entries})
    unknown = [k for k in kinds if k != "all" and k not in present]
    if unknown:
        raise ConfigError(f"the cache holds no {', '.join(map(repr, unknown))} entries; its kinds are "
                          f"{', '.join(present) or 'none (it is empty)'}, or all.")
    now = time.time()
    chosen = [e for e in entries if ("all" in kinds or e.kind in kinds)
              and (older_than_days is None or e.age_days(now) > older_than_days)]
    for entry in chosen:
        for path in entry.paths:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    return chosen
