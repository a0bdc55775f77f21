"""Outlier objects for pixel-wise outlier exposure: a bank of cut-out objects (image + mask), seeded copy-paste
into driving frames, and the held-out pasted anomaly sets built from it.

**Object bank** (:func:`load_object_bank`). Layouts: the COCO-objects mirror (``coco-mini-objects/objects.json``
listing ``image``, ``mask`` (0/255 PNG) and ``split`` = train2017 / val2017 per object, or its archive) and PEBAL's
processed COCO (``coco/annotations/ood_seg_{train,val}2017/NAME.png``, object pixels = 254, beside
``coco/{train,val}2017/NAME.jpg``; all object pixels of an image form one object, as in PEBAL). oodtune's splits:

* ``train`` — the objects of the ``train2017`` photos minus a seeded held-out fifth *of the photos*: the only
  objects fine-tuning pastes;
* ``val`` — every object of that held-out fifth of the ``train2017`` photos: for choosing margins / γ / α on CamVid
  *val* frames. The split is by source photo, so no photo supplies objects to both (several objects of one photo
  share its look; split by object, most validation photos also supplied training objects);
* ``test`` — the ``val2017`` objects: only in the held-out pasted test set.

**Pasting** (:func:`paste_object`, PEBAL's ``mix_object`` with a random scale and flip): the object is scaled so
that its longer side is ``U(0.1, 0.5)`` of the frame's shorter side, flipped horizontally with probability 0.5,
placed at a uniformly random position inside the frame, and its mask pixels get the outlier label.

**Pasted anomaly sets** (:func:`pasted_anomaly_set`): every frame of an ID split with one object of a bank split
pasted (fixed seed), labelled 0 = in-distribution (labelled ID pixels), 1 = pasted object, 255 = void (the ID
set's void pixels); built once and cached.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from .archives import extract_cached
from .images import to_rgb
from .layouts import archive_patterns, first_match
from .segmentation import ANOMALY, ANOMALY_CLASSES, INLIER, VOID, SegmentationSet, cached_segmentation

__all__ = ["OBJECT_SPLITS", "ObjectBank", "PASTE_SCALE", "load_object_bank", "paste_object", "paste_objects",
           "pasted_anomaly_set"]

OBJECT_SPLITS = ("train", "val", "test")
HELDOUT_FRACTION = 0.2  # of train2017, kept out of training for validation
HELDOUT_SEED = 0
PASTE_SCALE = (0.1, 0.5)  # object's longer side, as a fraction of the frame's shorter side


@dataclass(frozen=True)
class ObjectBank:
    """Cut-out objects: RGB crops (h, w, 3) uint8 and their boolean masks (h, w), one category name each; per object
    optionally its source photo (``photos``: the reference pasting mode pastes a photo's objects together) and the
    scale it is stored at relative to the photo (``storage_scales``; 1 = native pixel size)."""

    images: tuple[np.ndarray, ...]
    masks: tuple[np.ndarray, ...]
    categories: tuple[str, ...]
    name: str = "objects"
    photos: tuple[str, ...] = ()
    storage_scales: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.images:
            raise DataError(f"{self.name}: the object bank is empty; check the data root and the split.")
        if not (len(self.images) == len(self.masks) == len(self.categories)):
            raise DataError(f"{self.name}: {len(self.images)} objects but {len(self.masks)} masks.")
        for field in ("photos", "storage_scales"):
            if getattr(self, field) and len(getattr(self, field)) != len(self.images):
                raise DataError(f"{self.name}: {len(self.images)} objects but {len(getattr(self, field))} {field}.")

    def photo_groups(self) -> tuple[tuple[int, ...], ...]:
        """The objects' indices grouped by source photo (in order of first appearance; one group per object when
        the bank does not record photos)."""
        if not self.photos:
            return tuple((i,) for i in range(len(self)))
        groups: dict[str, list[int]] = {}
        for i, photo in enumerate(self.photos):
            groups.setdefault(photo, []).append(i)
        return tuple(tuple(g) for g in groups.values())

    def storage_scale(self, index: int) -> float:
        """The scale object ``index`` is stored at relative to its photo (1 when not recorded)."""
        return self.storage_scales[index] if self.storage_scales else 1.0

    def __len__(self) -> int:
        return len(self.images)

    def fingerprint(self) -> str:
        """A digest of the objects' pixels (keys the cache of pasted sets)."""
        h = hashlib.sha256()
        for img, mask in zip(self.images, self.masks, strict=True):
            h.update(img.tobytes())
            h.update(np.packbits(mask).tobytes())
        return h.hexdigest()


