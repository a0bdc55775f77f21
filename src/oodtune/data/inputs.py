"""A user's own images as model input.

* Files for batch prediction (:func:`iter_input_files`, :func:`decode_batches`): image files, folders (searched
  recursively for image files), glob patterns (``photos/**/*.jpg``) and tar/zip archives (their image members,
  read in memory, never extracted to disk). Every input becomes one result: a missing file, a pattern that
  matches nothing, an unreadable archive or a corrupt image is an *error entry* naming the problem, and the
  other images of the batch are unaffected.
* In-memory images for the Python API (:func:`as_uint8_images`): numpy arrays (HWC, the PIL/OpenCV layout),
  torch tensors (CHW, the torchvision layout), PIL images, paths, :class:`ImageSet`, or lists of those.

Every image ends up as uint8 RGB of the model's resolution by the data layer's one geometry rule (shorter side
resized bilinearly, centre crop; :mod:`oodtune.data.images`), so a file predicted here gets exactly the pixels
it would get as part of a dataset.
"""

from __future__ import annotations

import glob
import io
import os
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from oodtune.data.archives import is_archive
from oodtune.data.images import (
    IMAGE_EXTENSIONS,
    USER_FILE_FIX,
    array_to_resolution,
    check_regular_file,
    decode_image,
    default_workers,
    is_image_file,
    resize_center_crop,
    to_rgb,
)
from oodtune.data.imageset import ImageSet
from oodtune.data.sources import scan_images
from oodtune.errors import DataError

__all__ = ["MAX_MEMBER_BYTES", "DecodedInput", "InputFile", "as_uint8_images", "decode_batches",
           "iter_input_files", "skipped_text"]

#: Archive members larger than this are reported as errors instead of being read into memory.
MAX_MEMBER_BYTES = 256 * 2**20
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class InputFile:
    """One input: ``name`` (a path, or ``ARCHIVE!MEMBER``) and its bytes or path, or the ``error`` that stops it."""

    name: str
    source: Path | bytes | None = None
    error: str | None = None


@dataclass(frozen=True)
class DecodedInput:
    """One decoded input: ``pixels`` (res, res, 3) uint8, or ``error`` (then ``pixels`` is None)."""

    name: str
    pixels: np.ndarray | None
    error: str | None = None


def skipped_text(skipped: Counter[str]) -> str:
    """'3 non-image file(s) skipped (.gif 2, .txt 1): only .bmp, .jpeg, ... are read' ('' when none)."""
    if not skipped:
        return ""
    kinds = ", ".join(f"{k} {n}" for k, n in skipped.most_common())
    return (f"{sum(skipped.values())} file(s) in folders, archives or glob matches skipped ({kinds}): only "
            f"{' '.join(sorted(IMAGE_EXTENSIONS))} files are read; convert the others or name them one by one")


def _skip(name: str, skipped: Counter[str] | None) -> None:
    """Count a passed-over file under its suffix (``.gif``, ``(no suffix)``)."""
    if skipped is not None:
        skipped[Path(name).suffix.lower() or "(no suffix)"] += 1


def _archive_members(path: Path, skipped: Counter[str] | None = None) -> Iterator[InputFile]:
    """The image members of a tar/zip archive, read in memory in archive order; errors as entries."""
    def too_big(name: str, size: int) -> InputFile:
        return InputFile(name, error=f"archive member of {size:,} bytes exceeds the {MAX_MEMBER_BYTES:,}-byte limit")

    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    name = f"{path}!{info.filename}"
                    if info.is_dir():
                        continue
                    if not is_image_file(info.filename):
                        _skip(info.filename, skipped)
                        continue
                    if info.file_size > MAX_MEMBER_BYTES:
                        yield too_big(name, info.file_size)
                        continue
                    try:
                        yield InputFile(name, zf.read(info))
                    except (zipfile.BadZipFile, OSError, EOFError) as exc:  # e.g. a CRC error in this member
                        yield InputFile(name, error=f"cannot read archive member ({type(exc).__name__}: {exc})")
        else:
            with tarfile.open(path, "r:*") as tf:
                for member in tf:  # streaming: a .tar.gz is read once, front to back
                    name = f"{path}!{member.name}"
                    if not member.isfile():
                        continue
                    if not is_image_file(member.name):
                        _skip(member.name, skipped)
                        continue
                    if member.size > MAX_MEMBER_BYTES:
                        yield too_big(name, member.size)
                        continue
                    fh = tf.extractfile(member)
                    if fh is not None:
                        yield InputFile(name, fh.read())
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
        yield InputFile(str(path), error=f"cannot read archive ({type(exc).__name__}: {exc}); the archive is corrupt "
                                         "or incomplete")


