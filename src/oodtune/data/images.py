"""Decode image files / arrays into uint8 RGB squares of one resolution.

Geometry rule used for every source: the *shorter* side is resized to ``resolution`` with PIL
**bilinear** resampling (PIL's bilinear filter is antialiased when downscaling, like torchvision's
``Resize`` default), then the centre ``resolution x resolution`` square is cropped. Images that are
already ``resolution x resolution`` are left untouched (bit-exact). Grey, 1-bit, palette, RGBA and
16-bit images are converted to 3-channel RGB (alpha is dropped; grey is repeated on all channels).

Corrupt images are never skipped: :class:`DataError` names the file and the fix. So are images whose decoded or
resized size would exceed :data:`MAX_PIXELS` (a small file can declare a huge image, and a 1×10⁶-pixel line
resized to 32 px on its shorter side would need 32×32·10⁶ pixels): their size is checked from the header before
anything is decoded. Files that are not regular files (a FIFO named ``x.jpg`` would block forever) are refused.
"""

from __future__ import annotations

import multiprocessing
import os
import stat
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from oodtune.errors import DataError

#: File extensions treated as images (compared case-insensitively).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

#: Resampling filter for every resize (documented in the module docstring).
RESAMPLE = Image.Resampling.BILINEAR

#: Largest image (width x height) decoded or produced by a resize: 2**26 pixels, about 200 MB as RGB.
MAX_PIXELS = 2**26

_CHUNK = 1024  # files per worker task
_MIN_FILES_FOR_POOL = 4096  # below this, a process pool costs more than it saves


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has an image extension (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (grey and 1-bit are replicated to 3 channels)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # resolve the palette (and transparency) first
    return img.convert("RGB")


def _resized_size(w: int, h: int, resolution: int) -> tuple[int, int]:
    scale = resolution / min(w, h)
    return max(resolution, round(w * scale)), max(resolution, round(h * scale))


def check_size(w: int, h: int, resolution: int, source: str) -> None:
    """Refuse an image whose own size or whose size after :func:`resize_center_crop` exceeds :data:`MAX_PIXELS`."""
    if w < 1 or h < 1:
        raise DataError(f"{source}: image has no pixels ({w}x{h}); remove the file.")
    nw, nh = _resized_size(w, h, resolution)
    if w * h > MAX_PIXELS or nw * nh > MAX_PIXELS:
        raise DataError(
            f"{source}: image of {w}x{h} pixels would need {max(w * h, nw * nh):,} pixels in memory to be brought to "
            f"{resolution}x{resolution} (limit {MAX_PIXELS:,}: extremely large or thin images are refused). "
            "Remove it from the dataset or crop it first."
        )


def resize_center_crop(img: Image.Image, resolution: int, source: str = "image") -> Image.Image:
    """Resize the shorter side to ``resolution`` (bilinear) and crop the centre square."""
    w, h = img.size
    if (w, h) == (resolution, resolution):
        return img
    check_size(w, h, resolution, source)
    nw, nh = _resized_size(w, h, resolution)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), RESAMPLE)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def check_regular_file(path: str | os.PathLike) -> None:
    """Refuse FIFOs, devices, sockets and folders named like images (reading a FIFO would block forever)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror}); restore the file or remove it.") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: not a regular file (a FIFO, device, socket or folder named like an image); "
                        "remove it from the dataset folder.")


def decode_image(path: str | os.PathLike | BinaryIO, resolution: int, *, name: str | None = None) -> np.ndarray:
    """Decode one image file -- a path, or an open binary file (e.g. ``io.BytesIO``) that errors call ``name`` --
    to a ``(resolution, resolution, 3)`` uint8 RGB array.

    Raises :class:`DataError` naming the file when it cannot be read or decoded, is too large (see the module
    docstring) or is not a regular file.
    """
    if isinstance(path, (str, os.PathLike)):
        check_regular_file(path)
    shown = name if name is not None else path
    try:
        with Image.open(path) as img:
            check_size(*img.size, resolution, str(shown))  # from the header, before decoding
            img.load()
            out = resize_center_crop(to_rgb(img), resolution, str(shown))
            arr = np.asarray(out, dtype=np.uint8)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{shown}: image too large to decode ({exc}); remove it from the dataset or shrink it.") \
            from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"{shown}: cannot decode image ({type(exc).__name__}: {exc}). The file is corrupt or truncated: "
            "replace it with a good copy (re-download / re-extract the dataset) or delete it."
        ) from None
    if arr.shape != (resolution, resolution, 3):  # pragma: no cover - defensive
        raise DataError(f"{shown}: decoded to shape {arr.shape}, expected {(resolution, resolution, 3)}.")
    return arr


def array_to_resolution(images: np.ndarray, resolution: int, source: str = "array") -> np.ndarray:
    """Bring an in-memory batch (N,H,W) or (N,H,W,1|3) of uint8 to ``(N, res, res, 3)`` uint8.

    Grey is replicated to 3 channels; other sizes go through :func:`resize_center_crop`.
    """
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise DataError(f"{source}: expected uint8 pixels, got {arr.dtype}.")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise DataError(f"{source}: expected images of shape (N,H,W[,1|3]), got {arr.shape}.")
    n, h, w, c = arr.shape
    if (h, w) != (resolution, resolution):
        out = np.empty((n, resolution, resolution, c), dtype=np.uint8)
        mode = "L" if c == 1 else "RGB"
        for i in range(n):
            img = Image.fromarray(arr[i, ..., 0] if c == 1 else arr[i], mode=mode)
            res = np.asarray(resize_center_crop(img, resolution, f"{source}[{i}]"), dtype=np.uint8)
            out[i] = res[..., None] if c == 1 else res
        arr = out
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr)


def _decode_chunk(args: tuple[list[str], int]) -> np.ndarray:
    paths, resolution = args
    out = np.empty((len(paths), resolution, resolution, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = decode_image(p, resolution)
    return out


def _exit_with_parent(parent: int) -> None:
    """Pool-worker initializer: end this worker as soon as its parent is gone. A parent killed with ``kill -9``
    never shuts its pool down, and the workers would otherwise run on (each holding its decoded images)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="oodtune-exit-with-parent", daemon=True).start()


