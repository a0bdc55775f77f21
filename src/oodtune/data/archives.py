"""Safe extraction of tar / tar.gz / zip archives into the cache (never next to the source).

Every member is checked *before* anything is written, on every Python version (the standard library's ``data``
filter, applied on top where it exists, is a second line of defence, not the first):

* absolute paths, ``..`` components, device/FIFO members;
* links: a link target must stay inside the destination, and no member — file, folder or link, nor any link's
  target — may pass *through* a link member (a chain like ``a -> .``, ``a/b -> ..`` would otherwise walk out of
  the destination one harmless-looking step at a time);
* size (archive bombs): the total uncompressed size, the ratio of that to the archive's size, and the number of
  members are bounded by :class:`ExtractLimits` (defaults, or ``OODTUNE_MAX_EXTRACT_BYTES`` /
  ``OODTUNE_MAX_EXTRACT_RATIO`` / ``OODTUNE_MAX_EXTRACT_MEMBERS``), and the free space must suffice.

A refused archive raises :class:`DataError` saying which member and why. Extraction happens in a temporary
sibling folder that is renamed into place only when complete and removed on any failure, so a crash or a refusal
never leaves a half-extracted tree that later loads would trust.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from oodtune.data.cache import file_fingerprint
from oodtune.errors import DataError
from oodtune.utils.atomic import ensure_folder, remove_stale_temporaries, storage_error, temporary_path

#: Suffixes recognised as archives (case-insensitive).
ARCHIVE_SUFFIXES: tuple[str, ...] = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip")
#: The standard library's extraction filter (Python >= 3.11.4), applied after our own checks where it exists.
_DATA_FILTER = hasattr(tarfile, "data_filter")
_FILTER_ERRORS: tuple[type[Exception], ...] = (tarfile.FilterError,) if hasattr(tarfile, "FilterError") else ()
_GIB, _MIB = 2**30, 2**20


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds on what one archive may expand to (archive bombs). The ratio is checked only once the total exceeds
    ``ratio_floor`` bytes, so small archives are never refused for compressing well."""

    max_bytes: int = 64 * _GIB
    max_ratio: float = 200.0
    max_members: int = 1_000_000
    ratio_floor: int = 32 * _MIB

    @classmethod
    def from_env(cls) -> ExtractLimits:
        """The defaults, overridden by ``OODTUNE_MAX_EXTRACT_BYTES`` / ``_RATIO`` / ``_MEMBERS``."""
        def read(name: str, default: float, kind: type) -> float:
            raw = os.environ.get(name)
            if raw is None:
                return default
            try:
                value = kind(float(raw))
            except ValueError:
                value = -1
            if value <= 0:
                raise DataError(f"{name}={raw!r} must be a positive number.")
            return value

        d = cls()
        return cls(max_bytes=int(read("OODTUNE_MAX_EXTRACT_BYTES", d.max_bytes, int)),
                   max_ratio=read("OODTUNE_MAX_EXTRACT_RATIO", d.max_ratio, float),
                   max_members=int(read("OODTUNE_MAX_EXTRACT_MEMBERS", d.max_members, int)))

    def check(self, archive: Path, size: int, members: int, total: int) -> None:
        """Raise when ``members`` entries of ``total`` uncompressed bytes (from an archive of ``size`` bytes) exceed
        a bound."""
        size = max(size, 1)
        if members > self.max_members:
            self._refuse(archive, f"it has more than {self.max_members:,} members", "OODTUNE_MAX_EXTRACT_MEMBERS")
        if total > self.max_bytes:
            self._refuse(archive, f"it expands to more than {_human(self.max_bytes)}", "OODTUNE_MAX_EXTRACT_BYTES")
        if total > self.ratio_floor and total / size > self.max_ratio:
            self._refuse(archive, f"it expands to {_human(total)} or more, {total / size:,.0f} times its size on disk "
                         f"(limit {self.max_ratio:g} times)", "OODTUNE_MAX_EXTRACT_RATIO")

    @staticmethod
    def _refuse(archive: Path, why: str, env: str) -> None:
        raise DataError(f"{archive}: refusing to extract: {why}, which looks like an archive bomb. If you trust "
                        f"this archive, raise the limit (env {env}) or extract it yourself.")


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def is_archive(path: str | os.PathLike) -> bool:
    """True when ``path`` names a file with an archive suffix."""
    name = Path(path).name.lower()
    return any(name.endswith(s) for s in ARCHIVE_SUFFIXES)


def archive_stem(path: str | os.PathLike) -> str:
    """File name without its archive suffix (``cifar10-jpg.tar.gz`` -> ``cifar10-jpg``)."""
    name = Path(path).name
    for s in ARCHIVE_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def _unsafe(archive: Path, member: str, why: str) -> DataError:
    return DataError(
        f"{archive}: refusing to extract member {member!r}: {why}. The archive is malformed or malicious; "
        "obtain a clean copy of the dataset archive (or extract it yourself after inspecting it)."
    )


