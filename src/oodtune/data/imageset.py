"""The one dataset type: decoded uint8 RGB images (in memory, or on disk for large sets) plus optional labels."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError
from .diskimages import DiskImages


@dataclass(frozen=True)
class ImageSet:
    """Decoded images, ``images`` of shape (N, H, W, 3), dtype uint8, RGB, channel-last.

    ``labels`` is an int64 array of shape (N,) with values in ``[0, len(classes))``, or ``None`` for
    unlabelled sets (typical for OOD test sets). ``name`` is a human-readable identifier used in tables.
    A set too large for memory holds a :class:`~oodtune.data.diskimages.DiskImages` instead of an array (the
    decode cache decides, see :mod:`oodtune.data.cache`); indexing it reads the rows asked for.
    """

    images: np.ndarray | DiskImages
    labels: np.ndarray | None
    classes: tuple[str, ...] = field(default=())
    name: str = "dataset"

    def __post_init__(self) -> None:
        img = self.images
        if (not isinstance(img, (np.ndarray, DiskImages)) or img.dtype != np.uint8 or img.ndim != 4
                or img.shape[-1] != 3):
            shape = getattr(img, "shape", None)
            dtype = getattr(img, "dtype", None)
            raise DataError(
                f"{self.name}: images must be a uint8 array of shape (N, H, W, 3); got shape={shape} dtype={dtype}. "
                "Decode with oodtune.data.images.decode_image (grey images are expanded to 3 channels)."
            )
        if len(img) == 0:
            raise DataError(f"{self.name}: the dataset is empty (0 images). Check the data root and the split name.")
        if self.labels is not None:
            lab = np.asarray(self.labels)
            if lab.shape != (len(img),):
                raise DataError(f"{self.name}: {len(img)} images but labels have shape {lab.shape}.")
            if not np.issubdtype(lab.dtype, np.integer):
                raise DataError(f"{self.name}: labels must be integers, got dtype {lab.dtype}.")
            if self.classes and (lab.min() < 0 or lab.max() >= len(self.classes)):
                raise DataError(
                    f"{self.name}: labels span [{lab.min()}, {lab.max()}] but there are {len(self.classes)} classes."
                )
            object.__setattr__(self, "labels", lab.astype(np.int64, copy=False))

    def __len__(self) -> int:
        return len(self.images)

    @property
    def resolution(self) -> int:
        """Side length of the (square) images."""
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """SHA-256 of the content: image shape and pixels, labels and class names (not the display name). Two sets
        with the same fingerprint hold the same images with the same labels in the same order. A set on disk uses
        the fingerprint recorded when its file was written (a subset of it: a digest of that and its rows)."""
        images = self.images
        if isinstance(images, DiskImages) and images.index is None:
            return images.fingerprint()
        h = hashlib.sha256(json.dumps([list(images.shape), list(self.classes)]).encode())
        disk = isinstance(images, DiskImages)
        h.update(images.fingerprint().encode() if disk else np.ascontiguousarray(images).data)  # type: ignore[union-attr]
        if self.labels is not None:
            h.update(b"labels")
            h.update(np.ascontiguousarray(self.labels, dtype=np.int64).data)
        return h.hexdigest()

    def image_digests(self) -> list[bytes]:
        """One digest (BLAKE2b, 16 bytes) per image of its pixels: two images share a digest exactly when they hold
        the same pixels (compare sets at one resolution)."""
        images = self.images
        chunks = images.chunks(1024) if isinstance(images, DiskImages) else (images,)
        return [hashlib.blake2b(np.ascontiguousarray(img).data, digest_size=16).digest()
                for chunk in chunks for img in chunk]

    def shared_with(self, other: ImageSet) -> np.ndarray:
        """Boolean mask (N,) of this set's images whose pixels also occur in ``other`` (by :meth:`image_digests`)."""
        theirs = set(other.image_digests())
        return np.array([d in theirs for d in self.image_digests()], dtype=bool)

    def subset(self, indices: np.ndarray, name: str | None = None) -> ImageSet:
        """A new ImageSet holding ``images[indices]`` (and labels) under ``name`` (default: same name); a subset
        of a set on disk stays on disk."""
        idx = np.asarray(indices)
        return ImageSet(
            images=self.images.view(idx) if isinstance(self.images, DiskImages) else self.images[idx],
            labels=None if self.labels is None else self.labels[idx],
            classes=self.classes,
            name=name or self.name,
        )

    def class_counts(self) -> np.ndarray:
        """Number of images per class (length ``num_classes``)."""
        if self.labels is None:
            raise DataError(f"{self.name}: class counts need labels, but this set is unlabelled.")
        return np.bincount(self.labels, minlength=self.num_classes)
