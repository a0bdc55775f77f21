"""Held-out parts of the ID data: seeded stratified hold-outs, folder datasets without split folders (never the
same images for training and testing), validation parts excluded from training, moved datasets, per-epoch test
and validation accuracy with its CSV log."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import oodtune.pipeline as pipe
from fixtures_data import write_labelled_folder
from oodtune.data import load_dataset
from oodtune.data.registry import has_test_split, resolve_dataset
from oodtune.data.splits import TEST_STREAM, VAL_STREAM, holdout_indices
from oodtune.errors import ConfigError, DataError
from oodtune.models import read_meta
from oodtune.training.config import TrainConfig

CFG = TrainConfig(epochs=2, batch_size=8, max_steps_per_epoch=1, lr=0.01, device="cpu", precision="fp32")


def _keys(images: np.ndarray) -> set[bytes]:
    return {img.tobytes() for img in images}


# ------------------------------------------------------------------------------------------ hold-out indices

def test_holdout_is_stratified_seeded_and_disjoint():
    labels = np.r_[np.zeros(10, int), np.ones(30, int), np.full(1, 2)]
    keep, held = holdout_indices(labels, labels.size, 0.2, seed=0, stream=VAL_STREAM)
    assert np.bincount(labels[held], minlength=3).tolist() == [2, 6, 0]  # a single-image class stays in training
    assert set(keep) | set(held) == set(range(labels.size)) and not set(keep) & set(held)
    again = holdout_indices(labels, labels.size, 0.2, seed=0, stream=VAL_STREAM)[1]
    np.testing.assert_array_equal(held, again)
    assert not np.array_equal(held, holdout_indices(labels, labels.size, 0.2, seed=1, stream=VAL_STREAM)[1])
    assert not np.array_equal(held, holdout_indices(labels, labels.size, 0.2, seed=0, stream=TEST_STREAM)[1])
    assert holdout_indices(None, 50, 0.1, 0, 1)[1].size == 5
    with pytest.raises(DataError, match="strictly between"):
        holdout_indices(labels, labels.size, 1.0, 0, 1)


# ---------------------------------------------------------------------------------------- folder datasets

def test_folder_split_folders(data_env, tmp_path):
    root = data_env["root"]
    flat = write_labelled_folder(tmp_path / "flat", ["a", "b"], per_class=3)
    assert not has_test_split(f"folder:{flat}", root) and has_test_split("cifar10", root)
    split = write_labelled_folder(tmp_path / "split" / "train", ["a", "b"], per_class=2).parent
    with pytest.raises(DataError, match="no test/ sub-folder"):
        load_dataset(f"folder:{split}", root, "test")
    write_labelled_folder(split / "test", ["a", "b"], per_class=1)
    assert has_test_split(f"folder:{split}", root) and len(load_dataset(f"folder:{split}", root, "test")) == 2


def test_checkpoints_record_absolute_paths(data_env, tmp_path, monkeypatch):
    write_labelled_folder(tmp_path / "rel" / "pics", ["a", "b"], per_class=1)
    monkeypatch.chdir(tmp_path / "rel")
    assert resolve_dataset("folder:pics", data_env["root"]) == f"folder:{(tmp_path / 'rel' / 'pics').resolve()}"
    assert resolve_dataset("CIFAR-10", data_env["root"]) == "cifar10"


@pytest.fixture
def folder_run(data_env, tmp_path) -> tuple[Path, Path]:
    pics = write_labelled_folder(tmp_path / "pics", ["a", "b", "c"], per_class=20, size=16)
    ckpt = pipe.pretrain(tmp_path / "run", dataset=f"folder:{pics}", arch="wrn-10-1", data_root=data_env["root"],
                         config=CFG, resolution=16, val_fraction=0.25)
    return pics, ckpt


def test_folder_without_splits_never_tests_on_training_images(folder_run, data_env):
    pics, ckpt = folder_run
    meta = read_meta(ckpt)
    assert meta.dataset == f"folder:{pics.resolve()}" and meta.test_fraction == pipe.DEFAULT_TEST_FRACTION
    assert meta.val_fraction == 0.25 and meta.source_size == 60
    train, val, test = pipe.id_parts(meta, data_env["root"])
    assert val is not None and test is not None
    assert (len(train), len(val), len(test)) == (36, 12, 12)  # 20 % test, then 25 % of the rest as validation
    parts = [_keys(p.images) for p in (train, val, test)]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert _keys(pipe.id_train_set(meta, data_env["root"]).images) == parts[0]  # what training and fine-tuning see
    assert _keys(pipe.id_test_set(meta, data_env["root"]).images) == parts[2]
    assert list(meta.class_counts) == np.bincount(train.labels).tolist()


def test_test_fraction_only_for_datasets_without_a_test_split(data_env, tmp_path):
    split = write_labelled_folder(tmp_path / "split" / "train", ["a", "b"], per_class=2).parent
    write_labelled_folder(split / "test", ["a", "b"], per_class=1)
    with pytest.raises(ConfigError, match="test split of its own"):
        pipe.pretrain(tmp_path / "run", dataset=f"folder:{split}", arch="wrn-10-1", data_root=data_env["root"],
                      config=CFG, resolution=16, test_fraction=0.3)


def test_pretrain_reports_test_and_val_accuracy_per_epoch(folder_run):
    _, ckpt = folder_run
    history = read_meta(ckpt).history
    assert len(history) == 2 and all(0 <= h["test_acc"] <= 1 and 0 <= h["val_acc"] <= 1 for h in history)
    with open(ckpt.parent / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and {"test_acc", "val_acc", "train_acc"} <= set(rows[0])
    assert float(rows[1]["test_acc"]) == pytest.approx(history[1]["test_acc"])


def test_moved_or_changed_dataset(folder_run, data_env, tmp_path):
    pics, ckpt = folder_run
    moved = tmp_path / "moved"
    shutil.move(pics, moved)
    meta = read_meta(ckpt)
    with pytest.raises(DataError, match="--id-data folder:NEW/PATH"):
        pipe.id_test_set(meta, data_env["root"])
    source = pipe.DataSource(data_env["root"])
    renamed = pipe.with_id_data(meta, f"folder:{moved}", source)
    assert len(pipe.id_test_set(renamed, source)) == 12
    (moved / "a" / "img0.png").unlink()
    with pytest.raises(DataError, match="had 60"):
        pipe.id_parts(renamed, pipe.DataSource(data_env["root"]))
    other = write_labelled_folder(tmp_path / "other", ["x", "y", "z"], per_class=20, size=16)
    with pytest.raises(DataError, match="--id-data"):
        pipe.id_parts(pipe.with_id_data(meta, f"folder:{other}", source), source)


def test_one_normalizer_for_every_task_honours_the_channel_order() -> None:
    """``pipeline.normalizer_for`` serves classification and segmentation checkpoints: mean/std as recorded, and the
    channel order (a BGR network gets its input's channels reversed)."""
    from oodtune.models import RunMeta

    base = {"arch": "wrn-16-1", "num_classes": 2, "classes": ("a", "b"), "mean": (0.1, 0.2, 0.3),
            "std": (0.4, 0.5, 0.6), "resolution": 8, "dataset": "x"}
    rgb = pipe.normalizer_for(RunMeta(**base))
    bgr = pipe.normalizer_for(RunMeta(**base, channel_order="bgr"))
    assert (rgb.mean, rgb.std, rgb.bgr, bgr.bgr) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), False, True)
    x = torch.tensor([10, 20, 30], dtype=torch.uint8).view(1, 3, 1, 1)  # R, G, B
    mean, std = torch.tensor(base["mean"]).view(1, 3, 1, 1), torch.tensor(base["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(bgr(x), (x.flip(1).float() / 255 - mean) / std)  # B, G, R
    torch.testing.assert_close(rgb(x), (x.float() / 255 - mean) / std)


def test_each_task_has_its_own_evaluation_options() -> None:
    """Task.evaluate takes its task's options object; an option of the other task is refused before any work."""
    from dataclasses import fields

    from oodtune.pipeline.classification import ClassificationEvaluation, ClassificationTask
    from oodtune.pipeline.segmentation import SegmentationEvaluation, SegmentationTask

    spec = pipe.ValidationSpec(outliers="tin-aux-val")
    assert ClassificationTask().evaluation_options(validation=spec) == ClassificationEvaluation(validation=spec)
    assert SegmentationTask().evaluation_options(blur=True) == SegmentationEvaluation(blur=True)
    assert [f.name for f in fields(ClassificationEvaluation)] == ["validation"]
    assert [f.name for f in fields(SegmentationEvaluation)] == ["blur", "id_metrics", "also_blurred", "exact"]
    assert not SegmentationTask().evaluation_options(id_metrics=False).id_metrics
    assert SegmentationTask().evaluation_options(exact=True).exact
    assert SegmentationTask().evaluation_options(also_blurred=True).also_blurred
    with pytest.raises(ConfigError, match="segmentation checkpoints only"):
        ClassificationTask().evaluation_options(also_blurred=True)
    with pytest.raises(ConfigError, match="segmentation checkpoints only"):
        ClassificationTask().evaluation_options(blur=True)
    with pytest.raises(ConfigError, match="drop it"):
        ClassificationTask().evaluation_options(id_metrics=False)
    with pytest.raises(ConfigError, match="always exact"):
        ClassificationTask().evaluation_options(exact=True)
    with pytest.raises(ConfigError, match="classification checkpoints only"):
        SegmentationTask().evaluation_options(validation=spec)
