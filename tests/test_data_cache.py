"""Decoded-data cache: location, hits, invalidation, atomic writes, seeded subsampling."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import oodtune.data.layouts as layouts
from fixtures_data import write_image, write_labelled_folder, write_mnist
from oodtune.data import DataError, default_cache_dir, load_dataset
from oodtune.data.cache import images_file


def _forbid_decoding(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("decoded although a cache entry exists")

    monkeypatch.setattr(layouts, "decode_files", boom)
    monkeypatch.setattr(layouts, "iter_decoded", boom)
    monkeypatch.setattr(layouts, "array_to_resolution", boom)


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("OODTUNE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("OODTUNE_CACHE")
    assert default_cache_dir() == default_cache_dir().home() / ".cache" / "oodtune"


def test_cache_hit_skips_decoding_and_is_uint8_npy(data_env, monkeypatch, tmp_path):
    pics = write_labelled_folder(tmp_path / "pics", ["a", "b"], per_class=2)
    first = load_dataset(f"folder:{pics}", data_env["root"])
    entries = list((data_env["cache"] / "images").glob("*.npz"))
    assert len(entries) == 1 and "32px" in entries[0].name
    assert not [p for p in entries[0].parent.iterdir() if p.name.startswith(".")]  # no temp files
    images = np.load(images_file(entries[0]), mmap_mode="r")  # a plain, memory-mappable .npy
    assert images.dtype == np.uint8 and images.shape == first.images.shape
    np.testing.assert_array_equal(images, first.images)
    with np.load(entries[0]) as z:
        assert z["fingerprint"] == first.fingerprint()
    _forbid_decoding(monkeypatch)
    again = load_dataset(f"folder:{pics}", data_env["root"])
    np.testing.assert_array_equal(again.images, first.images)
    assert again.classes == first.classes and again.name == first.name


def test_explicit_cache_dir_and_resolution_key(data_env, tmp_path):
    write_mnist(data_env["root"] / "mnist", n=4)
    load_dataset("mnist", data_env["root"], cache_dir=tmp_path / "mine")
    load_dataset("mnist", data_env["root"], cache_dir=tmp_path / "mine", resolution=16)
    assert len(list((tmp_path / "mine" / "images").glob("mnist-test-*.npz"))) == 2
    assert not (data_env["cache"] / "images").exists()


def test_source_change_invalidates(data_env, tmp_path):
    pics = write_labelled_folder(tmp_path / "pics", ["a"], per_class=2)
    before = load_dataset(f"images:{pics}", data_env["root"])
    f = sorted(pics.rglob("*.png"))[0]
    write_image(f, (32, 32), seed=999)
    t = time.time() + 5
    os.utime(f, (t, t))
    after = load_dataset(f"images:{pics}", data_env["root"])
    assert not np.array_equal(before.images, after.images)


def test_damaged_cache_entry_is_rebuilt(data_env):
    write_mnist(data_env["root"] / "mnist", n=4)
    ref = load_dataset("mnist", data_env["root"])
    (entry,) = (data_env["cache"] / "images").glob("*.npz")
    entry.write_bytes(b"junk")
    np.testing.assert_array_equal(load_dataset("mnist", data_env["root"]).images, ref.images)


def test_num_images_seeded_subsample(data_env):
    write_mnist(data_env["root"] / "mnist", n=30)
    full = load_dataset("mnist", data_env["root"])
    a = load_dataset("mnist", data_env["root"], num_images=10, seed=1)
    b = load_dataset("mnist", data_env["root"], num_images=10, seed=1)
    c = load_dataset("mnist", data_env["root"], num_images=10, seed=2)
    assert len(a) == 10
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    rows = [int(np.flatnonzero((full.images == img).all(axis=(1, 2, 3)))[0]) for img in a.images]
    assert rows == sorted(rows)  # original order kept
    assert len(load_dataset("mnist", data_env["root"], num_images=1000)) == 30
    with pytest.raises(DataError):
        load_dataset("mnist", data_env["root"], num_images=0)
