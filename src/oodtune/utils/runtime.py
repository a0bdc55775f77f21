"""Device, precision, thread, compilation and data-parallel settings shared by training and scoring.

Precision: ``auto`` is bf16 autocast where the hardware runs bf16 natively — CUDA, and CPUs with AMX-BF16 or
AVX512-BF16 (oneDNN's bf16 kernels) — and fp32 elsewhere. Under bf16 autocast the network runs in channels_last
memory format (oneDNN's and cuDNN's fast layout); losses, scores and metrics are computed in fp32/fp64 from its
outputs (see :mod:`oodtune.losses`, :mod:`oodtune.energy`).

Threads: one process uses at most the CPUs it may run on — its affinity mask and, in a container, its cgroup
CPU quota (``cpu.max``) — so it never starts more OpenMP threads than it can be given. Several processes on one
machine should split the CPUs between them (``--threads``, or ``OMP_NUM_THREADS``): two threads per process on
cores that are already busy made convolutions 2-4x slower than one.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from ..errors import ConfigError, DeviceUnavailableError

__all__ = [
    "DEVICE_TYPES", "DistInfo", "autocast", "compile_mode", "init_distributed", "local_device", "resolve_device",
]

#: Device types oodtune runs on.
DEVICE_TYPES = ("cpu", "cuda", "mps")
#: ``--precision`` values: auto (bf16 where native, else fp32), fp32, bf16 (autocast).
PRECISIONS = ("auto", "fp32", "bf16")
#: /proc/cpuinfo flags of CPUs with native bf16 arithmetic (Intel AMX, AVX512-BF16 on Intel and AMD).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
#: The cgroup v2 CPU quota of this process's container ("max" or "QUOTA PERIOD" in microseconds).
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
log = logging.getLogger(__name__)
M = TypeVar("M", bound=torch.nn.Module)


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


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def cpu_bf16_flags() -> tuple[str, ...]:
    """The native-bf16 instruction sets of this CPU (``BF16_CPU_FLAGS`` it has); empty where bf16 would be
    emulated. Read from /proc/cpuinfo; elsewhere (macOS, Windows) oneDNN's own check stands in."""
    found = tuple(f for f in BF16_CPU_FLAGS if f in _cpuinfo_flags())
    if found or Path("/proc/cpuinfo").exists():
        return found
    return ("onednn",) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ()


@functools.lru_cache(maxsize=1)
def cpu_bf16_native() -> bool:
    """Whether this CPU runs bf16 convolutions and matrix products natively (AMX-BF16 or AVX512-BF16)."""
    return bool(cpu_bf16_flags()) and torch.backends.mkldnn.is_available()


@functools.lru_cache(maxsize=4)
def _note_fp32_fallback(device_type: str) -> None:
    log.info("precision auto: this CPU has no native bf16 (AMX-BF16 or AVX512-BF16), running in fp32")


def resolve_precision(device: torch.device, precision: str) -> str:
    """``fp32`` or ``bf16``: what ``precision`` (auto | fp32 | bf16) means on ``device``. ``auto`` is bf16 on CUDA
    and on a CPU with native bf16 (:func:`cpu_bf16_native`), else fp32 (with a one-line note on CPUs)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda" or (device.type == "cpu" and cpu_bf16_native()):
        return "bf16"
    if device.type == "cpu":
        _note_fp32_fallback(device.type)
    return "fp32"


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast when ``precision`` resolves to bf16 on ``device`` (:func:`resolve_precision`); else fp32."""
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


_INFERENCE_PRECISION: contextvars.ContextVar[str] = contextvars.ContextVar("oodtune_inference_precision",
                                                                         default="fp32")


@contextmanager
def inference_precision(precision: str) -> Iterator[None]:
    """Inside this block, forward passes that score, evaluate, calibrate or predict (``compute_outputs``,
    ``forward_maps``) run in ``precision`` (auto | fp32 | bf16) unless told otherwise; outside it they run in fp32.
    The command line opens it with ``--precision``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    token = _INFERENCE_PRECISION.set(precision)
    try:
        yield
    finally:
        _INFERENCE_PRECISION.reset(token)


def current_inference_precision() -> str:
    """The precision of :func:`inference_precision`'s innermost block (fp32 outside every block)."""
    return _INFERENCE_PRECISION.get()


def prepare_inference(net: M, device: torch.device, precision: str | None) -> tuple[M, str, bool]:
    """(``net`` on ``device`` in eval mode, the resolved precision, whether inputs go channels_last): ``precision``
    None means :func:`current_inference_precision`; channels_last under bf16 (:func:`channels_last_default`)."""
    resolved = resolve_precision(device, precision or current_inference_precision())
    channels_last = channels_last_default(device, resolved)
    net.to(device).eval()  # in place, as nn.Module.to is for modules
    if channels_last:
        net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return net, resolved, channels_last


def channels_last_default(device: torch.device, precision: str) -> bool:
    """channels_last memory format: on CUDA, and on a CPU running bf16 (oneDNN's blocked bf16 kernels want NHWC;
    in fp32 it gains nothing on a CPU)."""
    return device.type == "cuda" or (device.type == "cpu" and resolve_precision(device, precision) == "bf16")


def channels_last_for_training(net: torch.nn.Module, device: torch.device, precision: str) -> bool:
    """:func:`channels_last_default`, except on a CPU under bf16 when ``net`` trains a dilated convolution: there
    oneDNN's channels_last kernel for the weight gradient of a dilated 3x3 convolution returns NaN at some channel
    counts and map sizes (PyTorch 2.13 on AVX512-BF16: 24, 26 and 40 channels from about 22x30 up, while 8, 16, 32,
    48 and 64 are correct; the input gradient and the forward pass are right), which made ESPNet's whole-network
    training diverge after its first step. Such networks train in the contiguous format (a one-line note says so);
    an explicit ``TrainConfig.channels_last`` still wins."""
    if not channels_last_default(device, precision):
        return False
    if device.type == "cpu" and any(isinstance(m, torch.nn.Conv2d) and max(m.dilation) > 1 and m.weight.requires_grad
                                    for m in net.modules()):
        log.info("bf16 on a CPU: a trained dilated convolution keeps the contiguous memory format (channels_last "
                 "gives NaN weight gradients there)")
        return False
    return True


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup v2 CPU quota (``cpu.max``) when one is
    set (a container limited to 1.5 CPUs gets 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text(encoding="utf-8").split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def default_threads() -> int:
    """Intra-op threads when none are asked for: ``OMP_NUM_THREADS`` if set, else :func:`available_cpus`."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return available_cpus()


def set_threads(threads: int | None = None) -> int:
    """Use ``threads`` intra-op threads (default :func:`default_threads`); more than :func:`available_cpus` is
    refused (:class:`ConfigError`): it would only oversubscribe the cores. Returns the number set."""
    cpus = available_cpus()
    n = default_threads() if threads is None else threads
    if threads is not None and not 1 <= threads <= cpus:
        raise ConfigError(f"--threads {threads}: this process may use {cpus} CPU(s) (affinity / cgroup quota); "
                          f"use 1 .. {cpus}, and fewer when several processes share the machine.")
    torch.set_num_threads(n)
    return n


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
