"""On-disk cache of a frozen segmentation trunk's output, for last-block fine-tuning.

When only the last block of a segmentation network trains (:attr:`oodtune.models.SegmentationModel.splits`), the
frozen trunk maps a frame without a pasted object to the same features at every step: trunk(x) depends on the
frozen weights, the frame, its flip and the input size only (frozen BatchNorm normalises with running statistics).
:class:`TrunkCache` keeps those features in a memory-mapped file, so such a frame costs the trainable block's
forward and backward only; frames with a pasted object change every step and run the whole network.

Layout: ``<cache dir>/trunk/<key>/`` holds ``features.npy`` (N frames x 2 flips x C x h x w, bf16 bits as uint16
when the trunk runs in bf16, else float16) and ``filled.npy`` (N x 2 bytes). The key hashes the frozen weights,
the training set's content fingerprint, the input size, the normaliser and the storage dtype, so any change
builds a new cache. The folder appears atomically (built under a temporary name, then renamed); an entry's flag is
set only after its features are written, so a process killed at any point (kill -9) leaves either a complete entry
or one that is recomputed. Two processes sharing an entry write the same features. Caching stores bf16 / fp16
values: the cached path's losses equal the uncached path's up to that rounding (bit-identical under bf16, where
the trunk's output already is bf16).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.cache import default_cache_dir

__all__ = ["CACHE_VERSION", "TrunkCache", "cache_enabled", "trunk_key"]

#: Bump when what the trunk computes changes, so old entries are ignored.
CACHE_VERSION = 1


def cache_enabled() -> bool:
    """The trunk cache is on unless ``OODTUNE_TRUNK_CACHE=0``."""
    return os.environ.get("OODTUNE_TRUNK_CACHE", "1") != "0"


def trunk_key(frozen: dict[str, torch.Tensor], *parts: object) -> str:
    """SHA-256 over the frozen weights (names and values) and ``parts`` (data fingerprint, input size, ...)."""
    h = hashlib.sha256(f"trunk-cache-v{CACHE_VERSION}".encode())
    for name in sorted(frozen):
        h.update(name.encode())
        h.update(frozen[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for part in parts:
        h.update(repr(part).encode())
    return h.hexdigest()[:32]


class TrunkCache:
    """Trunk features of ``num_frames`` frames x 2 flips under ``key`` (module docstring)."""

    def __init__(self, key: str, num_frames: int, dtype: torch.dtype, root: str | os.PathLike | None = None) -> None:
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"the trunk cache stores bf16 or fp16, not {dtype}")
        self.dir = Path(root) if root is not None else default_cache_dir() / "trunk" / key
        self.num_frames, self.dtype = num_frames, dtype
        self._features: np.memmap | None = None
        self._filled: np.memmap | None = None
        self.hits = self.misses = 0
        self.attach()

    def _storage(self) -> np.dtype:
        return np.dtype(np.uint16 if self.dtype == torch.bfloat16 else np.float16)

    def _open(self, shape: Sequence[int]) -> None:
        """Open the cache folder, creating it (atomically) for features of ``shape`` (C, h, w) when missing."""
        full = (self.num_frames, 2, *shape)
        if not (self.dir / "filled.npy").exists():
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.dir.parent))
            np.lib.format.open_memmap(tmp / "features.npy", "w+", self._storage(), full).flush()
            np.lib.format.open_memmap(tmp / "filled.npy", "w+", np.uint8, full[:2]).flush()
            try:
                os.rename(tmp, self.dir)
            except OSError:  # another process created it first: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
        features = np.load(self.dir / "features.npy", mmap_mode="r+")
        if features.shape != full or features.dtype != self._storage():
            raise RuntimeError(f"{self.dir} holds {features.shape} {features.dtype} features, expected {full}")
        self._features, self._filled = features, np.load(self.dir / "filled.npy", mmap_mode="r+")

    def _to_numpy(self, t: torch.Tensor) -> np.ndarray:
        t = t.detach().to("cpu", self.dtype).contiguous()
        return (t.view(torch.uint16) if self.dtype == torch.bfloat16 else t).numpy()

    def _from_numpy(self, a: np.ndarray, device: torch.device) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return (t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t).to(device)

    def get(self, frames: Sequence[int], flips: Sequence[bool],
            compute: Callable[[list[int]], torch.Tensor], device: torch.device) -> torch.Tensor:
        """Trunk features (B, C, h, w) of ``frames`` with their ``flips``, in the cache's dtype; ``compute(rows)``
        gives the features of the listed rows (positions in ``frames``) that are not cached yet."""
        flip_idx = [int(f) for f in flips]
        missing = list(range(len(frames))) if self._filled is None else \
            [i for i, (k, f) in enumerate(zip(frames, flip_idx, strict=True)) if not self._filled[k, f]]
        fresh = compute(missing).to(self.dtype) if missing else None
        if fresh is not None and self._features is None:
            self._open(fresh.shape[1:])
        if self._features is None or self._filled is None:
            raise RuntimeError("TrunkCache.get: no features cached and none computed")
        if fresh is not None:
            values = self._to_numpy(fresh)
            for j, i in enumerate(missing):
                self._features[frames[i], flip_idx[i]] = values[j]  # features first ...
            self._features.flush()
            for i in missing:
                self._filled[frames[i], flip_idx[i]] = 1  # ... then the flag: a killed write is recomputed
            self._filled.flush()
        self.misses += len(missing)
        self.hits += len(frames) - len(missing)
        cached = sorted(set(range(len(frames))) - set(missing))
        out = torch.empty((len(frames), *self._features.shape[2:]), dtype=self.dtype, device=device)
        if cached:
            rows = np.array([frames[i] for i in cached]), np.array([flip_idx[i] for i in cached])
            out[cached] = self._from_numpy(self._features[rows], device)
        if fresh is not None:
            out[missing] = fresh.to(device)
        return out

    def attach(self) -> None:
        """Open an existing cache folder (its features' shape is read from the file)."""
        if (self.dir / "filled.npy").exists():
            shape = np.load(self.dir / "features.npy", mmap_mode="r").shape[2:]
            self._open(shape)