def _other_files(folder: Path) -> Iterator[str]:
    """Names of the visible regular files under ``folder`` that are not images (what :func:`scan_images` skips)."""
    for _, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        yield from (f for f in filenames if not f.startswith(".") and not is_image_file(f))


def _expand_path(path: Path, explicit: bool, skipped: Counter[str] | None) -> Iterator[InputFile]:
    if path.is_dir():
        files = scan_images(path, regular_only=False)  # a FIFO named like an image: an error row when read
        for other in _other_files(path) if skipped is not None else ():
            _skip(other, skipped)
        if not files and explicit:
            yield InputFile(str(path), error="folder holds no image files (*.jpg, *.jpeg, *.png, *.bmp, *.webp)")
        for f in files:
            yield InputFile(str(f), f)
    elif is_archive(path):
        try:
            check_regular_file(path)  # opening a FIFO named like an archive would block
        except DataError as exc:
            yield InputFile(str(path), error=str(exc))
            return
        yield from _archive_members(path, skipped)
    elif explicit or is_image_file(path):  # a file named on purpose is always tried; a glob keeps only images
        yield InputFile(str(path), path)
    elif path.is_file():
        _skip(path.name, skipped)


def _printable(item: InputFile) -> InputFile:
    """``item``, or an error entry when its name is not valid UTF-8 (undecodable bytes of a file name, kept by
    Python as surrogates): shown with ``\\xNN`` escapes, since no predictions file can hold the raw bytes."""
    try:
        item.name.encode("utf-8")
        return item
    except UnicodeEncodeError:
        shown = item.name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return InputFile(shown, error="the file name is not valid UTF-8 (shown with \\x escapes); rename the file")


def iter_input_files(specs: Iterable[str | os.PathLike], skipped: Counter[str] | None = None
                     ) -> Iterator[InputFile]:
    """Every input named by ``specs`` (files, folders, archives, glob patterns; see the module docstring), in
    order: folders and glob matches sorted, archives in member order. A name that is not valid UTF-8 is an error
    entry (shown with escapes). Non-image files found in folders, archives and glob matches are passed over and,
    with ``skipped``, counted there by suffix."""
    return map(_printable, _input_files(specs, skipped))


def _input_files(specs: Iterable[str | os.PathLike], skipped: Counter[str] | None) -> Iterator[InputFile]:
    for spec in specs:
        text = os.fspath(spec)
        path = Path(text).expanduser()
        if path.exists():
            yield from _expand_path(path, True, skipped)
        elif _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                yield InputFile(text, error="the pattern matches no file")
            for m in matches:
                yield from _expand_path(Path(m), False, skipped)
        else:
            yield InputFile(text, error="no such file or folder")


def _decode(item: InputFile, resolution: int) -> DecodedInput:
    if item.error is not None or item.source is None:
        return DecodedInput(item.name, None, item.error or "nothing to read")
    try:
        source = io.BytesIO(item.source) if isinstance(item.source, bytes) else item.source
        return DecodedInput(item.name, decode_image(source, resolution, name=item.name, fix=USER_FILE_FIX))
    except DataError as exc:
        return DecodedInput(item.name, None, str(exc))


