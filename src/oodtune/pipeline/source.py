"""Where a pipeline step gets its datasets: one data root, each dataset decoded and loaded at most once."""

from __future__ import annotations

from pathlib import Path

from ..data import ImageSet, default_data_root, load_dataset

__all__ = ["DataSource", "as_source"]


class DataSource:
    """Datasets under one data root, memoised: a benchmark that evaluates many checkpoints on the same OOD sets
    loads each set once. ``root=None`` is :func:`oodtune.data.default_data_root`; ``download`` fetches official
    archives that are missing (CIFAR-10/100)."""

    def __init__(self, root: str | Path | None = None, *, download: bool = False) -> None:
        self.root = Path(root).expanduser() if root is not None else default_data_root()
        self.download = download
        self._memo: dict[tuple[str, str, int, int | None], ImageSet] = {}

    def load(self, name: str, split: str, resolution: int, num_images: int | None = None) -> ImageSet:
        """``load_dataset(name, root, split, resolution=..., num_images=...)``, memoised."""
        key = (name, split, resolution, num_images)
        if key not in self._memo:
            self._memo[key] = load_dataset(name, self.root, split, resolution=resolution, num_images=num_images,
                                           download=self.download)
        return self._memo[key]

    def __repr__(self) -> str:
        return f"DataSource({str(self.root)!r})"


def as_source(data: DataSource | str | Path | None) -> DataSource:
    """``data`` itself when it is a DataSource, else a new one over that root."""
    return data if isinstance(data, DataSource) else DataSource(data)
