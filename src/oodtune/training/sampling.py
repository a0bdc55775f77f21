"""Which images each training step sees: shuffled ID index batches and an endless outlier sampler.

Both draw from one seeded ``torch.Generator`` (on the training device), so a seed reproduces the order and a
resumed run continues it (``OutlierSampler.state_dict``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import DataError


def index_batches(
    n: int, batch_size: int, generator: torch.Generator, *, drop_last: bool = True, rank: int = 0, world: int = 1
) -> Iterator[torch.Tensor]:
    """One epoch of shuffled index batches (without replacement) over ``range(n)``.

    With ``world`` > 1 (data parallel), every rank draws the same permutation and takes the
    ``rank``-th slice of each global batch, so the global batch is ``batch_size`` and ranks never overlap.
    """
    if n <= 0:
        raise DataError("cannot batch an empty dataset")
    perm = torch.randperm(n, generator=generator, device=generator.device)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        batch = perm[start : start + batch_size]
        yield batch[rank::world] if world > 1 else batch


class OutlierSampler:
    """Endless outlier batches drawn without replacement from the *whole* auxiliary set.

    Consumes a fresh random permutation chunk by chunk; when fewer than ``batch_size`` indices are left a
    new permutation begins, so every auxiliary image is used once before any is repeated.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1) -> None:
        if n < batch_size:
            raise DataError(f"the auxiliary outlier set has {n} images, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.rank, self.world = rank, world
        self._perm = torch.empty(0, dtype=torch.long)
        self._pos = 0

    def next(self) -> torch.Tensor:
        if self._pos + self.batch_size > len(self._perm):
            self._perm = torch.randperm(self.n, generator=self.generator, device=self.generator.device)
            self._pos = 0
        batch = self._perm[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return batch[self.rank :: self.world] if self.world > 1 else batch

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """Position in the current permutation, so a resumed run continues it (checkpoint-safe types)."""
        return {"perm": self._perm.cpu(), "pos": self._pos}

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        self._perm = torch.as_tensor(state["perm"]).to(self.generator.device)
        self._pos = int(state["pos"])