def _read_mask(path: Path, image: Path, foreground: int | None) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: the mask of object {image} is missing; an object bank needs one mask per object "
                        "(a PNG whose non-zero pixels are the object).")
    try:
        with Image.open(path) as m:
            arr = np.asarray(m.convert("L"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode the object mask ({exc}); replace it.") from None
    mask = arr > 0 if foreground is None else arr == foreground
    if not mask.any():
        raise DataError(f"{path}: the object mask is empty (no object pixels); remove this object or fix its mask.")
    return mask


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(to_rgb(img), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode the object image ({exc}); replace it.") from None


def _crop(img: np.ndarray, mask: np.ndarray, where: Path) -> tuple[np.ndarray, np.ndarray]:
    if img.shape[:2] != mask.shape:
        raise DataError(f"{where}: object image is {img.shape[1]}x{img.shape[0]} but its mask is "
                        f"{mask.shape[1]}x{mask.shape[0]}; they must have the same size.")
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return np.ascontiguousarray(img[sl]), np.ascontiguousarray(mask[sl])


#: One object of a listing: (COCO split, crop image, mask, category, source photo, storage scale).
Entry = tuple[str, Path, Path, str, str, float]


def _split_of(coco_split: str, photo: str, heldout: set[str]) -> str:
    if coco_split.startswith("val"):
        return "test"
    return "val" if photo in heldout else "train"


def _heldout(photos: list[str]) -> set[str]:
    """Seeded held-out fifth of the distinct train2017 source ``photos`` (in their order of first appearance)."""
    distinct = list(dict.fromkeys(photos))
    rng = np.random.default_rng(HELDOUT_SEED)
    return {distinct[int(i)] for i in rng.permutation(len(distinct))[: int(round(HELDOUT_FRACTION * len(distinct)))]}


def _mirror_entries(folder: Path) -> list[Entry]:
    """The listing's objects; the source photo is ``coco_image_id`` (the crop's own file when the listing has no
    id)."""
    listing = folder / "objects.json"
    try:
        meta = json.loads(listing.read_text(encoding="utf-8"))
        objects = meta["objects"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{listing}: not a readable object listing ({exc}); restore it from the archive.") from None
    out = []
    for i, obj in enumerate(objects):
        if not isinstance(obj, dict) or "image" not in obj or "split" not in obj:
            raise DataError(f"{listing}: object #{i} lacks 'image' or 'split'.")
        if not obj.get("mask"):
            raise DataError(f"{listing}: object #{i} ({obj['image']}) has no 'mask'; an object bank needs an instance "
                            "mask per object (a copy-paste without masks would paste whole rectangles).")
        for key in ("image", "mask", "split", *(("category",) if "category" in obj else ())):
            if not isinstance(obj[key], str):
                raise DataError(f"{listing}: object #{i} has {key!r} = {obj[key]!r}; it must be a string (a path "
                                "relative to the listing, or a split name); restore the listing from the archive.")
        photo = f"{obj['split']}/{obj['coco_image_id']}" if "coco_image_id" in obj else str(obj["image"])
        scale = obj.get("stored_scale", 1.0)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale <= 1:
            raise DataError(f"{listing}: object #{i} ({obj['image']}) has stored_scale {scale!r}; it must be in (0, 1] "
                            "(the crop's size relative to its photo).")
        out.append((str(obj["split"]), folder / obj["image"], folder / obj["mask"], str(obj.get("category", "?")),
                    photo, float(scale)))
    return out


def _pebal_entries(coco: Path) -> list[Entry]:
    """PEBAL's processed COCO: one object (all object pixels) per photo."""
    out = []
    for coco_split in ("train2017", "val2017"):
        ann = coco / "annotations" / f"ood_seg_{coco_split}"
        if not ann.is_dir():
            continue
        for mask in sorted(ann.rglob("*.png")):
            image = coco / coco_split / f"{mask.stem}.jpg"
            out.append((coco_split, image, mask, "coco", str(image), 1.0))
    return out


def load_object_bank(root: Path, split: str, cache_dir: Path) -> ObjectBank:
    """Split ``split`` (train / val / test, see the module docstring) of the object bank under ``root``."""
    if split not in OBJECT_SPLITS:
        raise DataError(f"coco-objects: unknown split {split!r}; choose one of {list(OBJECT_SPLITS)}.")
    folder = first_match(root, ("coco-mini-objects",), True)
    if folder is None:
        archive = first_match(root, archive_patterns("coco-mini-objects"), False)
        if archive is not None:
            folder = first_match(extract_cached(archive, cache_dir), ("coco-mini-objects",), True)
    foreground: int | None = None
    if folder is not None:
        entries = _mirror_entries(folder)
    else:
        coco = first_match(root, ("coco", "COCO"), True)
        entries = _pebal_entries(coco) if coco is not None else []
        foreground = 254
        if not entries:
            raise DataError(f"coco-objects ({split}): no object bank under {root}. Looked for: "
                            f"{root}/coco-mini-objects/objects.json, coco-mini-objects.tar.gz, "
                            f"{root}/coco/annotations/ood_seg_train2017/*.png. Fix: place one there, or pass another "
                            "root (argument root=, or env OODTUNE_DATA).")
    held = _heldout([e[4] for e in entries if not e[0].startswith("val")])
    images, masks, cats, photos, scales = [], [], [], [], []
    for coco_split, image, mask_path, cat, photo, scale in entries:
        if _split_of(coco_split, photo, held) != split:
            continue
        img, mask = _crop(_read_rgb(image), _read_mask(mask_path, image, foreground), image)
        images.append(img)
        masks.append(mask)
        cats.append(cat)
        photos.append(photo)
        scales.append(scale)
    return ObjectBank(tuple(images), tuple(masks), tuple(cats), f"coco-objects-{split}", tuple(photos), tuple(scales))


def paste_object(frame: np.ndarray, labels: np.ndarray, image: np.ndarray, mask: np.ndarray,
                 rng: np.random.Generator, outlier_label: int) -> None:
    """Paste ``image`` (masked by ``mask``) into ``frame`` in place and set its pixels of ``labels`` to
    ``outlier_label`` (random scale, flip and position; see the module docstring)."""
    h, w = labels.shape
    longer = max(image.shape[:2])
    target = rng.uniform(*PASTE_SCALE) * min(h, w)
    scale = target / longer
    oh, ow = (max(1, min(h, int(round(s * scale)))) for s in image.shape[:2])
    flip = rng.random() < 0.5
    top, left = int(rng.integers(0, h - oh + 1)), int(rng.integers(0, w - ow + 1))
    obj = np.asarray(Image.fromarray(image).resize((ow, oh), Image.Resampling.BILINEAR))
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((ow, oh), Image.Resampling.NEAREST)) > 0
    if flip:
        obj, m = obj[:, ::-1], m[:, ::-1]
    region = (slice(top, top + oh), slice(left, left + ow))
    frame[region][m] = obj[m]
    labels[region][m] = outlier_label


def paste_objects(frames: np.ndarray, labels: np.ndarray, bank: ObjectBank, rng: np.random.Generator,
                  outlier_label: int, objects: Sequence[int] | None = None) -> None:
    """Paste one object of ``bank`` into each of ``frames`` (N, H, W, 3) in place, its pixels of ``labels`` (N, H, W)
    set to ``outlier_label`` (:func:`paste_object`). ``objects``: the bank indices to paste, into the first
    ``len(objects)`` frames; by default one object per frame, drawn from ``rng`` just before it is pasted."""
    count = len(frames) if objects is None else len(objects)
    for i in range(count):
        k = int(rng.integers(len(bank))) if objects is None else int(objects[i])
        paste_object(frames[i], labels[i], bank.images[k], bank.masks[k], rng, outlier_label)


def pasted_anomaly_set(frames: SegmentationSet, bank: ObjectBank, seed: int, name: str, cache_dir: Path
                       ) -> SegmentationSet:
    """``frames`` with one object of ``bank`` pasted into each (seeded), as an anomaly set (0 / 1 / 255); cached."""
    if frames.is_anomaly_set:
        raise DataError(f"{frames.name}: paste objects into an ID segmentation set, not into an anomaly set.")

    def build() -> SegmentationSet:
        rng = np.random.default_rng(seed)
        images = frames.images.copy()
        labels = np.full(frames.labels.shape, INLIER, dtype=np.uint8)
        if frames.ignore_index is not None:
            labels[frames.labels == frames.ignore_index] = VOID
        paste_objects(images, labels, bank, rng, ANOMALY)
        return SegmentationSet(images, labels, ANOMALY_CLASSES, VOID, name)

    # keyed by the pixels of frames and objects (a sparse grid of the frames) and the seed
    key = hashlib.sha256(b"".join([frames.images[:, ::7, ::7].tobytes(), frames.labels[:, ::7, ::7].tobytes(),
                                   bank.fingerprint().encode(), str(seed).encode()])).hexdigest()
    w, h = frames.size
    path = cache_dir / "segmentation" / f"{name}-{w}x{h}-seed{seed}-{key[:20]}.npz"
    return cached_segmentation(path, build)
