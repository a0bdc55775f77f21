"""The ImageNet-1k OOD benchmark of OpenOOD v1.5 read from fixtures written in its official layout: image lists
under benchmark_imglist/imagenet/, images under images_largescale/ and images_classic/; the bundled config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fixtures_data import write_image
from oodtune.benchmark.config import load_benchmark_config
from oodtune.benchmark.examples import find_config
from oodtune.data import PROTOCOLS, DataError, load_dataset
from oodtune.data.openood import LIST_DIR, OOD_LISTS

OOD_DIRS = {"test_ssb_hard.txt": "ssb_hard", "test_ninco.txt": "ninco", "test_inaturalist.txt": "inaturalist",
            "test_openimage_o.txt": "openimage_o", "val_openimage_o.txt": "openimage_o"}


def write_openood(root: Path) -> dict[str, list[tuple[str, int]]]:
    """A tiny OpenOOD v1.5 ImageNet data root; returns list name -> its (path, label) lines."""
    lists: dict[str, list[tuple[str, int]]] = {}
    for split, count in (("train", 6), ("val", 3), ("test", 5)):
        folder = "train/n01440764" if split == "train" else "val"
        lines = [(f"imagenet_1k/{folder}/ILSVRC2012_{split}_{i:08d}.JPEG", (7 * i + 3) % 1000) for i in range(count)]
        lists[f"{split}_imagenet.txt"] = lines
    for name, sub in OOD_DIRS.items():
        lists[name] = [(f"{sub}/{name[:-4]}_{i}.jpg", -1) for i in range(4)]
    lists["test_textures.txt"] = [(f"texture/banded/banded_{i:04d}.jpg", -1) for i in range(4)]
    for name, lines in lists.items():
        tree = root / ("images_classic" if name == "test_textures.txt" else "images_largescale")
        for i, (path, _) in enumerate(lines):
            write_image(tree / path, (40, 30), seed=hash(name) % 1000 + i)
        (root / LIST_DIR).mkdir(parents=True, exist_ok=True)
        (root / LIST_DIR / name).write_text("".join(f"{p} {lab}\n" for p, lab in lines))
    return lists


def test_id_splits_follow_the_lists(data_env: dict[str, Path]) -> None:
    lists = write_openood(data_env["root"])
    test = load_dataset("openood-imagenet", data_env["root"], "test", resolution=16)
    assert test.num_classes == 1000 and len(test) == 5 and test.images.shape == (5, 16, 16, 3)
    assert test.labels is not None and list(test.labels) == [lab for _, lab in lists["test_imagenet.txt"]]
    assert len(load_dataset("openood-imagenet", data_env["root"], "train", resolution=16)) == 6
    assert len(load_dataset("openood-imagenet", data_env["root"], "val", resolution=16)) == 3


def test_ood_sets_from_both_image_trees(data_env: dict[str, Path]) -> None:
    write_openood(data_env["root"] / "openood")  # also found under ROOT/openood
    for name in OOD_LISTS:
        ds = load_dataset(name, data_env["root"], resolution=16)
        assert ds.labels is None and len(ds) == 4, name
    textures = load_dataset("openood-textures", data_env["root"], resolution=16)
    assert not np.array_equal(textures.images, load_dataset("openood-ninco", data_env["root"], resolution=16).images)


def test_bad_lists_are_explained(data_env: dict[str, Path]) -> None:
    root = data_env["root"]
    with pytest.raises(DataError, match="test_ninco.txt was not found"):
        load_dataset("openood-ninco", root, resolution=16)
    write_openood(root)
    ninco = root / LIST_DIR / "test_ninco.txt"
    ninco.write_text("ninco/missing.jpg -1\n")
    with pytest.raises(DataError, match="test_ninco.txt:1: .* is listed but missing"):
        load_dataset("openood-ninco", root, resolution=16)
    ninco.write_text("../../etc/passwd -1\n")
    with pytest.raises(DataError, match="points outside"):
        load_dataset("openood-ninco", root, resolution=16)
    ninco.write_text("ninco/test_ninco_0.jpg\n")
    with pytest.raises(DataError, match="expected 'PATH LABEL'"):
        load_dataset("openood-ninco", root, resolution=16)
    (root / LIST_DIR / "test_imagenet.txt").write_text("imagenet_1k/val/ILSVRC2012_test_00000000.JPEG 1000\n")
    with pytest.raises(DataError, match="label 1000 outside"):
        load_dataset("openood-imagenet", root, "test", resolution=16)


def test_bundled_benchmark_config_is_the_openood_protocol() -> None:
    cfg = load_benchmark_config(find_config("imagenet-openood"))
    protocol = PROTOCOLS["openood-imagenet"]
    assert cfg.id_dataset == "openood-imagenet" and cfg.protocol == "openood-imagenet"
    assert cfg.ood_near == ["openood-ssb-hard", "openood-ninco"] == protocol["near"]
    assert cfg.ood_far == ["openood-inaturalist", "openood-textures", "openood-openimage-o"] == protocol["far"]
    assert cfg.pretrained and all(m.posthoc for m in cfg.methods)
    assert cfg.matrix is not None and cfg.matrix.validation_outliers == "openood-openimage-o-val"


@pytest.mark.e2e  # real CLI runs
def test_an_imported_imagenet_model_is_evaluated_on_the_openood_sets(data_env: dict[str, Path]) -> None:
    import torch

    from helpers_cli import ok
    from oodtune.models import build_model

    root, tmp = data_env["root"], data_env["tmp"]
    write_openood(root)
    torch.manual_seed(0)
    torch.save(build_model("wrn-10-1", 1000).state_dict(), tmp / "weights.pt")
    ok("import-model", tmp / "weights.pt", "--arch", "wrn-10-1", "--dataset", "openood-imagenet", "--resolution",
       "32", "--out", tmp / "in1k.pt", "--data-root", root, "--device", "cpu")
    res = ok("evaluate", tmp / "in1k.pt", "--score", "energy", "--score", "msp", "--ood", "openood-ssb-hard", "--ood",
             "openood-textures", "--data-root", root, "--device", "cpu")
    assert "openood-ssb-hard" in res.output and "openood-textures" in res.output
