"""Where a pipeline step gets its datasets: one data root, each dataset decoded and loaded at most once."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

from ..data import (
    ImageSet,
    ObjectBank,
    SegmentationSet,
    default_data_root,
    load_dataset,
    load_objects,
    load_segmentation,
)
from ..data.registry import resolve_dataset
from ..data.segmentation import Size
from ..models import RunMeta

__all__ = ["DataSource", "as_source", "with_id_data"]

T = TypeVar("T")


class DataSource:
    """Datasets under one data root, memoised: a benchmark that evaluates many checkpoints on the same OOD sets
    loads each set once. ``root=None`` is :func:`oodtune.data.default_data_root`; ``download`` fetches official
    archives that are missing (CIFAR-10/100)."""

    def __init__(self, root: str | Path | None = None, *, download: bool = False) -> None:
        self.root = Path(root).expanduser() if root is not None else default_data_root()
        self.download = download
        self._memo: dict[Hashable, Any] = {}

    def memo(self, key: Hashable, build: Callable[[], T]) -> T:
        """``build()`` once per ``key`` for the life of this source (datasets, and results derived from them)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def load(self, name: str, split: str, resolution: int, num_images: int | None = None) -> ImageSet:
        """``load_dataset(name, root, split, resolution=..., num_images=...)``, memoised."""
        return self.memo(("images", name, split, resolution, num_images),
                         lambda: load_dataset(name, self.root, split, resolution=resolution, num_images=num_images,
                                              download=self.download))

    def segmentation(self, name: str, split: str, *, size: Size | None = None, height: int | None = None,
                     num_images: int | None = None) -> SegmentationSet:
        """``load_segmentation(name, root, split, ...)``, memoised."""
        return self.memo(("segmentation", name, split, size, height, num_images),
                         lambda: load_segmentation(name, self.root, split, size=size, height=height,
                                                   num_images=num_images))

    def objects(self, name: str, split: str) -> ObjectBank:
        """``load_objects(name, root, split)``, memoised."""
        return self.memo(("objects", name, split), lambda: load_objects(name, self.root, split))

    def __repr__(self) -> str:
        return f"DataSource({str(self.root)!r})"


def as_source(data: DataSource | str | Path | None) -> DataSource:
    """``data`` itself when it is a DataSource, else a new one over that root."""
    return data if isinstance(data, DataSource) else DataSource(data)


def with_id_data(meta: RunMeta, id_data: str | None, source: DataSource) -> RunMeta:
    """``meta`` with its ID dataset renamed to ``id_data`` (a moved folder, another data root's copy)."""
    return meta if id_data is None else meta.replace(dataset=resolve_dataset(id_data, source.root))
