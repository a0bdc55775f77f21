"""Generators of tiny datasets in the *official* on-disk formats, for the data-layer tests.

Everything is written at test time into a temporary folder; nothing here reads /work/shared.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import textwrap
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]



#: The [pretrain] and [finetune] sections of the tiny benchmark configs in the tests (one step per epoch).
TINY_TRAINING_TOML = """
[pretrain]
epochs = {pretrain_epochs}
batch_size = 8
max_steps_per_epoch = 1
lr = 0.01

[finetune]
epochs = 1
batch_size = 8
outlier_batch_size = 16
max_steps_per_epoch = 1
lr = {finetune_lr}
"""

def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------- CIFAR

def _pickle_batch(path: Path, data: np.ndarray, labels: np.ndarray, label_key: bytes) -> None:
    obj = {b"batch_label": b"fixture", label_key: [int(x) for x in labels], b"data": data,
           b"filenames": [b"x.png"] * len(labels)}
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10(root: Path, per_batch: int = 20, seed: int = 0,
                  test_per_batch: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``root/cifar-10-batches-py`` with 5 train batches + test batch + meta. Returns NHWC arrays per split.

    Each batch holds ``per_batch`` images (the test batch ``test_per_batch``, default ``per_batch``).
    """
    rng = _rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    (d / "batches.meta").write_bytes(pickle.dumps(
        {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072, b"num_cases_per_batch": per_batch},
        protocol=2))
    out: dict[str, list] = {"train": [[], []], "test": [[], []]}
    for name, split in [*[(f"data_batch_{i}", "train") for i in range(1, 6)], ("test_batch", "test")]:
        n = per_batch if split == "train" or test_per_batch is None else test_per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = np.arange(n) % 10
        _pickle_batch(d / name, data, labels, b"labels")
        out[split][0].append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        out[split][1].append(labels)
    return {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in out.items()}


def write_cifar100(root: Path, n: int = 30, seed: int = 1) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``root/cifar-100-python/{train,test,meta}`` with fine and coarse labels."""
    rng = _rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i:03d}".encode() for i in range(100)],
                                           b"coarse_label_names": [f"s{i:02d}".encode() for i in range(20)]}))
    out = {}
    for split in ("train", "test"):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n)
        obj = {b"data": data, b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist()}
        (d / split).write_bytes(pickle.dumps(obj, protocol=2))
        out[split] = (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), fine)
    return out


def make_tar(src: Path, archive: Path, arcname: str | None = None) -> Path:
    """tar / tar.gz (by suffix) of ``src`` stored under ``arcname`` (default: its name)."""
    mode = "w:gz" if archive.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(archive, mode) as tf:
        tf.add(src, arcname=arcname or src.name)
    return archive


def make_zip(src: Path, archive: Path) -> Path:
    """zip of ``src`` with paths relative to ``src.parent``."""
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(src.parent).as_posix())
    return archive


# --------------------------------------------------------------------------------------------- IDX

def write_idx(path: Path, array: np.ndarray, compress: bool = True, magic: bytes | None = None) -> Path:
    """An IDX file of unsigned bytes (gzipped unless ``compress=False``)."""
    arr = np.asarray(array, dtype=np.uint8)
    header = (magic or bytes([0, 0, 8, arr.ndim])) + b"".join(struct.pack(">I", s) for s in arr.shape)
    raw = header + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def write_mnist(folder: Path, n: int = 12, prefix: str = "t10k", seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``{prefix}-images-idx3-ubyte.gz`` (n, 28, 28) + labels in ``folder``."""
    rng = _rng(seed)
    x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    y = (np.arange(n) % 10).astype(np.uint8)
    write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)
    return x, y


# -------------------------------------------------------------------------------------------- SVHN