def decode_batches(specs: Iterable[str | os.PathLike], resolution: int, batch_size: int = 256,
                   workers: int | None = None, *, skipped: Counter[str] | None = None,
                   decoder: Callable[[InputFile], DecodedInput] | None = None) -> Iterator[list[DecodedInput]]:
    """The inputs of ``specs`` decoded to ``resolution`` (or by ``decoder``), ``batch_size`` at a time, in order;
    ``skipped`` counts the non-image files passed over (:func:`iter_input_files`).

    Decoding runs on ``workers`` threads (default :func:`~oodtune.data.images.default_workers`; PIL releases the
    GIL while it decodes and resizes). A file that cannot be decoded is a :class:`DecodedInput` with ``error``.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}.")
    items = iter_input_files(specs, skipped)
    decode = decoder or (lambda it: _decode(it, resolution))
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        while True:
            chunk = [item for _, item in zip(range(batch_size), items, strict=False)]
            if not chunk:
                return
            yield list(pool.map(decode, chunk))


# ----------------------------------------------------------------------------------------- in-memory images

def _float_to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(arr).all() or arr.min(initial=0.0) < 0.0 or arr.max(initial=0.0) > 1.0:
        raise DataError(f"{what}: float pixels must be finite and in [0, 1] (not normalised: the detector "
                        "normalises itself); pass uint8 0..255 or divide by 255.")
    return np.round(arr * 255.0).astype(np.uint8)


def _to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return _float_to_uint8(arr.astype(np.float64), what)
    if np.issubdtype(arr.dtype, np.integer) and arr.size and (arr.min() < 0 or arr.max() > 255):
        raise DataError(f"{what}: integer pixels must be in 0..255, found [{arr.min()}, {arr.max()}].")
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    raise DataError(f"{what}: pixels of dtype {arr.dtype} are not supported; pass uint8 or float in [0, 1].")


def _hwc_batch(arr: np.ndarray, what: str) -> np.ndarray:
    """(N, H, W, C) or (N, H, W) from a numpy image (H, W), (H, W, C) or batch (N, H, W, C), (N, H, W)."""
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4)):
        arr = arr[None]
    if arr.ndim == 4 and arr.shape[-1] == 4:
        arr = arr[..., :3]  # RGBA: alpha dropped, as for files
    if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] not in (1, 3)):
        raise DataError(f"{what}: expected HWC images (H, W), (H, W, 3) or a batch (N, H, W, 3), got shape "
                        f"{arr.shape}; a CHW array is a torch layout: pass it as a torch tensor or transpose it.")
    return arr


def as_uint8_images(images: Any, resolution: int) -> np.ndarray:
    """``images`` as one (N, resolution, resolution, 3) uint8 RGB batch (see the module docstring).

    numpy: (H, W), (H, W, 1|3|4) or (N, H, W, 1|3) -- HWC; torch: (C, H, W) or (N, C, H, W) with C in 1, 3 --
    CHW. Pixels are uint8 0..255 or floats in [0, 1]. Paths are decoded like dataset files.
    """
    if isinstance(images, ImageSet):
        return array_to_resolution(np.asarray(images.images), resolution, source=images.name)
    if isinstance(images, (str, os.PathLike)):
        return decode_image(images, resolution)[None]
    if isinstance(images, Image.Image):
        return np.asarray(resize_center_crop(to_rgb(images), resolution), dtype=np.uint8)[None]
    if isinstance(images, torch.Tensor):
        t = images.detach().cpu()
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[1] not in (1, 3):
            raise DataError(f"tensor images must be (C, H, W) or (N, C, H, W) with C = 1 or 3 (torchvision layout), "
                            f"got shape {tuple(images.shape)}.")
        arr = _to_uint8(t.permute(0, 2, 3, 1).numpy(), "tensor")
        return array_to_resolution(np.ascontiguousarray(arr), resolution, source="tensor")
    if isinstance(images, np.ndarray):
        return array_to_resolution(_to_uint8(_hwc_batch(images, "array"), "array"), resolution, source="array")
    if isinstance(images, Sequence) and not isinstance(images, (bytes, bytearray)):
        if not images:
            raise DataError("no images given (an empty list).")
        return np.concatenate([as_uint8_images(x, resolution) for x in images])
    raise DataError(f"cannot use a {type(images).__name__} as images; pass numpy arrays, torch tensors, PIL images, "
                    "paths or a list of them.")
