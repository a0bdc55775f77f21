"""Small helpers shared by the benchmark scripts: device sync, timing, environment facts, table/JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from oodtune.utils.runtime import resolve_device

# Benchmarks print their own tables; rich progress bars would only add noise (and a little overhead).
os.environ.setdefault("OODTUNE_PROGRESS", "0")


def sync(device: torch.device) -> None:
    """Wait for all queued work on ``device`` (a no-op on CPU), so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """``time.perf_counter()`` after synchronising ``device``."""
    sync(device)
    return time.perf_counter()


def environment(device: torch.device) -> dict[str, Any]:
    """Facts that a throughput number depends on."""
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table on stdout (copy-pasteable into markdown-ish reports)."""
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths, strict=False))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def save_json(path: str | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON to ``path`` (creating folders) when a path was given."""
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by ``doc`` (a module docstring) with the shared ``--device`` and ``--json``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    return ap


def parse_with_device(ap: argparse.ArgumentParser, argv: list[str] | None, num_images: tuple[int, int]
                      ) -> argparse.Namespace:
    """Parse ``argv``; ``--device`` resolved to a name, ``--num-images`` (when not given) to ``num_images`` =
    (CUDA default, CPU default)."""
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    args.device = str(device)
    if args.num_images is None:
        args.num_images = num_images[0] if device.type == "cuda" else num_images[1]
    return args
