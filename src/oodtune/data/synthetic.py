"""Synthetic OOD sets of the Outlier Exposure paper (Hendrycks, Mazeika & Dietterich, ICLR 2019).

The OE evaluation code (``CIFAR/test.py``) draws the noise directly in the network's input space, which it
treats as ``[-1, 1]`` (``x * 2 - 1``). oodtune stores *pixels*, so each generator below is the OE recipe
mapped to ``[0, 1]`` by ``p = (v + 1) / 2`` and quantised to uint8 with ``round(255 * p)``:

* ``gaussian``   OE: ``clip(N(0, 0.5^2), -1, 1)``  ->  ``clip(N(0.5, 0.25^2), 0, 1)`` i.i.d. per pixel & channel.
* ``uniform``    OE: ``U[-1, 1]``                  ->  ``U[0, 1]`` i.i.d. per pixel & channel.
* ``rademacher`` OE: ``2 * Bernoulli(0.5) - 1`` (+-1) -> pixel values in ``{0, 255}`` i.i.d.
* ``blobs``      OE: ``Bernoulli(0.7)`` on an (H, W, 3) grid, blurred by a Gaussian with ``sigma=1.5``
  over all three axes (``skimage.filters.gaussian(..., multichannel=False)``, i.e. also across
  channels, border mode ``nearest``), values ``< 0.75`` set to 0; the result (in ``[0, 1]``) is the pixel.

All sets are deterministic given ``seed`` and unlabelled. The test split uses ``default_rng(seed)``; the
train split (synthetic sets used as training outliers) uses ``default_rng([seed, 1])``, so train and test
images never coincide.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from oodtune.data.imageset import ImageSet
from oodtune.errors import DataError

#: Default number of synthetic images (as in OE's evaluation).
DEFAULT_COUNT = 10_000


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def gaussian(rng: np.random.Generator, n: int, res: int) -> np.ndarray:
    """Clipped Gaussian noise N(0.5, 0.25^2) per pixel."""
    return _to_uint8(rng.normal(loc=0.5, scale=0.25, size=(n, res, res, 3)))


def uniform(rng: np.random.Generator, n: int, res: int) -> np.ndarray:
    """Uniform noise U[0, 1] per pixel."""
    return _to_uint8(rng.uniform(0.0, 1.0, size=(n, res, res, 3)))


def rademacher(rng: np.random.Generator, n: int, res: int) -> np.ndarray:
    """Rademacher (+-1) noise, i.e. pixels 0 or 255 with probability 1/2 each."""
    return (rng.integers(0, 2, size=(n, res, res, 3), dtype=np.uint8) * 255).astype(np.uint8)


def blobs(rng: np.random.Generator, n: int, res: int) -> np.ndarray:
    """OE 'Blob' images: smoothed Bernoulli(0.7) noise thresholded at 0.75."""
    from scipy.ndimage import gaussian_filter

    out = np.empty((n, res, res, 3), dtype=np.uint8)
    step = 1024
    for i in range(0, n, step):  # chunked to bound float memory
        b = rng.binomial(1, 0.7, size=(min(step, n - i), res, res, 3)).astype(np.float32)
        b = gaussian_filter(b, sigma=(0, 1.5, 1.5, 1.5), mode="nearest", truncate=4.0)
        b[b < 0.75] = 0.0
        out[i : i + len(b)] = _to_uint8(b)
    return out


GENERATORS: dict[str, tuple[Callable[[np.random.Generator, int, int], np.ndarray], str]] = {
    "gaussian": (gaussian, "synthetic: clipped Gaussian noise N(0.5, 0.25^2) per pixel (Outlier Exposure)"),
    "uniform": (uniform, "synthetic: uniform noise U[0,1] per pixel (Outlier Exposure)"),
    "rademacher": (rademacher, "synthetic: Rademacher noise, pixels 0/255 (Outlier Exposure)"),
    "blobs": (blobs, "synthetic: smoothed, thresholded Bernoulli(0.7) blobs (Outlier Exposure)"),
}


def make_synthetic(kind: str, num_images: int | None = None, resolution: int = 32, seed: int = 0,
                   train: bool = False) -> ImageSet:
    """Generate ``num_images`` (default 10,000) images of the synthetic set ``kind`` (``train``: the
    independent training stream)."""
    if kind not in GENERATORS:
        raise DataError(f"unknown synthetic set {kind!r}; choose one of {sorted(GENERATORS)}.")
    n = DEFAULT_COUNT if num_images is None else int(num_images)
    if n <= 0:
        raise DataError(f"{kind}: num_images must be positive, got {n}.")
    rng = np.random.default_rng([seed, 1] if train else seed)
    return ImageSet(GENERATORS[kind][0](rng, n, resolution), None, (), f"{kind}-train" if train else kind)
