"""The cifar10-offline protocol: committed overlap list and Tiny ImageNet half split."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

from fixtures_data import write_tiny_imagenet
from oodtune.data import PROTOCOLS, DataError, available_datasets, load_dataset
from oodtune.data.protocol import build_split, read_overlap, read_split

CIFAR10 = {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}


def test_overlap_file_format_and_content():
    text = resources.files("oodtune").joinpath("protocols", "tin_cifar10_overlap.txt").read_text()
    assert text.startswith("#") and "Rule" in text
    overlap = read_overlap()
    assert len(overlap) >= 20
    for wnid, (words, cls) in overlap.items():
        assert wnid.startswith("n") and len(wnid) == 9 and words and cls in CIFAR10
    names = {w.split(",")[0] for w, _ in overlap.values()}
    for must in ("tabby", "Persian cat", "Egyptian cat", "goose", "king penguin", "Chihuahua", "golden retriever",
                 "bullfrog", "sports car", "convertible", "limousine", "moving van", "lifeboat"):
        assert must in names
    assert "lion" not in names  # big cats are kept (documented in the file header)


def test_split_json_matches_rule_and_overlap():
    split = read_split()
    raw = json.loads(resources.files("oodtune").joinpath("protocols", "tin_split.json").read_text())
    assert raw["seed"] == 0
    everything = set(split["auxiliary"]) | set(split["near_ood"]) | set(split["removed_overlap"])
    assert len(everything) == 200
    assert set(split["removed_overlap"]) == set(read_overlap())
    assert not set(split["auxiliary"]) & set(split["near_ood"])
    assert not (set(split["auxiliary"]) | set(split["near_ood"])) & set(read_overlap())
    assert build_split(everything, read_overlap(), seed=0) == split
    for key in ("auxiliary", "near_ood", "removed_overlap"):
        assert split[key] == sorted(split[key])


def test_protocols_entry():
    p = PROTOCOLS["cifar10-offline"]
    assert p["id"] == "cifar10" and p["aux"] == "tin-aux" and p["near"] == ["tin-near"]
    assert p["far"] == ["dtd", "mnist", "fashion-mnist", "omniglot", "gaussian"]
    names = available_datasets()
    assert all(n in names for n in [p["id"], p["aux"], *p["near"], *p["far"]])


def test_tin_aux_and_near_load_right_halves(data_env):
    split = read_split()
    wnids = sorted(set().union(*split.values()))
    write_tiny_imagenet(data_env["root"], wnids, train_per_class=1, val_per_class=1, size=4, test=0)
    aux = load_dataset("tin-aux", data_env["root"], resolution=4)
    near = load_dataset("tin-near", data_env["root"], resolution=4)
    assert aux.labels is None and near.labels is None
    assert len(aux) == len(split["auxiliary"]) and len(near) == len(split["near_ood"])
    full_train = load_dataset("tiny-imagenet", data_env["root"], "train", resolution=4)
    keep = np.isin(np.asarray(full_train.classes)[full_train.labels], split["auxiliary"])
    np.testing.assert_array_equal(aux.images, full_train.images[keep])
    assert aux.name == "tin-aux" and near.name == "tin-near"
    with pytest.raises(DataError, match="fixed by the protocol"):
        load_dataset("tin-near", data_env["root"], "train")


def test_tin_protocol_rejects_other_class_sets(data_env):
    write_tiny_imagenet(data_env["root"], ["n00000001", "n00000002"])
    with pytest.raises(DataError, match="Tiny ImageNet-200"):
        load_dataset("tin-aux", data_env["root"])
