"""A generated folder of labelled JPEG images at any size, for benchmarks that need real files on disk.

Each image is smooth random colour (a 7x7 random field upsampled bilinearly) tinted by its class, saved as a
baseline JPEG (quality 85) under ``ROOT/classNN/NNNNNNN.jpg``. Files are written to a temporary name and renamed,
so an interrupted run leaves only whole images; a rerun keeps the images already there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_jpegs(root: Path, count: int, *, size: int = 224, classes: int = 10, seed: int = 0,
                report_every: int = 10_000) -> float:
    """Write ``count`` JPEGs (``size`` px, ``classes`` class folders) under ``root``; returns the seconds taken."""
    t0 = time.perf_counter()
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    tint = np.random.default_rng(seed).integers(0, 256, (classes, 3))
    for i in range(count):
        path = root / f"class{i % classes:02d}" / f"{i:07d}.jpg"
        if path.exists():
            continue
        rng = np.random.default_rng((seed, i))
        field = rng.integers(0, 256, (7, 7, 3)) // 2 + tint[i % classes] // 2
        img = Image.fromarray(field.astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
        tmp = path.with_suffix(".tmp")
        img.save(tmp, format="JPEG", quality=85)
        os.replace(tmp, path)
        if report_every and (i + 1) % report_every == 0:
            print(f"  wrote {i + 1:,} / {count:,} JPEGs ({time.perf_counter() - t0:.0f} s)", flush=True)
    return time.perf_counter() - t0
