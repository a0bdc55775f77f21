"""PEBAL's reference pasting mode: an object photo's allowed instances pasted at their native scale, then the whole
frame flipped, rescaled and cropped (the reference data loader's ``CityscapesCocoMix.mix_object`` + ``TrainPre``).

What the reference does (tianyu0207/PEBAL, ``code/dataset/data_loader.py``, ``code/config/config.py``):

* the epoch is every Cityscapes frame plus 10 % as many COCO photos (``subsampling_factor = 0.1``), shuffled, so a
  sample carries pasted objects with probability 0.1 / 1.1 = 1/11 (:data:`REFERENCE_SHARE`) and a batch may carry
  none;
* a COCO sample is pasted into a random Cityscapes frame (2048x1024): the photo's processed mask marks *all* its
  allowed instances (254), cut to their common bounding box at the photo's native pixel size, placed uniformly
  inside the frame; those pixels get the outlier label;
* every sample (pasted or not) is then flipped horizontally with probability 0.8 (``random() >= 0.2``), rescaled by
  a factor drawn from (0.5, 0.75, 1, 1.5, 1.75, 2) (:data:`REFERENCE_FRAME_SCALES`; image bilinear, labels
  nearest) and randomly cropped to 900x900, padded where the scaled frame is smaller (image 0 after
  normalisation = the mean colour; labels void).

Here, at a smaller frame (:func:`reference_object_scale`): an object keeps the share of the frame's pixels it would
cover in a 2048x1024 frame, i.e. it is scaled by sqrt(H·W / (2048·1024)) (and by 1 / the bank's storage scale, when
the bank stored it downscaled); the crop is the frame's own size (the network's input size) by default, not
900x900 (which is 0.88 x 0.44 of the reference frame). When a bank stores each instance cut out on its own (the
COCO-objects mirror), the photo's instances are each placed uniformly inside the frame (their positions in the
photo are not stored); PEBAL's processed layout stores one mask per photo, which is pasted as one piece.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = ["REFERENCE_FLIP", "REFERENCE_FRAME", "REFERENCE_FRAME_SCALES", "REFERENCE_SHARE", "paste_native",
           "reference_augment", "reference_object_scale"]

#: The reference's frame size (Cityscapes, width x height): objects keep their share of its pixels.
REFERENCE_FRAME = (2048, 1024)
#: The reference's frame rescaling factors (``config.train_scale_array``), drawn uniformly.
REFERENCE_FRAME_SCALES = (0.5, 0.75, 1.0, 1.5, 1.75, 2.0)
#: Probability of a horizontal flip in the reference (``random_mirror``: flip when ``random() >= 0.2``).
REFERENCE_FLIP = 0.8
#: Share of samples that carry pasted objects in the reference: 0.1 x the frames, mixed in (0.1 / 1.1).
REFERENCE_SHARE = 0.1 / 1.1


def reference_object_scale(frame_size: tuple[int, int]) -> float:
    """The factor that gives an object at native pixel size in a 2048x1024 frame the same share of the pixels of a
    ``frame_size`` = (width, height) frame: sqrt(W·H / (2048·1024))."""
    w, h = frame_size
    return float(np.sqrt(w * h / (REFERENCE_FRAME[0] * REFERENCE_FRAME[1])))


def paste_native(frame: np.ndarray, labels: np.ndarray, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                 scales: Sequence[float], rng: np.random.Generator, outlier_label: int) -> None:
    """Paste each of ``images`` (masked by ``masks``) into ``frame`` in place, resized by its entry of ``scales``
    (shrunk further to fit the frame), at a uniformly random position inside the frame, without a flip; its mask
    pixels of ``labels`` get ``outlier_label``."""
    h, w = labels.shape
    for image, mask, scale in zip(images, masks, scales, strict=True):
        oh, ow = (max(1, int(round(s * scale))) for s in image.shape[:2])
        fit = min(1.0, h / oh, w / ow)
        oh, ow = max(1, min(h, int(oh * fit))), max(1, min(w, int(ow * fit)))
        top, left = int(rng.integers(0, h - oh + 1)), int(rng.integers(0, w - ow + 1))
        obj = np.asarray(Image.fromarray(image).resize((ow, oh), Image.Resampling.BILINEAR))
        m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((ow, oh), Image.Resampling.NEAREST)) > 0
        region = (slice(top, top + oh), slice(left, left + ow))
        frame[region][m] = obj[m]
        labels[region][m] = outlier_label


def reference_augment(frame: np.ndarray, labels: np.ndarray, rng: np.random.Generator, *,
                      crop: tuple[int, int] | None = None, fill: Sequence[int] = (0, 0, 0), void: int = 255,
                      scales: Sequence[float] = REFERENCE_FRAME_SCALES, flip: float = REFERENCE_FLIP
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The reference's frame augmentation of one (H, W, 3) uint8 ``frame`` and its (H, W) ``labels``: flip with
    probability ``flip``, rescale by a factor drawn from ``scales`` (bilinear / nearest), random crop of ``crop`` =
    (width, height) (default: the frame's size), padded with ``fill`` (the mean colour) and ``void`` labels where
    the scaled frame is smaller. Returns new arrays of the crop's size."""
    h, w = labels.shape
    cw, ch = crop if crop is not None else (w, h)
    if rng.random() < flip:
        frame, labels = frame[:, ::-1], labels[:, ::-1]
    s = float(scales[int(rng.integers(len(scales)))])
    sh, sw = max(1, int(h * s)), max(1, int(w * s))
    img = np.asarray(Image.fromarray(np.ascontiguousarray(frame)).resize((sw, sh), Image.Resampling.BILINEAR))
    lab = np.asarray(Image.fromarray(np.ascontiguousarray(labels)).resize((sw, sh), Image.Resampling.NEAREST))
    top = int(rng.integers(0, sh - ch + 1)) if sh > ch else 0
    left = int(rng.integers(0, sw - cw + 1)) if sw > cw else 0
    out = np.empty((ch, cw, 3), dtype=np.uint8)
    out[:] = np.asarray(fill, dtype=np.uint8)
    out_lab = np.full((ch, cw), void, dtype=labels.dtype)
    part = (slice(top, top + ch), slice(left, left + cw))
    piece, piece_lab = img[part], lab[part]
    out[: piece.shape[0], : piece.shape[1]] = piece
    out_lab[: piece_lab.shape[0], : piece_lab.shape[1]] = piece_lab
    return out, out_lab
