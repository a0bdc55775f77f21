"""Images on the compute device, resident or streamed: how training and scoring get uint8 NCHW batches.

:func:`choose_placement` decides, and says why:

* **resident** -- the whole set as one uint8 (N, 3, H, W) tensor on the device, indexed per batch (the fast path;
  no per-batch host work). On CPU that is every set held in memory; on CUDA every set whose size fits in
  :data:`RESIDENT_FRACTION` of the free device memory (a set on disk is copied there chunk by chunk, never whole
  through host memory).
* **streamed** -- each batch is read from the host (a :class:`~oodtune.data.diskimages.DiskImages` file or a
  host array too large for the GPU), a background thread reading the next batch while the current one runs.
  On CPU that is every set on disk.

:class:`DeviceImages` implements both behind one interface: ``images[idx]`` (a batch of rows, e.g. a shuffled
training batch; a data-parallel rank asks for its own slice only, so it reads only its shard),
:meth:`DeviceImages.prefetched` (index batches with the next one read ahead) and :meth:`DeviceImages.batches`
(consecutive batches in order, for scoring).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .diskimages import DiskImages

__all__ = ["RESIDENT_FRACTION", "DeviceImages", "Placement", "choose_placement"]

log = logging.getLogger(__name__)

#: A set is kept resident on a GPU when it needs at most this fraction of the free device memory (the rest is for
#: the model, its activations and the optimizer).
RESIDENT_FRACTION = 0.5
#: Images per chunk when a set on disk is copied to the device.
_COPY_CHUNK = 1024


@dataclass(frozen=True)
class Placement:
    """``mode`` ("resident" or "streamed") and the ``reason`` in words."""

    mode: str
    reason: str


def choose_placement(nbytes: int, on_disk: bool, device_type: str, free_device_bytes: int | None = None) -> Placement:
    """Where a set of ``nbytes`` decoded bytes lives while it is used (module docstring). ``free_device_bytes`` is
    the free memory of a CUDA device (ignored elsewhere)."""
    gib = nbytes / 2**30
    if device_type != "cuda":
        if on_disk:
            return Placement("streamed", f"{gib:.1f} GiB on disk, read a batch at a time")
        return Placement("resident", f"{gib:.1f} GiB in memory")
    free = free_device_bytes or 0
    if nbytes <= RESIDENT_FRACTION * free:
        return Placement("resident", f"{gib:.1f} GiB fits in {RESIDENT_FRACTION:.0%} of the {free / 2**30:.1f} GiB "
                                     "free on the GPU")
    return Placement("streamed", f"{gib:.1f} GiB exceeds {RESIDENT_FRACTION:.0%} of the {free / 2**30:.1f} GiB free "
                                 "on the GPU; streamed from host " + ("disk" if on_disk else "memory"))


def _free_cuda_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def _host_rows(images: np.ndarray | DiskImages, rows: np.ndarray) -> np.ndarray:
    return images.read(rows) if isinstance(images, DiskImages) else images[rows]


def _to_nchw(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host (B, H, W, 3) uint8 batch as a (B, 3, H, W) uint8 tensor on ``device`` (pinned for a CUDA copy)."""
    t = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).contiguous()
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


class DeviceImages:
    """The images of a set as uint8 NCHW batches on ``device``, resident or streamed (module docstring)."""

    def __init__(self, images: np.ndarray | DiskImages, device: torch.device, name: str = "images",
                 placement: Placement | None = None) -> None:
        self.host, self.device, self.name = images, device, name
        on_disk = isinstance(images, DiskImages)
        nbytes = int(images.nbytes)
        if placement is None:
            free = _free_cuda_bytes(device) if device.type == "cuda" else None
            placement = choose_placement(nbytes, on_disk, device.type, free)
        self.placement = placement
        # said where it matters: a set streamed, or a GPU choosing (the CPU in-memory default stays quiet)
        level = logging.INFO if placement.mode == "streamed" or device.type == "cuda" else logging.DEBUG
        log.log(level, "%s: %s on %s (%s)", name, placement.mode, device, placement.reason)
        self.resident: torch.Tensor | None = None
        if placement.mode == "resident":  # filled chunk by chunk: never a second whole copy on the host or device
            n, height, width = (int(v) for v in images.shape[:3])
            self.resident = torch.empty((n, 3, height, width), dtype=torch.uint8, device=device)
            for start in range(0, n, _COPY_CHUNK):
                stop = min(start + _COPY_CHUNK, n)
                self.resident[start:stop] = _to_nchw(_host_rows(images, np.arange(start, stop)), device)
        self._ahead: tuple[torch.Tensor, Future[torch.Tensor]] | None = None

    @property
    def streamed(self) -> bool:
        return self.resident is None

    def __len__(self) -> int:
        return len(self.host)

    def _read(self, idx: torch.Tensor) -> torch.Tensor:
        return _to_nchw(_host_rows(self.host, idx.cpu().numpy()), self.device)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (a 1-D index tensor) as a uint8 (B, 3, H, W) tensor on the device."""
        if self.resident is not None:
            return self.resident[idx]
        if self._ahead is not None and self._ahead[0] is idx:
            return self._ahead[1].result()
        return self._read(idx)

    def prefetched(self, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """``batches`` unchanged; when streamed, the images of the next batch are read in the background while the
        caller works on the current one (``self[idx]`` then returns them)."""
        if self.resident is not None:
            yield from batches
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="oodtune-prefetch") as pool:
            it = iter(batches)
            nxt = next(it, None)
            pending = None if nxt is None else (nxt, pool.submit(self._read, nxt))
            while pending is not None:
                self._ahead = pending
                following = next(it, None)
                pending = None if following is None else (following, pool.submit(self._read, following))
                yield self._ahead[0]
            self._ahead = None

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Consecutive batches of ``batch_size`` images, in order (the last may be smaller)."""
        steps = (torch.arange(s, min(s + batch_size, len(self))) for s in range(0, len(self), batch_size))
        for idx in self.prefetched(steps):
            yield self.resident[idx.min():idx.max() + 1] if self.resident is not None else self[idx]
