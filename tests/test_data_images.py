"""Decoding, colour conversion and resize/crop rules of oodtune.data.images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fixtures_data import write_corrupt_jpeg, write_image
from oodtune.data import DataError
from oodtune.data.images import array_to_resolution, decode_files, decode_image, resize_center_crop


def test_exact_size_png_is_bit_exact(tmp_path):
    pix = write_image(tmp_path / "a.png", (32, 32))
    np.testing.assert_array_equal(decode_image(tmp_path / "a.png", 32), pix)


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grey_and_1bit_become_three_equal_channels(tmp_path, mode):
    write_image(tmp_path / "g.png", (20, 20), mode=mode)
    out = decode_image(tmp_path / "g.png", 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    if mode == "1":
        assert set(np.unique(out)) <= {0, 255}


def test_rgba_and_palette(tmp_path):
    Image.new("RGBA", (10, 10), (10, 20, 30, 128)).save(tmp_path / "a.png")
    Image.new("RGB", (10, 10), (200, 100, 50)).convert("P").save(tmp_path / "p.png")
    assert decode_image(tmp_path / "a.png", 10)[0, 0].tolist() == [10, 20, 30]
    assert decode_image(tmp_path / "p.png", 10).shape == (10, 10, 3)


def test_shorter_side_resize_then_center_crop():
    # left third red, middle green, right blue: a 96x32 image -> 32x32 keeps only the middle (green)
    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:, :32, 0] = 255
    arr[:, 32:64, 1] = 255
    arr[:, 64:, 2] = 255
    out = np.asarray(resize_center_crop(Image.fromarray(arr), 32))
    assert out.shape == (32, 32, 3)
    assert out[:, 4:28, 1].min() == 255 and out[:, 4:28, [0, 2]].max() == 0
    tall = np.asarray(resize_center_crop(Image.new("RGB", (40, 100)), 16))
    assert tall.shape == (16, 16, 3)


def test_corrupt_jpeg_names_the_file(tmp_path):
    bad = write_corrupt_jpeg(tmp_path / "cls" / "broken.jpg")
    with pytest.raises(DataError, match="broken.jpg") as exc:
        decode_image(bad, 32)
    assert "corrupt" in str(exc.value)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match="text.png"):
        decode_files([tmp_path / "text.png"], 32)


def test_decode_files_order_and_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("OODTUNE_PROGRESS", "0")
    import oodtune.data.images as images

    monkeypatch.setattr(images, "_MIN_FILES_FOR_POOL", 1)
    monkeypatch.setattr(images, "_CHUNK", 2)
    pix = [write_image(tmp_path / f"{i}.png", (4, 4), seed=i) for i in range(5)]
    files = [tmp_path / f"{i}.png" for i in range(5)]
    np.testing.assert_array_equal(decode_files(files, 4, workers=2), np.stack(pix))
    np.testing.assert_array_equal(decode_files(files, 4, workers=1), np.stack(pix))


def test_array_to_resolution_grey_and_resize():
    x = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    out = array_to_resolution(x, 32)
    assert out.shape == (2, 32, 32, 3)
    same = array_to_resolution(np.zeros((3, 8, 8, 3), np.uint8), 8)
    assert same.shape == (3, 8, 8, 3)
    with pytest.raises(DataError):
        array_to_resolution(np.zeros((2, 8, 8), np.float32), 8)
