"""Segmentation data: the published layouts load into SegmentationSets, bad input is refused with an error naming
the file, the object bank splits are disjoint, pasting is seeded and reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures_segmentation import (
    H,
    W,
    write_camvid,
    write_cityscapes,
    write_objects,
    write_processed,
    write_road_anomaly,
)
from oodtune.data import available_datasets, load_dataset, load_objects, load_segmentation, objects
from oodtune.data.objects import ObjectBank, paste_object, paste_objects
from oodtune.data.segmentation import (
    ANOMALY_CLASSES,
    CAMVID_CLASSES,
    CAMVID_TO_CITYSCAPES,
    CITYSCAPES_CLASSES,
    anomaly_size,
    parse_size,
)
from oodtune.errors import DataError


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_camvid_loads_frames_labels_and_void(data_env: dict[str, Path]) -> None:
    base = write_camvid(data_env["root"])
    ds = load_segmentation("camvid", data_env["root"], "val")
    assert ds.images.shape == (4, H, W, 3) and ds.labels.shape == (4, H, W)
    assert ds.classes == CAMVID_CLASSES and ds.ignore_index == 11 and ds.name == "camvid-val"
    np.testing.assert_array_equal(ds.labels[0], _png(base / "valannot" / "f0.png"))
    np.testing.assert_array_equal(ds.images[2], _png(base / "val" / "f2.png"))
    counts = ds.class_pixel_counts()
    assert counts.sum() == (ds.labels != 11).sum() and counts.shape == (11,)


def test_resize_keeps_label_values_and_cache_is_reused(data_env: dict[str, Path]) -> None:
    write_camvid(data_env["root"])
    a = load_segmentation("camvid", data_env["root"], "train", size=(16, 8))
    assert a.size == (16, 8) and set(np.unique(a.labels)) <= set(range(12))
    assert list((data_env["cache"] / "segmentation").glob("camvid-train-16x8-*.npz"))
    b = load_segmentation("camvid", data_env["root"], "train", size=(16, 8))
    np.testing.assert_array_equal(a.images, b.images)


def test_camvid_relabelled_to_cityscapes_train_ids(data_env: dict[str, Path]) -> None:
    write_camvid(data_env["root"])
    plain = load_segmentation("camvid", data_env["root"], "test")
    city = load_segmentation("camvid-cityscapes", data_env["root"], "test")
    assert city.classes == CITYSCAPES_CLASSES and city.ignore_index == 255
    for i, name in enumerate(CAMVID_CLASSES):
        assert (city.labels[plain.labels == i] == CAMVID_TO_CITYSCAPES[name]).all()
    assert (city.labels[plain.labels == 11] == 255).all()


def test_road_anomaly_original_and_processed_layouts_agree(data_env: dict[str, Path], tmp_path: Path) -> None:
    labels = write_road_anomaly(data_env["root"])
    orig = load_segmentation("road-anomaly", data_env["root"])
    assert orig.classes == ANOMALY_CLASSES and orig.ignore_index == 255
    np.testing.assert_array_equal(orig.labels, np.stack(labels))
    other = tmp_path / "processed"
    write_processed(other / "road_anomaly", labels, suffix=".jpg")
    proc = load_segmentation("road-anomaly", other)
    np.testing.assert_array_equal(proc.labels, orig.labels)
    half = load_segmentation("road-anomaly", data_env["root"], height=16)
    assert half.size == (32, 16)


def test_fishyscapes_and_cityscapes_layouts(data_env: dict[str, Path]) -> None:
    lab = np.zeros((16, 24), dtype=np.uint8)
    lab[2:5, 3:9], lab[-1] = 1, 255
    write_processed(data_env["root"] / "fishyscapes" / "LostAndFound", [lab, lab])
    laf = load_segmentation("fishyscapes-laf", data_env["root"])
    assert laf.labels.shape == (2, 16, 24) and (laf.labels[0] == lab).all()
    with pytest.raises(DataError, match="fishyscapes/"):
        load_segmentation("fishyscapes-static", data_env["root"])
    truth = write_cityscapes(data_env["root"])
    city = load_segmentation("cityscapes", data_env["root"], "train")
    np.testing.assert_array_equal(city.labels, np.stack(truth))


def test_label_map_of_another_size_is_refused_naming_the_file(data_env: dict[str, Path]) -> None:
    base = write_camvid(data_env["root"])
    bad = base / "testannot" / "f1.png"
    Image.fromarray(np.zeros((H + 8, W), dtype=np.uint8)).save(bad)
    with pytest.raises(DataError, match=r"f1\.png.*label map is"):
        load_segmentation("camvid", data_env["root"], "test")


def test_label_values_outside_the_classes_are_refused(data_env: dict[str, Path]) -> None:
    base = write_camvid(data_env["root"])
    lab = np.full((H, W), 40, dtype=np.uint8)
    Image.fromarray(lab).save(base / "trainannot" / "f3.png")
    with pytest.raises(DataError, match=r"f3\.png: label values \[40\]"):
        load_segmentation("camvid", data_env["root"], "train")


def test_frames_of_mixed_sizes_are_refused(data_env: dict[str, Path]) -> None:
    base = write_camvid(data_env["root"])
    Image.fromarray(np.zeros((H, W + 8, 3), dtype=np.uint8)).save(base / "val" / "f2.png")
    Image.fromarray(np.zeros((H, W + 8), dtype=np.uint8)).save(base / "valannot" / "f2.png")
    with pytest.raises(DataError, match=r"f2\.png: frames of mixed sizes"):
        load_segmentation("camvid", data_env["root"], "val", size=(16, 8))


def test_missing_data_and_classification_loader_give_clear_errors(data_env: dict[str, Path]) -> None:
    with pytest.raises(DataError, match="camvid.*no data found"):
        load_segmentation("camvid", data_env["root"], "train")
    write_camvid(data_env["root"])
    with pytest.raises(DataError, match="segmentation set"):
        load_dataset("camvid", data_env["root"], "train")
    assert available_datasets()["camvid"].startswith("[segmentation]")
    assert "road-anomaly" in available_datasets() and "coco-objects" in available_datasets()


def test_object_bank_splits_are_disjoint_and_cropped(data_env: dict[str, Path]) -> None:
    write_objects(data_env["root"], train=10, val=3)
    banks = {s: load_objects("coco-objects", data_env["root"], s) for s in ("train", "val", "test")}
    assert (len(banks["train"]), len(banks["val"]), len(banks["test"])) == (8, 2, 3)
    keys = {s: {b.tobytes() for b in bank.images} for s, bank in banks.items()}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"]
    for img, mask in zip(banks["train"].images, banks["train"].masks, strict=True):
        assert img.shape[:2] == mask.shape and mask[0].any() and mask[:, 0].any()  # cropped to the mask


def test_object_bank_splits_by_source_photo(data_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects of one photo look alike: train and val never share a photo (here 4 objects per photo)."""
    base = write_objects(data_env["root"], train=40, val=4, per_photo=4)
    photo_of = {str(base / o["image"]): o["coco_image_id"]
                for o in json.loads((base / "objects.json").read_text())["objects"]}
    read: list[str] = []
    real = objects._read_rgb
    monkeypatch.setattr(objects, "_read_rgb", lambda path: read.append(str(path)) or real(path))
    photos, sizes = {}, {}
    for split in ("train", "val", "test"):
        read.clear()
        sizes[split] = len(load_objects("coco-objects", data_env["root"], split))
        photos[split] = {photo_of[p] for p in read}
    assert (len(photos["train"]), len(photos["val"])) == (8, 2)  # a fifth of the 10 train2017 photos
    assert sizes == {"train": 32, "val": 8, "test": 4}  # every object of a photo goes with it
    assert not photos["train"] & photos["val"] and not photos["train"] & photos["test"]


