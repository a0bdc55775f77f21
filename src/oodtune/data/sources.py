"""Readers for the published dataset formats. Each returns raw arrays or a file listing, never guesses.

* CIFAR-10/100 python pickle batches (from the folder or straight from the official ``.tar.gz``), read
  with a restricted unpickler that only admits the numpy/builtin types those files contain.
* MNIST-family IDX files (``.gz`` or plain), with magic-number and size validation.
* SVHN ``*_32x32.mat`` (``X`` is 32x32x3xN, label 10 means digit 0).
* Labelled image folders ``CLASS/**/*.jpg|jpeg|png`` and unlabelled recursive image folders.
* The Tiny ImageNet-200 tree (train/val/test).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oodtune.data.images import check_regular_file, is_image_file
from oodtune.errors import DataError


@dataclass(frozen=True)
class ArraySet:
    """Decoded-in-memory source: uint8 images (N,H,W[,C]), optional labels, class names."""

    images: np.ndarray
    labels: np.ndarray | None
    classes: tuple[str, ...]


@dataclass(frozen=True)
class FileListing:
    """Image files to decode (in order) with optional labels and class names."""

    files: list[Path]
    labels: np.ndarray | None
    classes: tuple[str, ...]


# ----------------------------------------------------------------------------------------------- CIFAR

CIFAR_LAYOUTS: dict[str, dict[str, object]] = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": "labels",
        "names_key": "label_names",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": "fine_labels",
        "names_key": "fine_label_names",
    },
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except the numpy array machinery CIFAR pickles need."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
        ("builtins", "list"),
        ("builtins", "dict"),
        ("copy_reg", "_reconstructor"),
        ("copyreg", "_reconstructor"),
        ("builtins", "object"),
        ("__builtin__", "object"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _unpickle(data: bytes, where: str) -> dict[str, object]:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any failure means a bad file
        raise DataError(
            f"{where}: not a valid CIFAR python batch ({type(exc).__name__}: {exc}). Re-download the official "
            "python version of the dataset (cifar-10-python.tar.gz / cifar-100-python.tar.gz)."
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a dict in the CIFAR batch, got {type(obj).__name__}.")
    return {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _cifar_files(source: Path, folder: str, names: list[str]) -> dict[str, tuple[bytes, str]]:
    """Read the named batch files (-> bytes, display path) from a batch folder or the official archive."""
    out: dict[str, tuple[bytes, str]] = {}
    if source.is_dir():
        for name in names:
            path = source / name
            if not path.is_file():
                raise DataError(
                    f"{path}: missing CIFAR batch file. The folder must contain the official python batches "
                    f"(extract the official archive so that {folder}/{name} exists)."
                )
            out[name] = (path.read_bytes(), str(path))
        return out
    try:
        with tarfile.open(source) as tf:  # one sequential pass over the (gzipped) archive
            for member in tf:
                parts = [q for q in member.name.replace("\\", "/").split("/") if q not in ("", ".")]
                if member.isfile() and len(parts) == 2 and parts[0] == folder and parts[1] in names:
                    f = tf.extractfile(member)
                    if f is None:
                        raise DataError(f"{source}: member {member.name} cannot be read; not the official archive.")
                    out[parts[1]] = (f.read(), f"{source}!{member.name}")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{source}: cannot read archive ({exc}); download it again.") from None
    missing = [n for n in names if n not in out]
    if missing:
        raise DataError(f"{source}: members {[f'{folder}/{m}' for m in missing]} missing; not the official archive.")
    return out


def read_cifar(source: Path, variant: str, split: str) -> ArraySet:
    """Read CIFAR-10 (``variant='cifar10'``) or CIFAR-100 fine labels from a batch folder or official tar.gz."""
    layout = CIFAR_LAYOUTS[variant]
    folder = str(layout["folder"])
    batches = list(layout[split])  # type: ignore[call-overload]
    files = _cifar_files(source, folder, [str(layout["meta"]), *batches])
    meta_bytes, meta_where = files[str(layout["meta"])]
    meta = _unpickle(meta_bytes, meta_where)
    names_key = str(layout["names_key"])
    if names_key not in meta:
        raise DataError(f"{meta_where}: no '{names_key}' entry; this is not the official {variant} meta file.")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key])  # type: ignore[attr-defined]
    images, labels = [], []
    for batch in batches:
        data_bytes, where = files[batch]
        d = _unpickle(data_bytes, where)
        try:
            x = np.asarray(d["data"], dtype=np.uint8)
            y = np.asarray(d[str(layout["label_key"])], dtype=np.int64)
        except KeyError as exc:
            raise DataError(f"{where}: batch lacks the {exc} entry; not an official {variant} batch.") from None
        if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
            raise DataError(
                f"{where}: expected data of shape (N, 3072) and N labels, got {x.shape} and {len(y)} labels."
            )
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise DataError(f"{where}: labels outside [0, {len(classes)}) - batch and meta file do not match.")
        images.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(y)
    return ArraySet(np.concatenate(images), np.concatenate(labels), classes)


# ------------------------------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Read an IDX file (optionally gzipped) with ``expected_ndim`` dims of unsigned bytes, validating it."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc}); download it again.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] != expected_ndim:
        raise DataError(
            f"{path}: bad IDX magic number {raw[:4].hex()} (expected 0000080{expected_ndim}). The file is not an "
            "MNIST-style IDX file of the right kind (images: idx3, labels: idx1) or is corrupt; re-download it."
        )
    header = 4 + 4 * expected_ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(expected_ndim))
    if len(raw) != header + int(np.prod(dims)):
        raise DataError(
            f"{path}: header says {dims} ({int(np.prod(dims))} bytes of data) but the file holds "
            f"{len(raw) - header} bytes; the file is truncated or corrupt - re-download it."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_pair(images_path: Path, labels_path: Path, classes: tuple[str, ...]) -> ArraySet:
    """An IDX image file (N,H,W) plus its IDX label file, checked against each other."""
    x = read_idx(images_path, 3)
    y = read_idx(labels_path, 1).astype(np.int64)
    if len(x) != len(y):
        raise DataError(f"{images_path}: {len(x)} images but {labels_path} has {len(y)} labels; use matching files.")
    if len(y) and y.max() >= len(classes):
        raise DataError(f"{labels_path}: label {y.max()} but only {len(classes)} classes.")
    return ArraySet(x, y, classes)


# ------------------------------------------------------------------------------------------------ SVHN

def read_svhn_mat(path: Path) -> ArraySet:
    """SVHN cropped digits ``*_32x32.mat``: X (32,32,3,N) uint8, y (N,1) in 1..10 with 10 meaning 0."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for bad files
        raise DataError(f"{path}: cannot read .mat file ({type(exc).__name__}: {exc}); re-download it.") from None
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path}: expected variables 'X' and 'y' (the SVHN format 2 cropped digits file).")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DataError(f"{path}: X has shape {x.shape} and y {len(y)} entries; expected (32,32,3,N) and N.")
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise DataError(f"{path}: labels must be 1..10 (10 = digit 0), found [{y.min()}, {y.max()}].")
    y[y == 10] = 0
    return ArraySet(np.ascontiguousarray(x.transpose(3, 0, 1, 2).astype(np.uint8)), y, tuple("0123456789"))


