"""The files ``oodtune predict`` writes for each frame of a segmenter (:mod:`oodtune.deploy.pixel_detector`), named
``NNNNNN-STEM`` after the frame's position in the input order and its file name (so names never collide):

* ``NNNNNN-STEM.anomaly.png`` -- the anomaly map a = threshold - score as a 16-bit greyscale PNG, value
  v = clip(32768 + round(s * a), 0, 65535) with s = the detector's ``anomaly_png.levels_per_unit`` (set at
  calibration so that the central 99.8 % of the calibration pixels span 16384..49152): a = (v - 32768) / s;
  v > 32768 is anomalous. With ``fmt="npy"``: ``NNNNNN-STEM.anomaly.npy``, the float32 map a itself.
* ``NNNNNN-STEM.mask.png`` -- the binary anomaly mask (8-bit, 255 = anomalous pixel, 0 = not).
* ``NNNNNN-STEM.overlay.jpg`` -- for people: the frame, the anomaly map as a heat map (magma; transparent where
  the pixel is well inside the ID range, opaque where it is anomalous) and the mask's outline in cyan.

Maps have the size the frame was processed at (the model's input height, the frame's aspect ratio;
:mod:`oodtune.data.frames`); the overlay shows that resized frame.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage

from ..errors import ConfigError
from ..utils.atomic import write_atomic
from .pixel_detector import ANOMALY_PNG_ZERO, FramePrediction

__all__ = ["MAP_FORMATS", "anomaly_png", "frame_files", "overlay", "write_frame_files"]

MAP_FORMATS = ("png", "npy")
OUTLINE_RGB = (0, 255, 255)


def frame_files(out: Path, index: int, name: str, fmt: str) -> dict[str, Path]:
    """{"anomaly_map", "mask", "overlay"} -> the paths of frame number ``index`` named ``name`` (module docstring)."""
    if fmt not in MAP_FORMATS:
        raise ConfigError(f"unknown map format {fmt!r}; use one of {', '.join(MAP_FORMATS)}.")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name.rsplit("!", 1)[-1]).stem)[:80] or "frame"
    base = f"{index:06d}-{stem}"
    return {"anomaly_map": out / f"{base}.anomaly.{fmt}", "mask": out / f"{base}.mask.png",
            "overlay": out / f"{base}.overlay.jpg"}


def anomaly_png(anomaly: np.ndarray, map_scale: float) -> np.ndarray:
    """The uint16 values of an anomaly map (module docstring)."""
    return np.clip(np.round(ANOMALY_PNG_ZERO + map_scale * anomaly.astype(np.float64)), 0, 65535).astype(np.uint16)


def overlay(frame: np.ndarray, pred: FramePrediction, map_scale: float) -> np.ndarray:
    """uint8 (H, W, 3): ``frame`` with the heat map of the anomaly and the mask outline (module docstring)."""
    level = np.clip(0.5 + map_scale * pred.anomaly.astype(np.float64) / 65536.0, 0.0, 1.0)  # 0.5 = threshold
    heat = colormaps["magma"](level)[..., :3] * 255.0
    alpha = (0.7 * np.clip((level - 0.4) / 0.3, 0.0, 1.0))[..., None]  # 0 well inside the ID range
    out = frame.astype(np.float64) * (1 - alpha) + heat * alpha
    outline = pred.mask & ~ndimage.binary_erosion(pred.mask)
    out[outline] = OUTLINE_RGB
    return np.round(out).astype(np.uint8)


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_frame_files(out: str | Path, index: int, name: str, frame: np.ndarray, pred: FramePrediction, *,
                      map_scale: float, fmt: str = "png") -> dict[str, Path]:
    """Write the anomaly map, mask and overlay of one frame under ``out`` (atomically); returns their paths."""
    paths = frame_files(Path(out), index, name, fmt)
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, pred.anomaly.astype(np.float32))
        data = buf.getvalue()
    else:
        data = _png(anomaly_png(pred.anomaly, map_scale))
    files = {"anomaly_map": data, "mask": _png(pred.mask.astype(np.uint8) * 255),
             "overlay": _png(overlay(frame, pred, map_scale), "JPEG")}
    for key, blob in files.items():
        write_atomic(paths[key], lambda fh, b=blob: fh.write(b))  # type: ignore[misc]
    return paths
