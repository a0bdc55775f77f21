"""Dataset names -> loaders. ``load_dataset`` is the one entry point the rest of oodtune uses.

Each loader looks under ``root`` for several candidate layouts, in order: the official layout first, then
the team's offline-mirror layout (e.g. ``cifar10-jpg.tar.gz``), folders before archives. Archives are
extracted (safely) into the cache, never next to the source, and the decoded uint8 arrays are cached as
``.npz`` keyed by (name, split, resolution, source fingerprint).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from oodtune.data.archives import archive_stem, extract_cached, is_archive
from oodtune.data.cache import file_fingerprint, files_fingerprint, resolve_cache_dir
from oodtune.data.download import OFFICIAL, download
from oodtune.data.imageset import ImageSet
from oodtune.data.layouts import (
    Request,
    TreeLayout,
    archive_patterns,
    cached,
    check_split,
    default_data_root,
    find_tree,
    first_match,
    from_arrays,
    load_tiny_imagenet,
    load_tree,
    not_found,
)
from oodtune.data.objects import ObjectBank, load_object_bank, pasted_anomaly_set
from oodtune.data.openood import OPENOOD_LOADERS
from oodtune.data.protocol import load_tin_aux, load_tin_aux_val, load_tin_near
from oodtune.data.segmentation import (
    SEGMENTATION_SETS,
    SegmentationSet,
    Size,
    anomaly_size,
    load_segmentation_set,
    native_size,
)
from oodtune.data.sources import (
    CIFAR_LAYOUTS,
    FileListing,
    read_cifar,
    read_idx_pair,
    read_svhn_mat,
    scan_labelled,
    scan_unlabelled,
)
from oodtune.data.synthetic import GENERATORS, make_synthetic
from oodtune.errors import DataError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MNIST_CLASSES = tuple("0123456789")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


# ------------------------------------------------------------------------------------------ loaders

def _load_cifar(req: Request, variant: str) -> ImageSet:
    check_split(req, ("train", "test"))
    layout = CIFAR_LAYOUTS[variant]
    folder, remote = str(layout["folder"]), OFFICIAL[variant]
    files = [str(layout["meta"]), *layout[req.split]]  # type: ignore[misc]
    batch_dir = first_match(req.root, (folder,), True)
    if batch_dir is not None:
        fp = files_fingerprint(batch_dir / f for f in files if (batch_dir / f).exists())
        return from_arrays(req, fp, lambda: read_cifar(batch_dir, variant, req.split))
    official = req.root / remote.filename
    mirror = TreeLayout(dirs=(f"{variant}-jpg/{{split}}", f"{variant}/{{split}}"),
                        archives=archive_patterns(f"{variant}-jpg"))
    if not official.is_file() and find_tree(req, mirror) is not None:
        classes = CIFAR10_CLASSES if variant == "cifar10" else None
        return load_tree(req, mirror, lambda d: scan_labelled(d, classes))
    if not official.is_file() and req.download:
        official = download(remote, req.root)
    if official.is_file():
        return from_arrays(req, file_fingerprint(official), lambda: read_cifar(official, variant, req.split))
    raise not_found(
        req, f"{req.root / folder}, {official}, {mirror.for_split(req.split).describe(req.root)}",
        f" - e.g. {remote.url} - or pass download=True",
    )


def _load_idx(req: Request, folders: Sequence[str], classes: tuple[str, ...]) -> ImageSet:
    check_split(req, ("train", "test"))
    prefix = "t10k" if req.split == "test" else "train"
    looked = []
    for folder in folders:
        base = req.root / folder
        for suffix in (".gz", ""):
            imgs = base / f"{prefix}-images-idx3-ubyte{suffix}"
            labs = base / f"{prefix}-labels-idx1-ubyte{suffix}"
            looked.append(str(imgs))
            if imgs.is_file() or labs.is_file():
                if not (imgs.is_file() and labs.is_file()):
                    raise DataError(f"{base}: found only one of {imgs.name} / {labs.name}; place both files there.")
                return from_arrays(req, files_fingerprint([imgs, labs]), partial(read_idx_pair, imgs, labs, classes))
    raise not_found(req, ", ".join(looked), " (the IDX files, e.g. t10k-images-idx3-ubyte.gz + labels)")


def _load_svhn(req: Request) -> ImageSet:
    check_split(req, ("train", "test", "extra"))
    fname = f"{req.split}_32x32.mat"
    cands = [req.root / d / fname for d in ("svhn", "SVHN", ".")]
    for path in cands:
        if path.is_file():
            return from_arrays(req, file_fingerprint(path), partial(read_svhn_mat, path))
    raise not_found(req, ", ".join(map(str, cands)),
                     f" - http://ufldl.stanford.edu/housenumbers/{fname} (format 2, cropped digits)")


def _load_tiny(req: Request) -> ImageSet:
    check_split(req, ("train", "val", "test"))
    return load_tiny_imagenet(req, req.split)


#: Split names accepted by sets without official splits (OOD folders, synthetic): all return the whole set.
SINGLE_SPLIT = ("test", "train", "all")


def _tree_loader(layout: TreeLayout, labelled: bool) -> Callable[[Request], ImageSet]:
    """Loader for an image tree without official splits (OOD sets): any of SINGLE_SPLIT gives every image."""
    def load(req: Request) -> ImageSet:
        check_split(req, SINGLE_SPLIT)
        return load_tree(replace(req, split="test"), layout, scan_labelled if labelled else scan_unlabelled)
    return load


def _descend(folder: Path) -> Path:
    """Skip single-child wrapper folders (``x.zip`` -> ``x/``) that hold no images themselves."""
    while True:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_dir():
            folder = entries[0]
        else:
            return folder


#: Split sub-folders a ``folder:``/``images:`` tree may have.
TREE_SPLITS = ("train", "val", "test")


def _path_of(spec: str, root: Path, prefix: str) -> Path:
    """The folder or archive of ``folder:PATH``/``images:PATH``: a relative PATH is tried under the root first,
    then the current directory; always absolute."""
    raw = Path(spec).expanduser()
    path = raw if raw.is_absolute() or not (root / raw).exists() else root / raw
    if not path.exists():
        raise DataError(f"{spec}: no such folder or archive. Give an existing path after '{prefix}:'.")
    return path.resolve()


def _tree_top(path: Path, cache_dir: Path) -> Path:
    """The folder holding the images of a ``folder:``/``images:`` path (an archive is extracted into the cache)."""
    return path if path.is_dir() else _descend(extract_cached(path, cache_dir))


def _split_folder(top: Path, split: str, spec: str) -> Path:
    """``top/split`` when the tree has split sub-folders (then the requested one must exist), else ``top`` itself
    (every split is the whole tree; the pipeline carves a test part from it, see :func:`has_test_split`)."""
    present = [s for s in TREE_SPLITS if (top / s).is_dir()]
    if split == "all" or not present:
        return top
    if split not in present:
        raise DataError(f"{spec}: the tree has {', '.join(p + '/' for p in present)} but no {split}/ sub-folder; "
                        f"add {top / split} (one folder per class inside), or remove the split folders so that "
                        "oodtune splits the images itself.")
    return top / split


def _load_path(req: Request, spec: str, labelled: bool) -> ImageSet:
    """``folder:PATH`` (labelled CLASS/ tree) or ``images:PATH`` (unlabelled) from a folder or archive.

    A relative PATH is tried under the root first, then the current directory. If the tree has split sub-folders
    (``PATH/train``, ``PATH/val``, ``PATH/test``) the requested one is used; without them every split is the
    whole tree.
    """
    prefix = req.name.split(":")[0]
    path = _path_of(spec, req.root, prefix)
    scan = scan_labelled if labelled else scan_unlabelled
    name = archive_stem(path) if path.is_file() else path.name
    req = replace(req, name=f"{prefix}-{name}")
    if path.is_dir():
        listing = scan(_split_folder(path, req.split, spec))
        return cached(req, files_fingerprint(listing.files), lambda: listing)
    if not is_archive(path):
        raise DataError(f"{path}: not a folder or a .tar/.tar.gz/.tgz/.zip archive.")

    def build() -> FileListing:
        return scan(_split_folder(_tree_top(path, req.cache_dir), req.split, spec))
    return cached(req, file_fingerprint(path), build)


def resolve_dataset(name: str, root: str | os.PathLike | None = None) -> str:
    """``name`` as a checkpoint should record it: canonical, and for ``folder:``/``images:`` the *absolute* path
    (so that later steps find the data from any working directory)."""
    canon = canonical_name(name)
    if canon.startswith(("folder:", "images:")):
        prefix, spec = canon.split(":", 1)
        base = Path(root).expanduser() if root is not None else default_data_root()
        return f"{prefix}:{_path_of(spec, base, prefix)}"
    return canon


def has_test_split(name: str, root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
                   ) -> bool:
    """False for a ``folder:``/``images:`` tree without split sub-folders: its "train" and "test" splits would be
    the same images, so a model trained on it must be tested on a part carved out before training."""
    canon = canonical_name(name)
    if not canon.startswith(("folder:", "images:")):
        return True
    prefix, spec = canon.split(":", 1)
    base = Path(root).expanduser() if root is not None else default_data_root()
    top = _tree_top(_path_of(spec, base, prefix), resolve_cache_dir(cache_dir))
    return any((top / s).is_dir() for s in TREE_SPLITS)


def _synthetic_loader(kind: str) -> Callable[..., ImageSet]:
    def load(req: Request, num_images: int | None, seed: int) -> ImageSet:
        check_split(req, SINGLE_SPLIT)
        return make_synthetic(kind, num_images, req.resolution, seed, train=req.split == "train")
    return load


# name -> (loader, description)
_LOADERS: dict[str, tuple[Callable[[Request], ImageSet], str]] = {
    "cifar10": (lambda r: _load_cifar(r, "cifar10"),
                "CIFAR-10 (train/test): official python batches or tar.gz, or the cifar10-jpg mirror"),
    "cifar100": (lambda r: _load_cifar(r, "cifar100"),
                 "CIFAR-100, fine labels (train/test): official python batches or tar.gz"),
    "tiny-imagenet": (_load_tiny, "Tiny ImageNet-200 (train/val/test): tiny-imagenet-200/ folder, .zip or .tar.gz"),
    "dtd": (_tree_loader(TreeLayout(("dtd*/images", "textures/images"), archive_patterns("dtd*")), True),
            "Describable Textures (labelled by folder): dtd*/images/CLASS/*.jpg or its archive"),
    "mnist": (lambda r: _load_idx(r, ("mnist", "MNIST/raw", "."), MNIST_CLASSES),
              "MNIST (train/test) IDX .gz files in mnist/ (grey -> 3 channels)"),
    "fashion-mnist": (lambda r: _load_idx(r, ("fashion-mnist", "FashionMNIST/raw", "fashion_mnist"),
                                          FASHION_MNIST_CLASSES),
                      "Fashion-MNIST (train/test) IDX .gz files in fashion-mnist/"),
    "svhn": (_load_svhn, "SVHN cropped digits (train/test): svhn/{split}_32x32.mat (label 10 -> 0)"),
    "lsun": (_tree_loader(TreeLayout(("LSUN", "lsun"), archive_patterns("LSUN", "lsun")), False),
             "LSUN crop (ODIN release): LSUN/test/*.jpg or LSUN.tar.gz, unlabelled"),
    "lsun-resize": (_tree_loader(TreeLayout(("LSUN_resize", "lsun_resize"), archive_patterns("LSUN_resize")), False),
                    "LSUN resize (ODIN release): LSUN_resize/ or LSUN_resize.tar.gz, unlabelled"),
    "isun": (_tree_loader(TreeLayout(("iSUN/iSUN_patches", "iSUN", "isun"), archive_patterns("iSUN", "isun")), False),
             "iSUN (ODIN release): iSUN/iSUN_patches/*.jpeg or iSUN.tar.gz, unlabelled"),
    "places365": (_tree_loader(TreeLayout(("places365", "Places365", "places"), archive_patterns("places365*")), False),
                  "Places365 OOD subset: places365/ (recursive folder of jpgs) or archive, unlabelled"),
    "omniglot": (_tree_loader(TreeLayout(("omniglot*", "images_background*"),
                                         archive_patterns("omniglot*", "images_background*")), False),
                 "Omniglot: omniglot*/images_background*/ALPHABET/CHARACTER/*.png (1-bit -> RGB), unlabelled"),
    "tin-aux": (load_tin_aux,
                "cifar10-offline protocol: Tiny ImageNet train, auxiliary half minus CIFAR-10 overlaps, unlabelled"),
    "tin-aux-val": (load_tin_aux_val,
                    "cifar10-offline protocol: Tiny ImageNet val, auxiliary half minus CIFAR-10 overlaps (held-out "
                    "outliers for choosing score hyperparameters), unlabelled"),
    "tin-near": (load_tin_near,
                 "cifar10-offline protocol: Tiny ImageNet val, other half minus CIFAR-10 overlaps (near-OOD)"),
    **OPENOOD_LOADERS,
}

_ALIASES = {
    "textures": "dtd", "cifar-10": "cifar10", "cifar-100": "cifar100", "tinyimagenet": "tiny-imagenet",
    "tiny_imagenet": "tiny-imagenet", "tin": "tiny-imagenet", "fashionmnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist", "lsun_resize": "lsun-resize", "places": "places365",
    "gaussian-noise": "gaussian", "uniform-noise": "uniform", "blob": "blobs",
}


def canonical_name(name: str) -> str:
    """Lower-cased, alias-resolved dataset name (``folder:``/``images:`` prefixes keep their path)."""
    head, sep, tail = name.partition(":")
    if sep and head.lower() in ("folder", "images"):
        return f"{head.lower()}:{tail}"
    key = name.strip().lower()
    return _ALIASES.get(key, key)


def available_datasets() -> dict[str, str]:
    """Dataset name -> one-line description (for ``oodtune datasets``); segmentation sets and the object bank
    are marked ``[segmentation]``."""
    out = {name: desc for name, (_, desc) in _LOADERS.items()}
    out.update({name: desc for name, (_, desc) in GENERATORS.items()})
    out["folder:PATH"] = ("labelled image folder PATH/CLASS/*.jpg|png (or PATH/{train,val,test}/CLASS), or a tar/zip "
                          "of one; without split folders, training holds out a seeded test part")
    out["images:PATH"] = "unlabelled images found recursively under PATH, or in a tar/zip archive"
    out.update({name: f"[segmentation] {desc}" for name, (_, desc) in SEGMENTATION_SETS.items()})
    out.update({name: f"[segmentation] {desc}" for name, (_, _, desc) in PASTED_SETS.items()})
    out[OBJECT_BANK] = ("[segmentation] COCO objects with instance masks for copy-paste outlier exposure (splits "
                        "train / val = held-out fifth of train2017 / test = val2017): coco-mini-objects/ or its "
                        "archive, or PEBAL's coco/annotations/ood_seg_*2017")
    return out


# ------------------------------------------------------------------------------------------ segmentation

OBJECT_BANK = "coco-objects"
#: pasted anomaly set -> (ID set split its frames come from, object-bank split pasted into them, description)
PASTED_SETS = {
    "camvid-pasted": ("test", "test", "CamVid test frames with one held-out val2017 COCO object pasted each "
                                      "(seed 0; 0 = ID, 1 = object, 255 = void), cached"),
    "camvid-pasted-val": ("val", "val", "CamVid val frames with one held-out train2017 object pasted each "
                                        "(seed 0): the validation anomaly set for choosing margins / gamma / alpha"),
}
PASTE_SEED = 0


def is_segmentation_set(name: str) -> bool:
    """Whether ``name`` is a segmentation set (frames + label maps) or the object bank."""
    canon = canonical_name(name)
    return canon in SEGMENTATION_SETS or canon in PASTED_SETS or canon == OBJECT_BANK


def load_segmentation(name: str, root: str | os.PathLike | None = None, split: str = "test", *,
                      size: Size | None = None, height: int | None = None,
                      cache_dir: str | os.PathLike | None = None, num_images: int | None = None,
                      seed: int = 0) -> SegmentationSet:
    """Segmentation set ``name`` (ID sets, anomaly sets, pasted anomaly sets; see ``available_datasets``) at
    ``size`` = (width, height), or at ``height`` pixels with its native aspect ratio (anomaly sets), or native.

    ``num_images`` keeps a seeded subset of the frames (in order)."""
    canon = canonical_name(name)
    base = Path(root).expanduser() if root is not None else default_data_root()
    cache = resolve_cache_dir(cache_dir)
    if canon in PASTED_SETS:
        frames_split, objects_split, _ = PASTED_SETS[canon]
        if split not in ("test", "all"):
            raise DataError(f"{canon}: a pasted anomaly set has one split, 'test' (got {split!r}).")
        frames = load_segmentation("camvid", base, frames_split, size=size, height=height, cache_dir=cache)
        bank = load_object_bank(base, objects_split, cache)
        data = pasted_anomaly_set(frames, bank, PASTE_SEED, canon, cache)
    elif canon in SEGMENTATION_SETS:
        if height is not None and size is None:
            size = anomaly_size(native_size(canon, base, split, cache), height)
        data = load_segmentation_set(canon, base, split, size, cache)
    else:
        raise DataError(f"unknown segmentation set {name!r}. Known: "
                        f"{', '.join([*SEGMENTATION_SETS, *PASTED_SETS])}.")
    if num_images is None or num_images >= len(data):
        return data
    if num_images <= 0:
        raise DataError(f"{data.name}: num_images must be positive, got {num_images}.")
    return data.subset(np.sort(np.random.default_rng(seed).choice(len(data), size=num_images, replace=False)))


def load_objects(name: str, root: str | os.PathLike | None = None, split: str = "train", *,
                 cache_dir: str | os.PathLike | None = None) -> ObjectBank:
    """The object bank ``coco-objects`` (split train / val / test) for pasting outliers."""
    if canonical_name(name) != OBJECT_BANK:
        raise DataError(f"{name!r} is not an object bank; segmentation fine-tuning pastes objects from "
                        f"{OBJECT_BANK!r} (--outliers {OBJECT_BANK}).")
    base = Path(root).expanduser() if root is not None else default_data_root()
    return load_object_bank(base, split, resolve_cache_dir(cache_dir))


def subsample(data: ImageSet, num_images: int | None, seed: int) -> ImageSet:
    """Deterministic (seeded) subset of ``num_images`` images in original order; all when ``num_images``
    is None or at least the set size."""
    if num_images is None or num_images >= len(data):
        return data
    if num_images <= 0:
        raise DataError(f"{data.name}: num_images must be positive, got {num_images}.")
    idx = np.sort(np.random.default_rng(seed).choice(len(data), size=num_images, replace=False))
    return data.subset(idx)


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "test",
    *,
    resolution: int = 32,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    num_images: int | None = None,
    seed: int = 0,
) -> ImageSet:
    """Load dataset ``name`` (see :func:`available_datasets`) as a uint8 ImageSet of ``resolution`` px.

    ``root`` defaults to :func:`default_data_root`; ``cache_dir`` to ``$OODTUNE_CACHE`` or
    ``~/.cache/oodtune``. ``num_images`` keeps a seeded random subset (in original order); for synthetic
    sets it is the number generated (default 10,000). ``download=True`` fetches official archives that
    have a published URL (CIFAR-10/100) when nothing is found locally.
    """
    if not isinstance(resolution, int) or resolution <= 0:
        raise DataError(f"resolution must be a positive int, got {resolution!r}.")
    canon = canonical_name(name)
    req = Request(
        name=canon,
        root=Path(root).expanduser() if root is not None else default_data_root(),
        split=str(split).lower(),
        resolution=resolution,
        cache_dir=resolve_cache_dir(cache_dir),
        download=download,
    )
    if canon in GENERATORS:
        return _synthetic_loader(canon)(req, num_images, seed)
    if is_segmentation_set(canon):
        raise DataError(f"{canon} is a segmentation set (frames with label maps), not an image-classification set; "
                        "use it with a segmentation checkpoint (oodtune.data.load_segmentation).")
    if canon.startswith(("folder:", "images:")):
        data = _load_path(req, canon.split(":", 1)[1], labelled=canon.startswith("folder:"))
    elif canon in _LOADERS:
        data = _LOADERS[canon][0](req)
    else:
        raise DataError(f"unknown dataset {name!r}. Known: {', '.join(available_datasets())}.")
    return subsample(data, num_images, seed)


__all__ = ["OBJECT_BANK", "PASTED_SETS", "available_datasets", "canonical_name", "default_data_root", "has_test_split",
           "is_segmentation_set", "load_dataset", "load_objects", "load_segmentation", "resolve_dataset", "subsample"]
