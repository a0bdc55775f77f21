"""Training cost of candidate CPU base networks: seconds per SGD step (forward + backward + update, fp32, random
32x32 data), the archs timed in alternating rounds in one process, and what one epoch and a schedule cost in
CPU-hours at the measured rate (one thread = one core: run with OMP_NUM_THREADS=1 for CPU-hours).

    OMP_NUM_THREADS=1 python benchmarks/cpu_base_speed.py --archs airnet,wrn-16-1,wrn-16-4,wrn-28-2,wrn-40-2,resnet18

Prints the load average beside the numbers: on a shared machine the absolute times move with it, the ratios
between archs much less (they alternate within each round).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from oodtune.models import build_model


def step_seconds(net: torch.nn.Module, opt: torch.optim.Optimizer, batch: int, steps: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``steps`` training steps on random data (after one untimed step). CPU time
    of this process is what the step costs in CPU-hours, whatever else the machine runs."""
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    wall, cpu = [], []
    for i in range(steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()
        if i:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="airnet,wrn-16-1,wrn-16-4,wrn-28-2,wrn-40-2,resnet18")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per arch and round")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    archs = args.archs.split(",")
    nets = {a: build_model(a, 10).train() for a in archs}
    opts = {a: torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9, nesterov=True) for a, n in nets.items()}
    got: dict[str, list[tuple[float, float]]] = {a: [] for a in archs}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for a in archs if r % 2 == 0 else archs[::-1]:
            got[a].append(step_seconds(nets[a], opts[a], args.batch_size, args.steps))
    load_after = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch_size}, fp32; load "
          f"average (1/5/15 min) {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f} before, "
          f"{load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f} after")
    def cpu(a: str) -> float:
        return statistics.median(c for _, c in got[a])
    print(f"{'arch':10s} {'params':>8s} {'wall s/step':>11s} {'CPU s/step':>10s} {'vs ' + archs[0]:>10s} "
          f"{'CPU-h/epoch 50k':>16s} {'CPU-h/epoch LT':>15s}")
    for a in archs:
        params = sum(p.numel() for p in nets[a].parameters()) / 1e6
        per_image = cpu(a) / args.batch_size
        print(f"{a:10s} {params:7.2f}M {statistics.median(w for w, _ in got[a]):11.3f} {cpu(a):10.3f} "
              f"{cpu(a) / cpu(archs[0]):9.2f}x {50000 * per_image / 3600:16.3f} {12406 * per_image / 3600:15.3f}")


if __name__ == "__main__":
    main()
