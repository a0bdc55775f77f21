"""Data sets larger than memory: the on-disk decode cache, DiskImages reads, the resident/streamed choice, training
and scoring from disk (same results as from memory), crash safety of the cache, data-parallel ranks reading only
their shard."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import oodtune.data.layouts as layouts
from fixtures_data import write_labelled_folder
from helpers_training import assert_states_equal, free_port, make_trainer, random_imageset, state_of
from oodtune.data import DataError, ImageSet, load_dataset
from oodtune.data.cache import images_file, store_chunks
from oodtune.data.diskimages import DiskImages
from oodtune.data.streaming import RESIDENT_FRACTION, DeviceImages, choose_placement
from oodtune.data.tensors import Normalizer
from oodtune.evaluation import compute_outputs
from oodtune.losses import build_method_loss


def on_disk(ds: ImageSet, folder: Path) -> ImageSet:
    """``ds`` written as a cache entry under ``folder`` and opened from disk."""
    entry = folder / "set.npz"
    assert store_chunks(entry, ds.images.shape, [ds.images[:7], ds.images[7:]], ds.labels, ds.classes, ds.name)
    with np.load(entry) as z:
        fingerprint = str(z["fingerprint"])
    return ImageSet(DiskImages(images_file(entry), fingerprint), ds.labels, ds.classes, ds.name)


def test_disk_images_read_rows_in_the_order_asked(tmp_path: Path) -> None:
    ds = random_imageset(40, seed=3)
    disk = on_disk(ds, tmp_path).images
    assert isinstance(disk, DiskImages) and disk.shape == ds.images.shape and len(disk) == 40
    rows = np.array([5, 3, 4, 39, 0, 4, -1])
    np.testing.assert_array_equal(disk[rows], ds.images[rows])
    np.testing.assert_array_equal(disk[2:9:3], ds.images[2:9:3])
    np.testing.assert_array_equal(disk[7], ds.images[7])
    np.testing.assert_array_equal(disk[:, ::4, ::4], ds.images[:, ::4, ::4])
    np.testing.assert_array_equal(np.asarray(disk), ds.images)
    view = disk.view(np.array([9, 1, 30]))
    np.testing.assert_array_equal(view[[2, 0]], ds.images[[30, 9]])
    np.testing.assert_array_equal(view.view(np.array([1]))[0], ds.images[1])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(view))[[0, 1, 2]], ds.images[[9, 1, 30]])
    with pytest.raises(IndexError):
        disk[np.array([40])]


def test_fingerprint_of_a_set_on_disk_is_the_in_memory_one(tmp_path: Path) -> None:
    ds = random_imageset(30, seed=4)
    disk = on_disk(ds, tmp_path)
    assert disk.fingerprint() == ds.fingerprint()
    part = disk.subset(np.array([3, 1, 2]))
    assert isinstance(part.images, DiskImages)
    np.testing.assert_array_equal(np.asarray(part.images), ds.images[[3, 1, 2]])
    assert part.labels is not None and list(part.labels) == list(ds.labels[[3, 1, 2]])  # type: ignore[index]
    assert part.fingerprint() != disk.subset(np.array([3, 2, 1])).fingerprint() != disk.fingerprint()


def test_a_truncated_images_file_is_refused(tmp_path: Path) -> None:
    disk = on_disk(random_imageset(10), tmp_path).images
    path = disk.path
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        DiskImages(path, "x")


def test_large_sets_stay_on_disk_with_the_same_pixels(data_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    pics = write_labelled_folder(tmp_path / "pics", ["a", "b"], per_class=5)
    memory = load_dataset(f"folder:{pics}", data_env["root"])
    assert isinstance(memory.images, np.ndarray)
    monkeypatch.setenv("OODTUNE_IN_MEMORY_MB", "0")
    disk = load_dataset(f"folder:{pics}", data_env["root"])  # the same cache entry, now opened on disk
    assert isinstance(disk.images, DiskImages)
    np.testing.assert_array_equal(np.asarray(disk.images), memory.images)
    assert disk.fingerprint() == memory.fingerprint() and disk.classes == memory.classes
    sub = load_dataset(f"folder:{pics}", data_env["root"], num_images=4, seed=1)
    assert isinstance(sub.images, DiskImages) and len(sub) == 4


def test_a_set_decoded_from_files_is_streamed_into_the_cache(data_env: dict[str, Path],
                                                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Decoding never builds the whole array: the decoded chunks go straight to the file."""
    pics = write_labelled_folder(tmp_path / "pics", ["a", "b"], per_class=3)
    monkeypatch.setenv("OODTUNE_IN_MEMORY_MB", "0")

    def whole_array(*a: Any, **k: Any) -> None:
        raise AssertionError("decoded into one array in memory")

    monkeypatch.setattr(layouts, "decode_files", whole_array)
    assert isinstance(load_dataset(f"folder:{pics}", data_env["root"]).images, DiskImages)