def default_workers() -> int:
    """Worker processes for decoding: ``OODTUNE_WORKERS`` if set, else the CPU count (max 8)."""
    env = os.environ.get("OODTUNE_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(8, os.cpu_count() or 1))


def decode_files(
    paths: Sequence[str | os.PathLike], resolution: int, description: str = "decoding", workers: int | None = None
) -> np.ndarray:
    """Decode many image files into one ``(N, res, res, 3)`` uint8 array, in order, with a progress bar.

    Large lists are decoded by a process pool (``workers``, default :func:`default_workers`); small ones
    in-process. The first corrupt file raises :class:`DataError` naming it.
    """
    from oodtune.utils.progress import format_rate, progress_bar

    files = [os.fspath(p) for p in paths]
    out = np.empty((len(files), resolution, resolution, 3), dtype=np.uint8)
    chunks = [files[i : i + _CHUNK] for i in range(0, len(files), _CHUNK)]
    workers = default_workers() if workers is None else workers
    start = time.perf_counter()
    with progress_bar(description, total=len(files)) as bar:
        def _done(offset: int, arr: np.ndarray) -> int:
            out[offset : offset + len(arr)] = arr
            done = offset + len(arr)
            bar.advance(len(arr))
            bar.update(rate=format_rate(done, time.perf_counter() - start))
            return done

        offset = 0
        if workers > 1 and len(files) >= _MIN_FILES_FOR_POOL:
            # fork (where available) so that unguarded user scripts are not re-imported by the workers
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_exit_with_parent,
                                     initargs=(os.getpid(),)) as pool:
                for arr in pool.map(_decode_chunk, [(c, resolution) for c in chunks]):
                    offset = _done(offset, arr)
        else:
            for c in chunks:
                offset = _done(offset, _decode_chunk((c, resolution)))
    return out