# --------------------------------------------------------------------------------------- image folders

def scan_images(folder: Path, *, regular_only: bool = True) -> list[Path]:
    """All image files under ``folder`` (recursive, case-insensitive extensions), sorted by relative path.

    A FIFO, device or socket named like an image is an error (reading it would block), not skipped; with
    ``regular_only=False`` it is listed, and the caller refuses it when it reads it."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found.")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith(".") and is_image_file(f))
    for path in found if regular_only else ():
        check_regular_file(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def scan_unlabelled(folder: Path) -> FileListing:
    """Unlabelled listing of every image under ``folder``; an empty folder is an error."""
    files = scan_images(folder)
    if not files:
        raise DataError(f"{folder}: no image files (*.jpg, *.jpeg, *.png) found. Check the path / extraction.")
    return FileListing(files, None, ())


def scan_labelled(folder: Path, classes: Collection[str] | None = None) -> FileListing:
    """Labelled listing ``folder/CLASS/**/image``; labels follow ``classes`` (default: sorted folder names).

    With ``classes`` given, the class folders must be exactly that set (a mismatch is an error).
    """
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found.")
    stray = [p for p in folder.iterdir() if p.is_file() and is_image_file(p)]
    if stray:
        raise DataError(
            f"{stray[0]}: image directly in the labelled folder {folder}. A labelled folder holds one sub-folder "
            "per class (CLASS/image.jpg); move the images into class folders or load it as images:PATH."
        )
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    order = tuple(classes) if classes is not None else tuple(found)
    if classes is not None and set(found) != set(order):
        missing, extra = sorted(set(order) - set(found)), sorted(set(found) - set(order))
        raise DataError(
            f"{folder}: class folders do not match the expected classes (missing: {missing}, unexpected: "
            f"{extra}). Point the root at the right dataset or fix the folder names."
        )
    if not order:
        raise DataError(f"{folder}: no class sub-folders; expected {folder}/CLASS/*.jpg.")
    files: list[Path] = []
    labels: list[int] = []
    for idx, cls in enumerate(order):
        cls_files = scan_images(folder / cls)
        if not cls_files:
            raise DataError(f"{folder / cls}: class folder has no images; remove it or restore its images.")
        files.extend(cls_files)
        labels.extend([idx] * len(cls_files))
    return FileListing(files, np.asarray(labels, dtype=np.int64), order)


# ------------------------------------------------------------------------------------- Tiny ImageNet

def read_wnids(tin_root: Path) -> tuple[str, ...]:
    """Class order of Tiny ImageNet: the lines of ``wnids.txt``."""
    path = tin_root / "wnids.txt"
    if not path.is_file():
        raise DataError(f"{path}: missing. A Tiny ImageNet folder holds wnids.txt, words.txt, train/, val/.")
    wnids = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataError(f"{path}: empty or has duplicate WNIDs; restore the official file.")
    return wnids


def scan_tiny_imagenet(tin_root: Path, split: str, keep: Collection[str] | None = None) -> FileListing:
    """Tiny ImageNet ``train`` (``train/WNID/images``), ``val`` (labels from ``val_annotations.txt``) or
    ``test`` (unlabelled). ``keep`` restricts to those WNIDs (labels still index the full wnids.txt order)."""
    wnids = read_wnids(tin_root)
    index = {w: i for i, w in enumerate(wnids)}
    if keep is not None:
        unknown = sorted(set(keep) - set(index))
        if unknown:
            raise DataError(f"{tin_root / 'wnids.txt'}: WNIDs {unknown[:5]} requested but not in this dataset.")
    wanted = set(wnids if keep is None else keep)
    files: list[Path] = []
    labels: list[int] = []
    if split == "train":
        for w in wnids:
            if w not in wanted:
                continue
            cls_dir = tin_root / "train" / w
            cls_files = scan_images(cls_dir) if cls_dir.is_dir() else []
            if not cls_files:
                raise DataError(f"{cls_dir}: no training images for class {w} listed in wnids.txt.")
            files.extend(cls_files)
            labels.extend([index[w]] * len(cls_files))
    elif split == "val":
        ann = tin_root / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise DataError(f"{ann}: missing; the val split needs val/val_annotations.txt from the official zip.")
        for n, line in enumerate(ann.read_text().splitlines(), 1):
            fields = line.split("\t")
            if not line.strip():
                continue
            if len(fields) < 2 or fields[1] not in index:
                raise DataError(f"{ann}:{n}: malformed line or WNID not in wnids.txt: {line!r}.")
            if fields[1] not in wanted:
                continue
            path = tin_root / "val" / "images" / fields[0]
            if not path.is_file():
                raise DataError(f"{path}: listed in {ann.name} but missing; re-extract the dataset.")
            files.append(path)
            labels.append(index[fields[1]])
    elif split == "test":
        return scan_unlabelled(tin_root / "test" / "images")
    else:
        raise DataError(f"tiny-imagenet: unknown split {split!r}; use 'train', 'val' or 'test'.")
    if not files:
        raise DataError(f"{tin_root}: no {split} images selected.")
    return FileListing(files, np.asarray(labels, dtype=np.int64), wnids)
