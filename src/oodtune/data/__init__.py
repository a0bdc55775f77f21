"""oodtune's data layer: every dataset as an :class:`ImageSet` (uint8 NHWC RGB + optional labels).

Entry point: :func:`load_dataset` (names listed by :func:`available_datasets`). Sources are read in their
published formats (CIFAR pickles, IDX, SVHN .mat, image folders, Tiny ImageNet, archives of those) from a
data root (:func:`default_data_root`), decoded once and cached as uint8 ``.npz`` under
:func:`default_cache_dir`. Offline protocol definitions live in :mod:`oodtune.data.protocol`.
"""

from oodtune.data.cache import default_cache_dir
from oodtune.data.imageset import ImageSet
from oodtune.data.objects import ObjectBank
from oodtune.data.protocol import PROTOCOLS
from oodtune.data.registry import (
    available_datasets,
    default_data_root,
    is_segmentation_set,
    load_dataset,
    load_objects,
    load_segmentation,
)
from oodtune.data.segmentation import SegmentationSet
from oodtune.errors import DataError

__all__ = [
    "PROTOCOLS",
    "DataError",
    "ImageSet",
    "ObjectBank",
    "SegmentationSet",
    "available_datasets",
    "default_cache_dir",
    "default_data_root",
    "is_segmentation_set",
    "load_dataset",
    "load_objects",
    "load_segmentation",
]
