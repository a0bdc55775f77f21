"""Seeded hold-out splits of a loaded dataset: a validation part carved from a training split, or a test part
carved from a dataset that has no test split of its own (a ``folder:`` tree without ``train/``/``test/``).

A split is stratified (the same fraction of every class, for labelled sets) and depends only on the set's size
and labels, the fraction and the seed, so a checkpoint that records (fraction, seed) rebuilds exactly the same
parts later. Different purposes draw from different random streams (:data:`TEST_STREAM`, :data:`VAL_STREAM`).
"""

from __future__ import annotations

import numpy as np

from oodtune.data.imageset import ImageSet
from oodtune.errors import DataError

__all__ = ["TEST_STREAM", "VAL_STREAM", "holdout", "holdout_indices"]

#: Random streams of the two purposes, so a test part and a validation part of one set are independent draws.
TEST_STREAM = 1
VAL_STREAM = 2


def holdout_indices(labels: np.ndarray | None, n: int, fraction: float, seed: int, stream: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) sorted indices of ``n`` samples: per class (all samples when unlabelled), a seeded random
    ``round(fraction * n_c)`` of them held out, at least one and never all of a class with two or more."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"a hold-out fraction must be strictly between 0 and 1, got {fraction}.")
    rng = np.random.default_rng([seed, stream])
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    held = []
    for idx in groups:
        k = int(round(fraction * idx.size))
        k = min(max(k, 1), idx.size - 1) if idx.size >= 2 else 0
        held.append(rng.permutation(idx)[:k])
    out = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    return np.setdiff1d(np.arange(n), out), out


def holdout(ds: ImageSet, fraction: float, seed: int, stream: int, held_name: str) -> tuple[ImageSet, ImageSet]:
    """``ds`` split into (the rest, a held-out part named ``held_name``); see :func:`holdout_indices`."""
    keep, held = holdout_indices(ds.labels, len(ds), fraction, seed, stream)
    if held.size == 0:
        raise DataError(f"{ds.name}: {len(ds)} images are too few to hold out {fraction:.0%} of each class; "
                        "use a larger dataset or fraction.")
    return ds.subset(keep), ds.subset(held, name=held_name)
