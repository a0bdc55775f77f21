"""The ImageNet-1k OOD benchmark of OpenOOD v1.5, read from its official file lists and folder layout.

OpenOOD's data root holds image lists and two image trees::

    benchmark_imglist/imagenet/train_imagenet.txt  val_imagenet.txt  test_imagenet.txt   (ID, "PATH LABEL")
    benchmark_imglist/imagenet/test_ssb_hard.txt  test_ninco.txt                        (near-OOD, "PATH -1")
    benchmark_imglist/imagenet/test_inaturalist.txt  test_textures.txt  test_openimage_o.txt   (far-OOD)
    benchmark_imglist/imagenet/val_openimage_o.txt                                      (validation OOD)
    images_largescale/imagenet_1k/...  ssb_hard/...  ninco/...  inaturalist/...  openimage_o/...
    images_classic/texture/...                                                          (Textures lists only)

Each list line is a path relative to its image tree, a space, and the label (the class index in torchvision's
ImageNet order; ``-1`` for OOD images). Lists are read in order; a missing image, a path leaving its tree, or an ID
label outside ``[0, 1000)`` is an error naming the list and the line. The lists are looked for under the data root
and under ``ROOT/openood``. Classes are named by their index (``"0"`` ... ``"999"``), as the lists give no names.

The protocol :data:`OPENOOD_PROTOCOLS` (``openood-imagenet``): ID ImageNet-1k val (OpenOOD's ``test_imagenet``
list; its ``val_imagenet`` list is the ID validation split), near SSB-hard and NINCO, far iNaturalist, Textures and
OpenImage-O, and OpenOOD's held-out OpenImage-O validation list for choosing hyperparameters.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from oodtune.data.cache import file_fingerprint, files_fingerprint
from oodtune.data.imageset import ImageSet
from oodtune.data.layouts import Request, cached, check_split
from oodtune.data.sources import FileListing
from oodtune.errors import DataError

__all__ = ["IMAGENET_CLASSES", "OPENOOD_LOADERS", "OPENOOD_PROTOCOLS", "read_image_list"]

IMAGENET_CLASSES = tuple(str(i) for i in range(1000))
LIST_DIR = "benchmark_imglist/imagenet"
LARGE, CLASSIC = "images_largescale", "images_classic"

#: ID dataset split -> list file (image tree: images_largescale)
ID_LISTS = {"train": "train_imagenet.txt", "val": "val_imagenet.txt", "test": "test_imagenet.txt"}
#: OOD dataset name -> (list file, image tree, description)
OOD_LISTS = {
    "openood-ssb-hard": ("test_ssb_hard.txt", LARGE, "SSB-hard (near-OOD for ImageNet-1k)"),
    "openood-ninco": ("test_ninco.txt", LARGE, "NINCO (near-OOD for ImageNet-1k)"),
    "openood-inaturalist": ("test_inaturalist.txt", LARGE, "iNaturalist OOD subset (far-OOD for ImageNet-1k)"),
    "openood-textures": ("test_textures.txt", CLASSIC, "Textures / DTD (far-OOD for ImageNet-1k)"),
    "openood-openimage-o": ("test_openimage_o.txt", LARGE, "OpenImage-O (far-OOD for ImageNet-1k)"),
    "openood-openimage-o-val": ("val_openimage_o.txt", LARGE, "OpenImage-O validation list (held-out OOD for "
                                                              "choosing hyperparameters; never a test set)"),
}


def _list_root(req: Request, list_name: str) -> Path:
    for base in (req.root, req.root / "openood"):
        if (base / LIST_DIR / list_name).is_file():
            return base
    raise DataError(f"{req.name} ({req.split}): OpenOOD's list {LIST_DIR}/{list_name} was not found under "
                    f"{req.root} or {req.root / 'openood'}. Fix: place OpenOOD v1.5's benchmark_imglist/ and "
                    f"{LARGE}/ ({CLASSIC}/ for Textures) there, or pass another root (--data-root / OODTUNE_DATA).")


def read_image_list(list_path: Path, images: Path, labelled: bool) -> FileListing:
    """The images and labels of one OpenOOD list (module docstring); ``labelled`` for the ImageNet-1k ID lists."""
    files: list[Path] = []
    labels: list[int] = []
    top = images.resolve()
    for n, line in enumerate(list_path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(" ", 1)
        where = f"{list_path}:{n}"
        try:
            label = int(parts[1].strip()) if len(parts) == 2 else None
        except ValueError:
            label = None
        if label is None:
            raise DataError(f"{where}: expected 'PATH LABEL', got {line!r}; restore OpenOOD's list file.")
        path = (images / parts[0]).resolve()
        if top not in path.parents:
            raise DataError(f"{where}: {parts[0]!r} points outside {images}; a list names images inside its tree.")
        if not path.is_file():
            raise DataError(f"{where}: {path} is listed but missing; download or extract OpenOOD's {images.name}/ "
                            "tree completely.")
        if labelled and not 0 <= label < len(IMAGENET_CLASSES):
            raise DataError(f"{where}: label {label} outside [0, {len(IMAGENET_CLASSES)}) for ImageNet-1k.")
        files.append(path)
        labels.append(label)
    if not files:
        raise DataError(f"{list_path}: the list names no images.")
    return FileListing(files, np.asarray(labels, dtype=np.int64) if labelled else None,
                       IMAGENET_CLASSES if labelled else ())


def _load(req: Request, list_name: str, tree: str, labelled: bool) -> ImageSet:
    base = _list_root(req, list_name)
    list_path = base / LIST_DIR / list_name
    listing = read_image_list(list_path, base / tree, labelled)
    key = files_fingerprint([list_path, *listing.files]) if listing.files else file_fingerprint(list_path)
    return cached(req, key, lambda: listing)


def _imagenet(req: Request) -> ImageSet:
    check_split(req, tuple(ID_LISTS))
    return _load(req, ID_LISTS[req.split], LARGE, True)


def _ood(name: str) -> Callable[[Request], ImageSet]:
    list_name, tree, _ = OOD_LISTS[name]

    def load(req: Request) -> ImageSet:
        check_split(req, ("test", "train", "all"))
        return _load(req, list_name, tree, False)
    return load


#: name -> (loader, description), merged into the dataset registry
OPENOOD_LOADERS: dict[str, tuple[Callable[[Request], ImageSet], str]] = {
    "openood-imagenet": (_imagenet, "ImageNet-1k from OpenOOD v1.5's lists (train/val/test; test = ImageNet val, "
                                    "the ID test set of the benchmark): benchmark_imglist/imagenet/ + "
                                    "images_largescale/"),
    **{name: (_ood(name), f"{desc}: OpenOOD v1.5 list {lst}, unlabelled")
       for name, (lst, _, desc) in OOD_LISTS.items()},
}

OPENOOD_PROTOCOLS: dict[str, dict[str, Any]] = {
    "openood-imagenet": {
        "description": "OpenOOD v1.5 ImageNet-1k: ID ImageNet val; near SSB-hard, NINCO; far iNaturalist, Textures, "
                       "OpenImage-O (224 px)",
        "id": "openood-imagenet",
        "id_train_split": "train",
        "id_test_split": "test",
        "aux_val": "openood-openimage-o-val",
        "near": ["openood-ssb-hard", "openood-ninco"],
        "far": ["openood-inaturalist", "openood-textures", "openood-openimage-o"],
        "resolution": 224,
    },
}
