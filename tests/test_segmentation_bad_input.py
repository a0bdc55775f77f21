"""Segmentation data and commands under clumsy input: label values a set does not define, an ID test set with
no labelled pixel, frame and object listings of the wrong shape, a missing pretrained segmenter, and calibrate on
a segmenter. Each is one clear error naming the file (or the set) and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures_segmentation import (
    write_camvid,
    write_espnet_weights,
    write_objects,
    write_road_anomaly,
    write_segmentation_root,
)
from helpers_cli import fails
from oodtune import pipeline
from oodtune.benchmark import load_benchmark_config, run_benchmark
from oodtune.data.objects import load_object_bank
from oodtune.data.segmentation import load_segmentation_set
from oodtune.errors import CheckpointError, DataError


def _load(name: str, env: dict[str, Path], split: str = "test") -> object:
    return load_segmentation_set(name, env["root"], split, None, env["tmp"] / "cache")


@pytest.mark.parametrize("value", [7, 1, 255])
def test_road_anomaly_mask_values_other_than_its_documented_ones_are_an_error(data_env, value: int) -> None:
    write_road_anomaly(data_env["root"])
    mask = data_env["root"] / "RoadAnomaly_jpg" / "frames" / "frame1.labels" / "labels_semantic.png"
    arr = np.asarray(Image.open(mask)).copy()
    arr[0, :3] = value
    Image.fromarray(arr).save(mask)
    with pytest.raises(DataError, match=rf"labels_semantic.png.*\[{value}\]"):
        _load("road-anomaly", data_env)


def test_camvid_relabelled_to_cityscapes_refuses_unknown_values(data_env) -> None:
    write_camvid(data_env["root"], frames=1)
    annot = data_env["root"] / "camvid-segnet" / "testannot" / "f0.png"
    arr = np.asarray(Image.open(annot)).copy()
    arr[0, 0] = 40
    Image.fromarray(arr).save(annot)
    with pytest.raises(DataError, match=r"f0.png.*\[40\]"):
        _load("camvid-cityscapes", data_env)


@pytest.mark.parametrize("listing", ["5", "[1, 2]", '{"a": 1}', '["frame0.jpg", null]'])
def test_a_frame_list_that_is_not_a_list_of_names_is_an_error(data_env, listing: str) -> None:
    write_road_anomaly(data_env["root"])
    (data_env["root"] / "RoadAnomaly_jpg" / "frame_list.json").write_text(listing)
    with pytest.raises(DataError, match="frame_list.json.*list of frame file names"):
        _load("road-anomaly", data_env)


@pytest.mark.parametrize(("key", "value"), [("image", 5), ("mask", ["m.png"]), ("split", None)])
def test_an_object_listing_entry_of_the_wrong_type_is_an_error(data_env, key: str, value: object) -> None:
    base = write_objects(data_env["root"])
    listing = json.loads((base / "objects.json").read_text())
    listing["objects"][1][key] = value
    (base / "objects.json").write_text(json.dumps(listing))
    with pytest.raises(DataError, match=f"objects.json: object #1.*'{key}'"):
        load_object_bank(data_env["root"], "train", data_env["tmp"] / "cache")


@pytest.fixture
def seg_ckpt(data_env: dict[str, Path]) -> Path:
    write_segmentation_root(data_env["root"])
    weights = write_espnet_weights(data_env["tmp"] / "espnet.pth")
    return pipeline.import_segmenter(weights, data_env["tmp"] / "seg.pt", arch="espnet-camvid", dataset="camvid",
                                     data_root=data_env["root"])


@pytest.mark.e2e
def test_an_id_test_set_without_labelled_pixels_is_an_error(data_env, seg_ckpt: Path) -> None:
    for annot in (data_env["root"] / "camvid-segnet" / "testannot").iterdir():
        Image.fromarray(np.full((24, 32), 11, np.uint8)).save(annot)
    res = fails("evaluate", seg_ckpt, "--ood", "road-anomaly", "--data-root", data_env["root"], "--device", "cpu",
                match="no labelled pixel", code=1)
    assert "nan" not in res.output.lower() and "camvid" in res.output


def test_a_segmentation_benchmark_names_its_missing_pretrained_file(data_env, tmp_path: Path) -> None:
    write_segmentation_root(data_env["root"])
    config = tmp_path / "seg.toml"
    missing = tmp_path / "nowhere" / "seg.pt"
    config.write_text(f'[benchmark]\nid_dataset = "camvid"\npretrained = "{missing}"\nood_far = ["road-anomaly"]\n'
                      f'out = "{tmp_path / "bench"}"\ndevice = "cpu"\n[[methods]]\nlabel = "E"\nmethod = "energy"\n')
    cfg = load_benchmark_config(config, data_root=str(data_env["root"]))
    with pytest.raises(CheckpointError, match=f"{missing}.*does not exist") as info:
        run_benchmark(cfg, "test")
    assert "image-classification" not in str(info.value)