def test_a_crash_while_writing_the_cache_leaves_no_entry(data_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    pics = write_labelled_folder(tmp_path / "pics", ["a", "b"], per_class=3)
    real = layouts.iter_decoded

    def dies_after_one_chunk(paths: Any, resolution: int, *a: Any, **k: Any) -> Any:
        yield next(iter(real(paths[:2], resolution)))
        raise KeyboardInterrupt

    monkeypatch.setattr(layouts, "iter_decoded", dies_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(f"folder:{pics}", data_env["root"])
    folder = data_env["cache"] / "images"
    assert not [p.name for p in folder.iterdir()], "no entry and no temporary"
    monkeypatch.setattr(layouts, "iter_decoded", real)
    first = load_dataset(f"folder:{pics}", data_env["root"])
    # images written but the metadata (the commit mark) missing, or the images cut short: rebuilt, never used
    (entry,) = folder.glob("*.npz")
    entry.unlink()
    np.testing.assert_array_equal(load_dataset(f"folder:{pics}", data_env["root"]).images, first.images)
    images_file(entry).write_bytes(images_file(entry).read_bytes()[:-100])
    np.testing.assert_array_equal(load_dataset(f"folder:{pics}", data_env["root"]).images, first.images)


def test_placement_choice() -> None:
    gib = 2**30
    assert choose_placement(3 * gib, False, "cpu").mode == "resident"
    assert choose_placement(3 * gib, True, "cpu").mode == "streamed"
    fits = choose_placement(int(RESIDENT_FRACTION * 10 * gib), True, "cuda", 10 * gib)
    assert fits.mode == "resident" and "10.0 GiB free" in fits.reason
    big = choose_placement(6 * gib, False, "cuda", 10 * gib)
    assert big.mode == "streamed" and "host memory" in big.reason
    assert choose_placement(6 * gib, True, "cuda", 10 * gib).reason.endswith("host disk")


def test_device_images_streamed_equals_resident(tmp_path: Path) -> None:
    ds = random_imageset(50, seed=5)
    disk = on_disk(ds, tmp_path)
    cpu = torch.device("cpu")
    streamed, resident = DeviceImages(disk.images, cpu), DeviceImages(ds.images, cpu)
    assert streamed.streamed and not resident.streamed
    idx = [torch.tensor([4, 2, 49]), torch.tensor([0, 1]), torch.tensor([7])]
    got = [streamed[i] for i in streamed.prefetched(iter(idx))]
    for i, g in zip(idx, got, strict=True):
        assert torch.equal(g, resident[i]) and g.shape == (len(i), 3, 16, 16)
    assert [b.shape[0] for b in streamed.batches(16)] == [16, 16, 16, 2]
    assert torch.equal(torch.cat(list(streamed.batches(16))), torch.cat(list(resident.batches(16))))


def test_training_and_scoring_from_disk_match_memory(tmp_path: Path) -> None:
    ds, outliers = random_imageset(96, seed=6), random_imageset(128, seed=7, labelled=False, name="out")
    disk, disk_out = on_disk(ds, tmp_path / "id"), on_disk(outliers, tmp_path / "ood")
    runs = []
    for train, aux in ((ds, outliers), (disk, disk_out)):
        trainer = make_trainer(train, build_method_loss("energy-oe"), outliers=aux, epochs=1)
        trainer.fit()
        runs.append(state_of(trainer.net))
        assert trainer.train_x.streamed == (train is disk)
    assert_states_equal(*runs)
    net = make_trainer(ds, build_method_loss("ce")).net
    a = compute_outputs(net, ds, Normalizer(), device="cpu", batch_size=40, show_progress=False)
    b = compute_outputs(net, disk, Normalizer(), device="cpu", batch_size=40, show_progress=False)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.features, b.features)


def _shard_worker(rank: int, world: int, port: int, entry: str, out_dir: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), OODTUNE_PROGRESS="0")
    torch.set_num_threads(1)
    with np.load(entry) as z:
        labels, classes, fingerprint = z["labels"], tuple(str(c) for c in z["classes"]), str(z["fingerprint"])
    images = DiskImages(images_file(Path(entry)), fingerprint)
    read: list[list[int]] = []
    real_read = images.read

    def recording_read(rows: np.ndarray) -> np.ndarray:
        read.append([int(r) for r in rows])
        return real_read(rows)

    images.read = recording_read  # type: ignore[method-assign]
    trainer = make_trainer(ImageSet(images, labels, classes, "disk"), build_method_loss("ce"), batch_size=16,
                           epochs=1)
    trainer.fit()
    torch.save({"read": read, "bytes": images.bytes_read}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.e2e  # training processes
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_data_parallel_ranks_stream_their_own_shard(tmp_path: Path) -> None:
    ds = random_imageset(64, seed=8)
    entry = tmp_path / "set.npz"
    store_chunks(entry, ds.images.shape, [ds.images], ds.labels, ds.classes, ds.name)
    mp.spawn(_shard_worker, args=(2, free_port(), str(entry), str(tmp_path)), nprocs=2, join=True)
    reports = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    steps = [r["read"] for r in reports]
    assert len(steps[0]) == len(steps[1]) == 4  # 64 images, global batch 16
    for a, b in zip(*steps, strict=True):
        assert len(a) == len(b) == 8 and not set(a) & set(b)  # each rank reads its half of each global batch
    assert {i for s in steps for rows in s for i in rows} == set(range(64))
    assert reports[0]["bytes"] == reports[1]["bytes"] == 32 * 16 * 16 * 3