def test_object_bank_records_photos_and_storage_scales(data_env: dict[str, Path]) -> None:
    """The reference pasting mode pastes a photo's objects together, at their native size."""
    base = write_objects(data_env["root"], train=0, val=6, per_photo=2)
    listing = json.loads((base / "objects.json").read_text())
    listing["objects"][0]["stored_scale"] = 0.5
    (base / "objects.json").write_text(json.dumps(listing))
    bank = load_objects("coco-objects", data_env["root"], "test")
    assert bank.photo_groups() == ((0, 1), (2, 3), (4, 5))
    assert [bank.storage_scale(i) for i in range(3)] == [0.5, 1.0, 1.0]
    listing["objects"][0]["stored_scale"] = 2
    (base / "objects.json").write_text(json.dumps(listing))
    with pytest.raises(DataError, match="stored_scale 2"):
        load_objects("coco-objects", data_env["root"], "test")


def test_object_without_mask_is_refused(data_env: dict[str, Path]) -> None:
    base = write_objects(data_env["root"])
    listing = json.loads((base / "objects.json").read_text())
    del listing["objects"][1]["mask"]
    (base / "objects.json").write_text(json.dumps(listing))
    with pytest.raises(DataError, match="has no 'mask'"):
        load_objects("coco-objects", data_env["root"], "train")
    listing["objects"][1]["mask"] = "objects/missing_mask.png"
    (base / "objects.json").write_text(json.dumps(listing))
    with pytest.raises(DataError, match="missing_mask.png"):
        load_objects("coco-objects", data_env["root"], "train")


