"""Synthetic OOD sets (Outlier Exposure recipes mapped to uint8 pixels)."""

from __future__ import annotations

import numpy as np
import pytest

from oodtune.data import DataError, load_dataset


@pytest.mark.parametrize("name", ["gaussian", "uniform", "rademacher", "blobs"])
def test_deterministic_shape_and_unlabelled(name):
    a = load_dataset(name, "/nonexistent-root", num_images=64, seed=3)
    b = load_dataset(name, "/nonexistent-root", num_images=64, seed=3)
    c = load_dataset(name, "/nonexistent-root", num_images=64, seed=4)
    assert a.images.shape == (64, 32, 32, 3) and a.images.dtype == np.uint8 and a.labels is None
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    assert a.name == name


def test_default_count_and_resolution():
    assert len(load_dataset("uniform")) == 10_000
    assert load_dataset("gaussian", num_images=2, resolution=8).images.shape == (2, 8, 8, 3)


def test_value_distributions():
    g = load_dataset("gaussian", num_images=200).images.astype(float) / 255
    assert abs(g.mean() - 0.5) < 0.01 and abs(g.std() - 0.245) < 0.02  # N(0.5, 0.25^2), lightly clipped
    u = load_dataset("uniform", num_images=200).images.astype(float) / 255
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - (1 / 12) ** 0.5) < 0.01
    r = load_dataset("rademacher", num_images=50).images
    assert set(np.unique(r).tolist()) == {0, 255} and abs(r.mean() / 255 - 0.5) < 0.02
    bl = load_dataset("blobs", num_images=50).images
    zero = (bl == 0).mean()
    assert 0.2 < zero < 0.8 and bl[bl > 0].min() >= round(0.75 * 255)


def test_bad_count():
    with pytest.raises(DataError):
        load_dataset("blobs", num_images=0)


def test_train_stream_differs_from_test():
    test = load_dataset("gaussian", num_images=4)
    train = load_dataset("gaussian", split="train", num_images=4)
    assert not np.array_equal(test.images, train.images) and train.name == "gaussian-train"
