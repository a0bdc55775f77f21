"""Shared fixtures-as-functions for the model / batching / checkpoint / trainer / DDP tests.

Everything here is CPU-sized: WRN-10-1 (depth 6n+4 with n=1) on a few hundred 16x16 images trains an epoch
in well under a second on two cores.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oodtune.data.imageset import ImageSet
from oodtune.losses.terms import CompositeLoss
from oodtune.models import FeatureModel, RunMeta, build_model
from oodtune.training.config import TrainConfig
from oodtune.training.trainer import Trainer

TINY_ARCH = "wrn-10-1"
NUM_CLASSES = 4
RESOLUTION = 16

#: Distinct, saturated class colours for the "easy" task (RGB, 0-255).
_CLASS_COLOURS = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30]], dtype=np.int16)


def random_imageset(n: int = 256, *, size: int = RESOLUTION, num_classes: int = NUM_CLASSES, seed: int = 0,
                    labelled: bool = True, name: str = "random") -> ImageSet:
    """``n`` uniformly random uint8 images (labels uniform over ``num_classes``, or unlabelled)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n) if labelled else None
    classes = tuple(f"c{i}" for i in range(num_classes)) if labelled else ()
    return ImageSet(images, labels, classes, name)


def easy_imageset(n: int = 256, *, size: int = RESOLUTION, seed: int = 0) -> ImageSet:
    """A trivially learnable task: each class is a noisy patch of one saturated colour (NUM_CLASSES classes)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % NUM_CLASSES
    rng.shuffle(labels)
    noise = rng.integers(-25, 26, (n, size, size, 3))
    images = np.clip(_CLASS_COLOURS[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return ImageSet(images, labels, tuple(f"colour{i}" for i in range(NUM_CLASSES)), "easy")


def checkpoint_meta(ds: ImageSet, arch: str = TINY_ARCH) -> RunMeta:
    """The RunMeta that ``save_checkpoint`` requires, for a model of ``arch`` trained on ``ds``."""
    return RunMeta(arch=arch, num_classes=ds.num_classes, classes=ds.classes, mean=(0.5,) * 3, std=(0.25,) * 3,
                   resolution=ds.resolution, dataset=ds.name)


def tiny_net(seed: int = 0, num_classes: int = NUM_CLASSES, arch: str = TINY_ARCH, *,
             drop_rate: float = 0.3) -> FeatureModel:
    """A freshly initialised FeatureModel whose initial weights depend only on ``seed``."""
    torch.manual_seed(seed)
    return FeatureModel(build_model(arch, num_classes, drop_rate=drop_rate))


def tiny_config(**overrides: Any) -> TrainConfig:
    """A CPU-fast TrainConfig (fp32, 2 epochs, small batches); ``overrides`` replace fields."""
    base: dict[str, Any] = {"epochs": 2, "batch_size": 32, "outlier_batch_size": 64, "lr": 0.05, "device": "cpu",
                            "precision": "fp32", "seed": 0}
    base.update(overrides)
    return TrainConfig(**base)


def make_trainer(train_set: ImageSet, loss: CompositeLoss, *, run_dir: str | Path | None = None,
                 outliers: ImageSet | None = None, net_seed: int = 0, drop_rate: float = 0.3,
                 **config: Any) -> Trainer:
    """A Trainer for a fresh ``tiny_net(net_seed, drop_rate=...)``; ``config`` goes to :func:`tiny_config`."""
    net = tiny_net(net_seed, train_set.num_classes, drop_rate=drop_rate)
    return Trainer(net, train_set, loss, tiny_config(**config), outliers=outliers, run_dir=run_dir,
                   meta=checkpoint_meta(train_set))


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model``'s state_dict."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-exact equality of two state dicts (same keys, same values)."""
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


def free_port() -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def recording(fn: Callable[..., Iterator[torch.Tensor]], log: list[list[int]]) -> Callable[..., Iterator[torch.Tensor]]:
    """Wrap an index-batch generator function so that every yielded batch is appended to ``log``."""
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[torch.Tensor]:
        for batch in fn(*args, **kwargs):
            log.append(batch.tolist())
            yield batch
    return wrapper


def ddp_worker(rank: int, world: int, port: int, out_dir: str, batch_size: int) -> None:
    """One rank of the CPU/gloo DDP test (run under ``torch.multiprocessing.spawn``).

    Sets the torchrun-style environment, trains a tiny model for 2 epochs through ``Trainer`` with a shared
    run folder, and writes ``rank{r}.pt`` = {"state": final weights, "batches": index slices seen per step,
    "saves": paths this rank wrote checkpoints to}.
    """
    import oodtune.training.trainer as trainer_mod
    from oodtune.losses.terms import build_method_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), OODTUNE_PROGRESS="0")
    torch.set_num_threads(1)
    batches: list[list[int]] = []
    saves: list[str] = []
    real_save = trainer_mod.save_checkpoint

    def save_and_record(path: str | Path, *args: Any, **kwargs: Any) -> Path:
        saves.append(str(path))
        return real_save(path, *args, **kwargs)

    trainer_mod.index_batches = recording(trainer_mod.index_batches, batches)
    trainer_mod.save_checkpoint = save_and_record
    ds = random_imageset(128, seed=1)
    # different init per rank on purpose: DDP must broadcast rank 0's weights.
    trainer = make_trainer(ds, build_method_loss("ce"), run_dir=Path(out_dir) / "run", net_seed=rank,
                           batch_size=batch_size, epochs=2)
    trainer.fit()
    torch.save({"state": state_of(trainer.net), "batches": batches, "saves": saves}, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


class Crash(Exception):
    """Raised by the patched ``Trainer._save_state`` (:func:`crash_after_epochs`): the process dying after a
    checkpoint."""


def crash_after_epochs(monkeypatch: Any, epochs: int) -> None:
    """Make every Trainer raise :class:`Crash` right after saving the state of epoch ``epochs``."""
    real = Trainer._save_state

    def save_then_maybe_crash(self: Trainer, epoch: int, *args: Any, **kwargs: Any) -> None:
        real(self, epoch, *args, **kwargs)
        if epoch == epochs:
            raise Crash

    monkeypatch.setattr(Trainer, "_save_state", save_then_maybe_crash)
