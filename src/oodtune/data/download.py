"""Optional downloads of official archives (only when ``download=True``), verified by MD5."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from oodtune.errors import DataError
from oodtune.utils.atomic import remove_stale_temporaries, temporary_path


@dataclass(frozen=True)
class Remote:
    """An official file: where it lives and its published MD5."""

    url: str
    md5: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


OFFICIAL: dict[str, Remote] = {
    "cifar10": Remote("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": Remote("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    """Hex MD5 of a file."""
    h = hashlib.md5()  # noqa: S324 - integrity check against the published checksum, not security
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(remote: Remote, root: Path, timeout: float = 60.0) -> Path:
    """Download ``remote`` into ``root`` (atomically), check its MD5 and return the file path.

    On any failure raises :class:`DataError` telling the user to fetch the file by hand and place it in
    ``root``.
    """
    from oodtune.utils.progress import progress_bar

    dest = root / remote.filename
    manual = f"Download {remote.url} yourself (md5 {remote.md5}) and place it at {dest}."
    if dest.is_file() and md5sum(dest) == remote.md5:
        return dest
    tmp = temporary_path(dest)
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(root)
        with urllib.request.urlopen(remote.url, timeout=timeout) as resp, open(tmp, "wb") as out:  # noqa: S310
            total = int(resp.headers.get("Content-Length") or 0)
            with progress_bar(f"download {remote.filename}", total=total or None, unit="B") as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    bar.advance(len(block))
        got = md5sum(tmp)
        if got != remote.md5:
            raise DataError(f"{remote.url}: downloaded file has md5 {got}, expected {remote.md5}. {manual}")
        os.replace(tmp, dest)
    except DataError:
        raise
    except (OSError, ValueError) as exc:  # URLError is an OSError
        raise DataError(f"could not download {remote.url} ({type(exc).__name__}: {exc}). {manual}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest
