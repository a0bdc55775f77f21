"""Safe extraction of tar / tar.gz / zip archives into the cache (never next to the source).

Every member is checked *before* anything is written: absolute paths, ``..`` components, links whose
target leaves the destination, and device/FIFO members are rejected with :class:`DataError` naming the
archive and the member. On top of that, tar archives are extracted with the standard library's
``data`` filter where available (Python >= 3.11.4 / 3.12), which enforces the same rules again.

Extraction happens in a temporary sibling directory that is renamed into place only when complete, so a
crash never leaves a half-extracted tree that later loads would trust.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

from oodtune.data.cache import file_fingerprint
from oodtune.errors import DataError

#: Suffixes recognised as archives (case-insensitive).
ARCHIVE_SUFFIXES: tuple[str, ...] = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip")


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


def _check_link(archive: Path, name: str, member_path: str, target: str, hard: bool) -> None:
    """A link target must stay inside the destination (symlinks: relative to the member's folder)."""
    t = target.replace("\\", "/")
    if t.startswith("/") or (len(t) > 1 and t[1] == ":"):
        raise _unsafe(archive, name, f"link to absolute path {target!r}")
    base = "" if hard else posixpath.dirname(member_path)
    resolved = posixpath.normpath(posixpath.join(base, t))
    if resolved == ".." or resolved.startswith("../") or resolved.startswith("/"):
        raise _unsafe(archive, name, f"link target {target!r} escapes the extraction folder")


def check_tar_members(archive: Path, tf: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """All members of ``tf`` after validation (raises :class:`DataError` on the first unsafe one)."""
    members = tf.getmembers()
    for m in members:
        path = _check_name(archive, m.name)
        if m.issym() or m.islnk():
            _check_link(archive, m.name, path, m.linkname, hard=m.islnk())
        elif not (m.isfile() or m.isdir()):
            raise _unsafe(archive, m.name, "device, FIFO or other special file")
    return members


def check_zip_members(archive: Path, zf: zipfile.ZipFile) -> None:
    """Validate every member of ``zf`` (zip symlinks are checked like tar symlinks)."""
    for info in zf.infolist():
        path = _check_name(archive, info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            _check_link(archive, info.filename, path, zf.read(info).decode("utf-8", "replace"), hard=False)


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract ``archive`` into the (new or empty) folder ``dest`` after checking every member."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                check_zip_members(archive, zf)
                for info in zf.infolist():
                    target = (dest / _check_name(archive, info.filename)).resolve()
                    if not target.is_relative_to(dest.resolve()):  # own check, belt and braces
                        raise _unsafe(archive, info.filename, "resolves outside the extraction folder")
                    zf.extract(info, dest)
        else:
            with tarfile.open(archive) as tf:
                members = check_tar_members(archive, tf)
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(dest, members=members, filter="data")
                else:  # pragma: no cover - old Python without extraction filters; our checks above apply
                    tf.extractall(dest, members=members)  # noqa: S202 - every member validated above
    except DataError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, UnicodeError) as exc:
        raise DataError(
            f"{archive}: cannot extract archive ({type(exc).__name__}: {exc}). The file is corrupt or "
            "incomplete: download it again (compare its checksum) and place it in the data root."
        ) from None
    return dest


def extract_cached(archive: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Extract ``archive`` once into ``cache_dir/extracted/<stem>-<fingerprint>/`` and return that folder.

    Re-uses a previous complete extraction of the same archive version (path, size, mtime).
    """
    archive = Path(archive)
    if not archive.is_file():
        raise DataError(f"{archive}: archive not found. Place the file there or point the data root elsewhere.")
    final = Path(cache_dir) / "extracted" / f"{archive_stem(archive)}-{file_fingerprint(archive)[:16]}"
    if final.is_dir():
        return final
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        safe_extract(archive, tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # another process won the race: fine; otherwise re-raise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
