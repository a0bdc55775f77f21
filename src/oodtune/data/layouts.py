"""Where datasets live and how a found tree becomes a cached :class:`ImageSet`: the helpers every loader shares.

A loader turns a :class:`Request` (name, root, split, resolution, cache) into an ImageSet. The helpers here
find a folder or archive by a :class:`TreeLayout` (official layout first, then mirror layouts; folders before
archives), extract archives safely into the cache, decode every listed file and cache the decoded uint8 array
keyed by (name, split, resolution, source fingerprint). Both :mod:`.registry` (names -> loaders) and
:mod:`.protocol` (the offline protocol's Tiny ImageNet halves) build on them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from oodtune.data.archives import ARCHIVE_SUFFIXES, extract_cached
from oodtune.data.cache import (
    cache_file,
    file_fingerprint,
    files_fingerprint,
    load_cached,
    save_cached,
    store_chunks,
)
from oodtune.data.images import array_to_resolution, decode_files, iter_decoded
from oodtune.data.imageset import ImageSet
from oodtune.data.sources import ArraySet, FileListing, scan_tiny_imagenet
from oodtune.errors import DataError


def default_data_root() -> Path:
    """``$OODTUNE_DATA`` if set, else ``./data`` (relative to the current directory)."""
    env = os.environ.get("OODTUNE_DATA")
    return Path(env).expanduser() if env else Path.cwd() / "data"


@dataclass(frozen=True)
class Request:
    """One ``load_dataset`` call, normalised."""

    name: str
    root: Path
    split: str
    resolution: int
    cache_dir: Path
    download: bool

    @property
    def display_name(self) -> str:
        """Name stored in the ImageSet: ``name`` for the test/only split, else ``name-split``."""
        return self.name if self.split in ("test", "all") else f"{self.name}-{self.split}"


# ------------------------------------------------------------------------------------------ helpers

def cached(req: Request, fingerprint: str, build: Callable[[], ImageSet | FileListing]) -> ImageSet:
    """Return the cache entry for (req, fingerprint) or build, store and return it. A build that returns a
    :class:`FileListing` has its files decoded straight into the cache entry, chunk by chunk (a set larger than
    memory is never held whole; it comes back on disk); where the cache cannot be written it is decoded in memory."""
    path = cache_file(req.cache_dir, req.name, req.split, req.resolution, fingerprint)
    hit = load_cached(path)
    if hit is not None:
        return hit
    data = build()
    if isinstance(data, FileListing):
        shape = (len(data.files), req.resolution, req.resolution, 3)
        chunks = iter_decoded(data.files, req.resolution, description=f"decoding {req.display_name}")
        if store_chunks(path, shape, chunks, data.labels, data.classes, req.display_name):
            stored = load_cached(path)
            if stored is not None:
                return stored
        return decode_listing(req, data)
    save_cached(path, data)
    return data


def from_arrays(req: Request, fingerprint: str, read: Callable[[], ArraySet]) -> ImageSet:
    """Cached ImageSet from an in-memory reader (pickle / IDX / .mat)."""
    def build() -> ImageSet:
        a = read()
        imgs = array_to_resolution(a.images, req.resolution, source=req.display_name)
        return ImageSet(imgs, a.labels, a.classes, req.display_name)
    return cached(req, fingerprint, build)


def decode_listing(req: Request, listing: FileListing) -> ImageSet:
    imgs = decode_files(listing.files, req.resolution, description=f"decoding {req.display_name}")
    return ImageSet(imgs, listing.labels, listing.classes, req.display_name)


def first_match(base: Path, patterns: Sequence[str], want_dir: bool) -> Path | None:
    """First match (sorted per pattern, patterns in order) that is a folder (``want_dir``) or a file."""
    for pat in patterns:
        for m in sorted(base.glob(pat)):
            if (m.is_dir() if want_dir else m.is_file()):
                return m
    return None


def archive_patterns(*stems: str) -> tuple[str, ...]:
    """Glob patterns for every archive suffix of each stem (``"LSUN"`` -> ``LSUN.tar.gz``, ``LSUN.zip`` ...)."""
    return tuple(f"{stem}{suf}" for stem in stems for suf in ARCHIVE_SUFFIXES)


@dataclass(frozen=True)
class TreeLayout:
    """Where an image tree may live: ``dirs`` globs (relative to the root, and to an extracted archive)
    and ``archives`` globs (relative to the root). ``{split}`` in a glob is replaced by the split."""

    dirs: tuple[str, ...]
    archives: tuple[str, ...]

    def for_split(self, split: str) -> TreeLayout:
        return TreeLayout(tuple(d.format(split=split) for d in self.dirs),
                          tuple(a.format(split=split) for a in self.archives))

    def describe(self, root: Path) -> str:
        return ", ".join(str(root / p) for p in (*self.dirs, *self.archives))


def find_tree(req: Request, layout: TreeLayout) -> Path | None:
    """The folder or archive under ``req.root`` holding ``layout`` (None when absent)."""
    layout = layout.for_split(req.split)
    return first_match(req.root, layout.dirs, True) or first_match(req.root, layout.archives, False)


def load_tree(req: Request, layout: TreeLayout, scan: Callable[[Path], FileListing]) -> ImageSet:
    """Load an image tree found by ``layout`` (folder, or archive extracted into the cache), then ``scan``
    it and decode every listed file. Raises a DataError listing the places looked at when absent."""
    layout = layout.for_split(req.split)
    src = find_tree(req, layout)
    if src is None:
        raise not_found(req, layout.describe(req.root))
    if src.is_dir():
        listing = scan(src)
        return cached(req, files_fingerprint(listing.files), lambda: listing)

    def build() -> FileListing:
        extracted = extract_cached(src, req.cache_dir)
        inner = first_match(extracted, layout.dirs, True)
        if inner is None:
            raise DataError(
                f"{src}: the archive does not contain the expected layout ({', '.join(layout.dirs)}). "
                "Use the official archive or the documented mirror archive."
            )
        return scan(inner)

    return cached(req, file_fingerprint(src), build)


def not_found(req: Request, looked: str, extra: str = "") -> DataError:
    return DataError(
        f"{req.name} ({req.split}): no data found under {req.root}. Looked for: {looked}. "
        f"Fix: place the dataset there (official layout or archive){extra}, or pass another root "
        "(argument root=, or env OODTUNE_DATA)."
    )


def check_split(req: Request, allowed: Collection[str]) -> None:
    if req.split not in allowed:
        raise DataError(f"{req.name}: unknown split {req.split!r}; choose one of {sorted(allowed)}.")


TINY_IMAGENET = TreeLayout(dirs=("tiny-imagenet-200",), archives=archive_patterns("tiny-imagenet-200*"))


def load_tiny_imagenet(req: Request, split: str, keep: Collection[str] | None = None,
                       labelled: bool = True) -> ImageSet:
    """Tiny ImageNet ``split`` (train/val/test) restricted to WNIDs ``keep``; unlabelled when not ``labelled``.

    Shared by ``tiny-imagenet`` and the protocol sets ``tin-aux`` / ``tin-near`` (``req.name`` keys the cache).
    """
    def scan(d: Path) -> FileListing:
        listing = scan_tiny_imagenet(d, split, keep)
        return listing if labelled else FileListing(listing.files, None, ())
    return load_tree(req, TINY_IMAGENET, scan)