def _check_name(archive: Path, name: str) -> str:
    """Validate a member name; return it normalised (POSIX, no leading ``./``)."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        raise _unsafe(archive, name, "absolute path")
    parts = [p for p in clean.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _unsafe(archive, name, "path contains '..'")
    return "/".join(parts)


def _through_link(path: str, links: set[str]) -> str | None:
    """The first link member that ``path`` passes through (a proper prefix of it), if any."""
    parts = path.split("/")
    return next((p for p in ("/".join(parts[:i]) for i in range(1, len(parts))) if p in links), None)


def _check_link(archive: Path, name: str, member_path: str, target: str, hard: bool, links: set[str]) -> None:
    """A link target must stay inside the destination (symlinks: relative to the member's folder) and must not
    pass through, or be, another link: each step is followed as the file system would follow it."""
    t = target.replace("\\", "/")
    if t.startswith("/") or (len(t) > 1 and t[1] == ":"):
        raise _unsafe(archive, name, f"link to absolute path {target!r}")
    walked = [] if hard else [p for p in posixpath.dirname(member_path).split("/") if p]
    for part in t.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not walked:
                raise _unsafe(archive, name, f"link target {target!r} escapes the extraction folder")
            walked.pop()
            continue
        walked.append(part)
        if "/".join(walked) in links:
            raise _unsafe(archive, name, f"link target {target!r} passes through the link {'/'.join(walked)!r}")


def check_members(archive: Path, members: Iterable[tuple[str, str | None, bool, bool]]) -> None:
    """Validate ``(name, link_target | None, is_hard_link, is_special)`` members (see the module docstring)."""
    members = list(members)
    paths = [_check_name(archive, name) for name, *_ in members]
    links = {p for p, (_, target, _, _) in zip(paths, members, strict=True) if target is not None}
    counts = Counter(paths)
    for path, (name, target, hard, special) in zip(paths, members, strict=True):
        through = _through_link(path, links)
        if through is not None:
            raise _unsafe(archive, name, f"its path passes through the link member {through!r}")
        if path in links and counts[path] > 1:
            raise _unsafe(archive, name, "a link and another member share this path")
        if target is not None:
            _check_link(archive, name, path, target, hard, links)
        elif special:
            raise _unsafe(archive, name, "device, FIFO or other special file")


def _tar_members(archive: Path, tf: tarfile.TarFile, limits: ExtractLimits) -> list[tarfile.TarInfo]:
    """The members of ``tf``, read header by header so that an archive bomb is stopped at the first bound."""
    members, total, size = [], 0, archive.stat().st_size
    for m in tf:
        members.append(m)
        total += m.size
        limits.check(archive, size, len(members), total)
    check_members(archive, ((m.name, m.linkname if (m.issym() or m.islnk()) else None, m.islnk(),
                             not (m.isfile() or m.isdir() or m.issym() or m.islnk())) for m in members))
    return members


def _zip_members(archive: Path, zf: zipfile.ZipFile, limits: ExtractLimits) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    limits.check(archive, archive.stat().st_size, len(infos), sum(i.file_size for i in infos))
    check_members(archive, ((i.filename, zf.read(i).decode("utf-8", "replace") if stat.S_ISLNK(i.external_attr >> 16)
                             else None, False, False) for i in infos))
    return infos


def _check_space(archive: Path, dest: Path, needed: int) -> None:
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise DataError(f"{archive}: extracting it needs {_human(needed)} but only {_human(free)} are free in "
                        f"{dest}; free some space or set OODTUNE_CACHE to a folder on a larger disk.")


def _extract_into(archive: Path, dest: Path, limits: ExtractLimits) -> None:
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            infos = _zip_members(archive, zf, limits)
            _check_space(archive, dest, sum(i.file_size for i in infos))
            for info in infos:
                target = (dest / _check_name(archive, info.filename)).resolve()
                if not target.is_relative_to(dest.resolve()):  # own check, belt and braces
                    raise _unsafe(archive, info.filename, "resolves outside the extraction folder")
                zf.extract(info, dest)
        return
    with tarfile.open(archive) as tf:
        members = _tar_members(archive, tf, limits)
        _check_space(archive, dest, sum(m.size for m in members))
        if _DATA_FILTER:
            tf.extractall(dest, members=members, filter="data")
        else:  # Python < 3.11.4: no extraction filters; every member was validated above
            tf.extractall(dest, members=members)  # noqa: S202


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike, limits: ExtractLimits | None = None) -> Path:
    """Extract ``archive`` into ``dest`` (a new or empty folder) after checking every member and the size bounds
    (module docstring). If ``dest`` holds an extraction when we finish (a concurrent process was faster), that
    one is kept."""
    archive, dest = Path(archive), Path(dest)
    limits = limits or ExtractLimits.from_env()
    if dest.is_dir() and any(dest.iterdir()):
        raise DataError(f"{dest} is not empty; extract {archive.name} into a new folder.")
    fix = "set OODTUNE_CACHE to a writable folder with enough space"
    ensure_folder(dest.parent, fix)
    tmp = temporary_path(dest)
    try:
        tmp.mkdir()
        _extract_into(archive, tmp, limits)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest.is_dir() and any(dest.iterdir())):
                raise
    except DataError:
        raise
    except _FILTER_ERRORS as exc:  # the standard library's filter refused a member our checks let through
        raise _unsafe(archive, getattr(getattr(exc, "tarinfo", None), "name", "?"), str(exc)) from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, UnicodeError) as exc:
        error = storage_error(exc, dest, fix)
        if error is not None:
            raise error from exc
        raise DataError(
            f"{archive}: cannot extract archive ({type(exc).__name__}: {exc}). The file is corrupt or "
            "incomplete: download it again (compare its checksum) and place it in the data root."
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def extract_cached(archive: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Extract ``archive`` once into ``cache_dir/extracted/<stem>-<fingerprint>/`` and return that folder.

    Re-uses a previous complete extraction of the same archive version (path, size, mtime).
    """
    archive = Path(archive)
    if not archive.is_file():
        raise DataError(f"{archive}: archive not found. Place the file there or point the data root elsewhere.")
    final = Path(cache_dir) / "extracted" / f"{archive_stem(archive)}-{file_fingerprint(archive)[:16]}"
    remove_stale_temporaries(final.parent)  # half-extracted trees of killed processes
    if final.is_dir():
        return final
    return safe_extract(archive, final)
