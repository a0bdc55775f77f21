"""The paired bf16 - fp32 table of benchmarks/precision_parity.sh: per seed and metric both values and their
difference, then the mean difference with a 95% t confidence interval over the seeds.

    python benchmarks/parity_table.py OUT [SEEDS...]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

#: t quantiles (two-sided 95%) by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}


def metrics(path: Path) -> dict[str, float]:
    """ID metric and the energy score's AUROC / FPR95 per OOD set of one ``oodtune evaluate --out`` file."""
    data = json.loads(path.read_text())
    out = {k: float(data[k]) for k in ("accuracy", "miou") if k in data}
    for row in data["rows"]:
        for key in ("auroc", "fpr95"):
            out[f"{row['dataset']} {key}"] = float(row[key])
    return out


def main(out: Path, seeds: list[str]) -> None:
    tables: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for task in ("cls", "seg"):  # the seeds whose two runs are both evaluated
        done = [s for s in seeds if all((out / f"{task}-{p}-s{s}.json").exists() for p in ("fp32", "bf16"))]
        if done:
            tables[task] = {s: {p: metrics(out / f"{task}-{p}-s{s}.json") for p in ("fp32", "bf16")} for s in done}
    summary: dict[str, Any] = {}
    print("| task | metric | per seed: fp32 / bf16 | bf16 - fp32, mean [95% CI] |")
    print("| --- | --- | --- | ---: |")
    for task, by_seed in tables.items():
        seeds = list(by_seed)
        for key in by_seed[seeds[0]]["fp32"]:
            diffs = [by_seed[s]["bf16"][key] - by_seed[s]["fp32"][key] for s in seeds]
            mean = statistics.mean(diffs)
            half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0
            summary[f"{task} {key}"] = {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half,
                                        "per_seed": diffs}
            cells = "; ".join(f"s{s} {by_seed[s]['fp32'][key]:.2f} / {by_seed[s]['bf16'][key]:.2f}" for s in seeds)
            print(f"| {task} | {key} | {cells} | {mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] |")
    (out / "precision_parity.json").write_text(json.dumps({"values": tables, "bf16_minus_fp32": summary},
                                                          indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or ["0", "1", "2"])  # seeds missing a run are left out
