"""The offline CIFAR-10 OOD protocol (``cifar10-offline``): data that needs no internet.

* In-distribution: CIFAR-10 (train for fine-tuning, test for evaluation).
* Auxiliary outliers (``tin-aux``): Tiny ImageNet-200 *train* images of a fixed half of the 200 classes.
* Near-OOD test (``tin-near``): Tiny ImageNet-200 *val* images of the *other* half.
* Held-out auxiliary outliers (``tin-aux-val``): Tiny ImageNet-200 *val* images of the auxiliary half — the
  auxiliary distribution, but images fine-tuning never sees; only for choosing score hyperparameters
  (:mod:`oodtune.scores.selection`), never a test set.
* Both halves exclude every class that overlaps a CIFAR-10 class; the hand-reviewed list, with its rule,
  is the committed file ``oodtune/protocols/tin_cifar10_overlap.txt``.

The half split is the committed file ``oodtune/protocols/tin_split.json``, produced by :func:`build_split`:
sort the 200 WNIDs, permute them with ``numpy.random.default_rng(0).permutation``, the first 100 are the
auxiliary half and the last 100 the near-OOD half; overlapping WNIDs are then removed from both halves
(and listed under ``removed_overlap``). Each list in the file is sorted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

from oodtune.data.imageset import ImageSet
from oodtune.data.layouts import TINY_IMAGENET, Request, find_tree, load_tiny_imagenet
from oodtune.data.openood import OPENOOD_PROTOCOLS
from oodtune.data.sources import read_wnids
from oodtune.errors import DataError

OVERLAP_FILE = "tin_cifar10_overlap.txt"
SPLIT_FILE = "tin_split.json"
SPLIT_SEED = 0

#: Protocols other modules (training, evaluation, CLI) iterate over.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "cifar10-offline": {
        "description": "CIFAR-10 vs. Tiny ImageNet halves (aux train / near-OOD val, CIFAR-10 overlaps removed) "
        "and far-OOD textures, digits, characters and noise; all available offline",
        "id": "cifar10",
        "id_train_split": "train",
        "id_test_split": "test",
        "aux": "tin-aux",
        "aux_val": "tin-aux-val",
        "near": ["tin-near"],
        "far": ["dtd", "mnist", "fashion-mnist", "omniglot", "gaussian"],
        "resolution": 32,
    },
    **OPENOOD_PROTOCOLS,
}


def _protocol_text(name: str) -> str:
    return resources.files("oodtune").joinpath("protocols", name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def read_overlap() -> dict[str, tuple[str, str]]:
    """WNID -> (words, CIFAR-10 class) for every Tiny ImageNet class removed for overlapping CIFAR-10."""
    out: dict[str, tuple[str, str]] = {}
    for n, line in enumerate(_protocol_text(OVERLAP_FILE).splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise DataError(f"{OVERLAP_FILE}:{n}: expected WNID<TAB>words<TAB>CIFAR-10 class, got {line!r}.")
        out[fields[0]] = (fields[1], fields[2])
    return out


def build_split(wnids: Iterable[str], overlap: Iterable[str], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """The documented split rule (see module docstring) applied to ``wnids`` minus ``overlap``."""
    ordered = sorted(set(wnids))
    perm = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    half = len(perm) // 2
    removed = set(overlap)
    return {
        "auxiliary": sorted(w for w in perm[:half] if w not in removed),
        "near_ood": sorted(w for w in perm[half:] if w not in removed),
        "removed_overlap": sorted(w for w in ordered if w in removed),
    }


@lru_cache(maxsize=1)
def read_split() -> dict[str, list[str]]:
    """The committed split (``tin_split.json``): auxiliary, near_ood and removed_overlap WNID lists."""
    data = json.loads(_protocol_text(SPLIT_FILE))
    return {k: list(data[k]) for k in ("auxiliary", "near_ood", "removed_overlap")}


def _check_wnids(req: Request) -> None:
    """The Tiny ImageNet found under the root must be the 200-class release the split was made for."""
    src = find_tree(req, TINY_IMAGENET)
    if src is None or not src.is_dir():
        return  # an archive is validated through scan_tiny_imagenet's WNID check
    split = read_split()
    expected = set().union(*split.values())
    found = set(read_wnids(src))
    if found != expected:
        raise DataError(
            f"{src / 'wnids.txt'}: {len(found)} WNIDs that differ from the 200 of Tiny ImageNet-200 used by the "
            "cifar10-offline protocol; point the root at the official tiny-imagenet-200 data."
        )


def _load_half(req: Request, tin_split: str, key: str) -> ImageSet:
    # tin-aux is training data (split 'train' or the default accepted); tin-near and tin-aux-val are held out
    allowed = ("test", "train", "all") if tin_split == "train" else ("test", "all")
    if req.split not in allowed:
        raise DataError(f"{req.name}: the split is fixed by the protocol; use split='test' (got {req.split!r}).")
    _check_wnids(req)
    req = replace(req, split="test")  # one cache entry whatever alias was used
    return load_tiny_imagenet(req, tin_split, keep=read_split()[key], labelled=False)


def load_tin_aux(req: Request) -> ImageSet:
    """Auxiliary outliers: Tiny ImageNet train images of the auxiliary half (unlabelled)."""
    return _load_half(req, "train", "auxiliary")


def load_tin_near(req: Request) -> ImageSet:
    """Near-OOD test set: Tiny ImageNet val images of the near-OOD half (unlabelled)."""
    return _load_half(req, "val", "near_ood")


def load_tin_aux_val(req: Request) -> ImageSet:
    """Held-out auxiliary outliers: Tiny ImageNet val images of the auxiliary half (unlabelled)."""
    return _load_half(req, "val", "auxiliary")