def write_svhn(folder: Path, split: str = "test", n: int = 11, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``{split}_32x32.mat`` with X (32,32,3,N) and y (N,1) in 1..10. Returns NHWC images, labels 0..9."""
    from scipy.io import savemat

    rng = _rng(seed)
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
    return x.transpose(3, 0, 1, 2), y.reshape(-1).astype(np.int64) % 10


# ----------------------------------------------------------------------------------- image folders

def write_image(path: Path, size: tuple[int, int] = (8, 8), mode: str = "RGB", seed: int = 0) -> np.ndarray:
    """A random image saved in the format implied by the suffix; returns its pixels."""
    rng = _rng(seed)
    w, h = size
    shape = (h, w) if mode in ("L", "1") else (h, w, 3)
    arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
    img = Image.fromarray(arr, "L" if mode in ("L", "1") else "RGB")
    if mode == "1":
        img = img.convert("1")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return np.asarray(img)


def write_labelled_folder(root: Path, classes: list[str], per_class: int = 3, size: int = 32,
                          ext: str = ".png") -> Path:
    """``root/CLASS/imgN{ext}`` (PNG by default so pixels are exact). Some files use upper-case suffixes."""
    for ci, cls in enumerate(classes):
        for i in range(per_class):
            suffix = ext.upper() if i == 1 else ext
            sub = "nested/" if i == 2 else ""  # recursive scan inside a class folder
            write_image(root / cls / f"{sub}img{i}{suffix}", (size, size), seed=ci * 100 + i)
    return root


def write_corrupt_jpeg(path: Path) -> Path:
    """A file named .jpg whose bytes are a truncated JPEG."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[:40])
    return path


# ------------------------------------------------------------------------------------ Tiny ImageNet

def write_tiny_imagenet(root: Path, wnids: list[str], train_per_class: int = 1, val_per_class: int = 1,
                        size: int = 8, test: int = 2) -> Path:
    """The official ``tiny-imagenet-200`` tree (with wnids.txt, words.txt, train/val/test)."""
    t = root / "tiny-imagenet-200"
    (t / "val" / "images").mkdir(parents=True, exist_ok=True)
    (t / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (t / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in wnids))
    ann = []
    k = 0
    for ci, w in enumerate(wnids):
        for i in range(train_per_class):
            write_image(t / "train" / w / "images" / f"{w}_{i}.JPEG", (size, size), seed=ci * 7 + i)
        (t / "train" / w / f"{w}_boxes.txt").write_text("")
        for _ in range(val_per_class):
            write_image(t / "val" / "images" / f"val_{k}.JPEG", (size, size), seed=10_000 + k)
            ann.append(f"val_{k}.JPEG\t{w}\t0\t0\t{size}\t{size}\n")
            k += 1
    (t / "val" / "val_annotations.txt").write_text("".join(ann))
    for i in range(test):
        write_image(t / "test" / "images" / f"test_{i}.JPEG", (size, size), seed=20_000 + i)
    return t


def write_offline_root(root: Path, *, train_per_class: int = 20, test_per_class: int = 10, tin_train_per_class: int = 1,
                       tin_val_per_class: int = 1, tin_size: int = 8) -> Path:
    """A tiny data root for the ``cifar10-offline`` protocol: CIFAR-10 (official pickles, 5 train batches) and a
    Tiny ImageNet-200 tree with the 200 real WNIDs of ``tin_split.json`` (so ``tin-aux`` / ``tin-near`` load)."""
    from oodtune.data.protocol import read_split

    if train_per_class % 5:
        raise ValueError("train_per_class must be a multiple of 5 (5 class-balanced train batches)")
    write_cifar10(root, per_batch=train_per_class * 10 // 5, test_per_batch=test_per_class * 10)
    wnids = sorted(set().union(*read_split().values()))
    write_tiny_imagenet(root, wnids, train_per_class=tin_train_per_class, val_per_class=tin_val_per_class,
                        size=tin_size, test=0)
    return root


# ---------------------------------------------------------------------------------- malicious archives

def malicious_tars(folder: Path) -> dict[str, Path]:
    """One tar per attack: '../evil', '/abs/evil', symlink escaping, hardlink escaping."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}

    def build(name: str, infos: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
        path = folder / f"{name}.tar"
        with tarfile.open(path, "w") as tf:
            ok = tarfile.TarInfo("good/a.txt")
            ok.size = 2
            tf.addfile(ok, io.BytesIO(b"ok"))
            for info, data in infos:
                tf.addfile(info, io.BytesIO(data) if data is not None else None)
        out[name] = path

    def file_info(name: str) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size = 4
        return info

    build("dotdot", [(file_info("../evil"), b"evil")])
    build("nested_dotdot", [(file_info("good/../../evil"), b"evil")])
    build("absolute", [(file_info("/tmp/oodtune-evil-abs"), b"evil")])
    sym = tarfile.TarInfo("good/link")
    sym.type, sym.linkname = tarfile.SYMTYPE, "../../etc/passwd"
    build("symlink", [(sym, None)])
    abs_sym = tarfile.TarInfo("good/abslink")
    abs_sym.type, abs_sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
    build("abs_symlink", [(abs_sym, None)])
    hard = tarfile.TarInfo("good/hard")
    hard.type, hard.linkname = tarfile.LNKTYPE, "../outside"
    build("hardlink", [(hard, None)])
    return out


def make_read_only(path: Path) -> None:
    """chmod a tree read-only (files and folders)."""
    for p in [*path.rglob("*"), path]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)


@contextmanager
def offline_env(tmp: Path, *, train_per_class: int, test_per_class: int) -> Iterator[dict[str, Path]]:
    """An isolated oodtune environment in ``tmp``: own cache, no progress bars, no inherited data root or
    debug flag, and a tiny offline-protocol data root (``write_offline_root``). Yields {"root", "tmp"}."""
    mp = pytest.MonkeyPatch()
    mp.setenv("OODTUNE_CACHE", str(tmp / "cache"))
    mp.setenv("OODTUNE_PROGRESS", "0")
    mp.delenv("OODTUNE_DATA", raising=False)
    mp.delenv("OODTUNE_DEBUG", raising=False)
    try:
        root = write_offline_root(tmp / "root", train_per_class=train_per_class, test_per_class=test_per_class)
        yield {"root": root, "tmp": tmp}
    finally:
        mp.undo()


@contextmanager
def offline_env_with_module(tmp: Path, module: str, code: str, *, train_per_class: int,
                            test_per_class: int) -> Iterator[dict[str, Path]]:
    """``offline_env`` plus a user module ``module`` (source ``code``, dedented) importable from ``tmp/code``."""
    (tmp / "code").mkdir()
    (tmp / "code" / f"{module}.py").write_text(textwrap.dedent(code))
    with pytest.MonkeyPatch.context() as mp, offline_env(tmp, train_per_class=train_per_class,
                                                         test_per_class=test_per_class) as env:
        mp.syspath_prepend(str(tmp / "code"))
        yield env