def test_paste_is_seeded_and_labels_exactly_the_pasted_pixels() -> None:
    frame, labels = np.zeros((40, 60, 3), np.uint8), np.zeros((40, 60), np.uint8)
    obj, mask = np.full((10, 6, 3), 200, np.uint8), np.ones((10, 6), bool)
    outs = []
    for _ in range(2):
        f, lab = frame.copy(), labels.copy()
        paste_object(f, lab, obj, mask, np.random.default_rng(5), 254)
        outs.append((f, lab))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    f, lab = outs[0]
    assert (lab == 254).any() and ((f[..., 0] == 200) == (lab == 254)).all()


def test_paste_objects_draws_one_object_per_frame_or_pastes_the_given_ones() -> None:
    """The one paste loop: by default each frame gets an object drawn just before it is pasted (the draws and pastes
    of :func:`paste_object` interleaved, so a seed gives the same frames as pasting one by one); with ``objects``,
    exactly those, into the first frames only."""
    bank = ObjectBank(tuple(np.full((8, 5, 3), v, np.uint8) for v in (100, 200)), (np.ones((8, 5), bool),) * 2,
                      ("a", "b"), "bank")
    frames, labels = np.zeros((3, 30, 40, 3), np.uint8), np.zeros((3, 30, 40), np.uint8)
    paste_objects(frames, labels, bank, np.random.default_rng(3), 7)
    want_f, want_l, rng = np.zeros_like(frames), np.zeros_like(labels), np.random.default_rng(3)
    for i in range(3):
        k = int(rng.integers(2))
        paste_object(want_f[i], want_l[i], bank.images[k], bank.masks[k], rng, 7)
    np.testing.assert_array_equal(frames, want_f)
    np.testing.assert_array_equal(labels, want_l)
    assert all((lab == 7).any() for lab in labels)
    frames, labels = np.zeros((3, 30, 40, 3), np.uint8), np.zeros((3, 30, 40), np.uint8)
    paste_objects(frames, labels, bank, np.random.default_rng(3), 7, objects=[1])
    assert set(np.unique(frames[0])) == {0, 200} and (labels[0] == 7).any()
    assert not frames[1:].any() and not labels[1:].any()


def test_pasted_anomaly_set_is_reproducible_and_cached(data_env: dict[str, Path]) -> None:
    write_camvid(data_env["root"])
    write_objects(data_env["root"])
    a = load_segmentation("camvid-pasted", data_env["root"])
    assert a.classes == ANOMALY_CLASSES and set(np.unique(a.labels)) <= {0, 1, 255}
    assert (a.labels == 1).any(axis=(1, 2)).all()  # one object in every frame
    plain = load_segmentation("camvid", data_env["root"], "test")
    assert ((a.labels == 255) <= (plain.labels == 11)).all()  # void only where CamVid is void
    cached = sorted((data_env["cache"] / "segmentation").glob("camvid-pasted-*.npz"))
    assert cached
    b = load_segmentation("camvid-pasted", data_env["root"])
    np.testing.assert_array_equal(a.images, b.images)
    val = load_segmentation("camvid-pasted-val", data_env["root"])
    assert not np.array_equal(val.images, a.images)


def test_sizes() -> None:
    assert parse_size("480x360") == (480, 360)
    with pytest.raises(DataError, match="WIDTHxHEIGHT"):
        parse_size("480")
    assert anomaly_size((1280, 720), 360) == (640, 360)
    assert anomaly_size((1280, 720), 240) == (424, 240)
