"""Device, precision, compilation and data-parallel settings shared by training and scoring."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError, DeviceUnavailableError

__all__ = [
    "DEVICE_TYPES", "DistInfo", "autocast", "compile_mode", "init_distributed", "local_device", "resolve_device",
]

#: Device types oodtune runs on.
DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(device: str | None = None) -> torch.device:
    """``device`` as given, else CUDA when present, else CPU. An unknown name or a device this machine does not
    have is a clear error (:class:`ConfigError` / :class:`DeviceUnavailableError`), not torch's."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"device {device!r} requested but CUDA is not available; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceUnavailableError(f"device {device!r} requested but this machine has {count} CUDA device(s): "
                                         f"use cuda:0 .. cuda:{count - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailableError(f"device {device!r} requested but MPS is not available; use --device cpu")
    return dev


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast when ``precision`` is 'bf16' (or 'auto' on CUDA); otherwise full fp32."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def compile_mode(mode: str, device: torch.device, world: int = 1) -> str:
    """The ``torch.compile`` mode to use. ``auto`` is ``reduce-overhead`` (CUDA graphs) on a single CUDA device,
    where it trained 4x faster than eager on an H100 (``results/speed.md``); ``none`` on CPU, where it gains
    nothing, and in multi-process (DDP) jobs, where CUDA graphs around the gradient all-reduce are unmeasured."""
    if mode == "auto":
        return "reduce-overhead" if device.type == "cuda" and world == 1 else "none"
    return mode


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a data-parallel job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_batch(self, batch_size: int, what: str = "--batch-size") -> None:
        """A global batch must split evenly over the processes: uneven slices would draw different amounts of
        augmentation randomness from the shared generator and the ranks' shuffles would drift apart."""
        if batch_size % self.world:
            raise ConfigError(f"{what} {batch_size} is not a multiple of the {self.world} data-parallel processes; "
                             f"use a multiple of {self.world} (the batch size is global, split across processes).")


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun job described by the environment (WORLD_SIZE > 1), else a single-process DistInfo.

    Uses NCCL on CUDA (one GPU per LOCAL_RANK) and gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


def local_device(device: torch.device) -> torch.device:
    """Under torchrun on CUDA, each process uses GPU LOCAL_RANK."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ and device.index is None:
        idx = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return device
