"""A user's frames as segmentation input: every file is decoded to RGB and resized (bilinear) to the model's
input height with its own aspect ratio, the width rounded to a multiple of 8 (:func:`anomaly_size`: the rule
anomaly test sets are evaluated by, so Road Anomaly's 1280x720 becomes 640x360 for a 360-pixel model). Frames
are never cropped, so every output map covers the whole frame."""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import numpy as np
from PIL import Image

from ..errors import DataError
from .images import MAX_PIXELS, USER_FILE_FIX, check_regular_file, to_rgb
from .inputs import DecodedInput, InputFile, decode_batches
from .segmentation import anomaly_size

__all__ = ["decode_frame", "frame_batches"]


def decode_frame(path: str | os.PathLike | BinaryIO, height: int, *, name: str | None = None) -> np.ndarray:
    """One frame (a path or an open binary file that errors call ``name``) as uint8 (height, W, 3) RGB, W from
    the frame's aspect ratio (module docstring). Raises :class:`DataError` naming the file."""
    if isinstance(path, (str, os.PathLike)):
        check_regular_file(path)
    shown = name if name is not None else path
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w < 1 or h < 1 or w * h > MAX_PIXELS:
                raise DataError(f"{shown}: frame of {w}x{h} pixels is empty or too large (limit {MAX_PIXELS:,} "
                                "pixels); crop or shrink it first.")
            img.load()
            size = anomaly_size((w, h), height)
            frame = to_rgb(img)
            if frame.size != size:
                frame = frame.resize(size, Image.Resampling.BILINEAR)
            return np.asarray(frame, dtype=np.uint8)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{shown}: cannot decode frame ({type(exc).__name__}: {exc}). The file is corrupt, "
                        f"truncated or not an image: {USER_FILE_FIX}.") from None


def _decode(item: InputFile, height: int) -> DecodedInput:
    if item.error is not None or item.source is None:
        return DecodedInput(item.name, None, item.error or "nothing to read")
    try:
        source = io.BytesIO(item.source) if isinstance(item.source, bytes) else item.source
        return DecodedInput(item.name, decode_frame(source, height, name=item.name))
    except DataError as exc:
        return DecodedInput(item.name, None, str(exc))


def frame_batches(specs: Iterable[str | os.PathLike], height: int, batch_size: int = 8,
                  workers: int | None = None, *, skipped: Counter[str] | None = None
                  ) -> Iterator[list[DecodedInput]]:
    """The frames of ``specs`` (files, folders, globs, archives: :func:`~oodtune.data.inputs.iter_input_files`)
    decoded at ``height``, ``batch_size`` at a time, in order; unreadable inputs are entries with ``error``."""
    return decode_batches(specs, height, batch_size, workers, skipped=skipped,
                          decoder=lambda item: _decode(item, height))
