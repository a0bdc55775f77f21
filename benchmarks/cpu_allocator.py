"""Seconds per segmentation fine-tuning step with glibc's default allocation policy and with freed memory kept in
the process (:func:`oodtune.utils.memory.keep_freed_memory`, what the command line applies), and their ratio.

Each policy runs ``segmentation_schedule.py`` in its own process (a policy is process-wide), with the same
configurations, steps and input size. Each configuration's last loss and the sum of its trained parameters after
the last step are compared between the policies ("identical": equal to the last bit).

    OMP_NUM_THREADS=1 python benchmarks/cpu_allocator.py --json results/speed/cpu_allocator.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import print_table, save_json
from segmentation_schedule import CONFIGS

HERE = Path(__file__).resolve().parent
POLICIES = ("default", "keep")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=["head, object", "decoder, object"],
                    choices=[c[0] for c in CONFIGS], help="configurations of segmentation_schedule.py to time")
    ap.add_argument("--input-size", default="480x360")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for policy in POLICIES:
            out = Path(tmp) / f"{policy}.json"
            subprocess.run([sys.executable, str(HERE / "segmentation_schedule.py"), "--malloc", policy,
                            "--input-size", args.input_size, "--steps", str(args.steps), "--warmup",
                            str(args.warmup), "--json", str(out), "--only", *args.only], check=True,
                           stdout=subprocess.DEVNULL)
            results[policy] = json.loads(out.read_text())
    per_step: dict[str, dict[str, float]] = {p: results[p]["seconds_per_step"] for p in POLICIES}
    identical = {label: all(results["default"][k][label] == results["keep"][k][label]
                            for k in ("last_loss", "parameter_sum")) for label in per_step["keep"]}
    rows = [[label, per_step["default"][label], per_step["keep"][label],
             per_step["default"][label] / per_step["keep"][label], "yes" if identical[label] else "NO"]
            for label in per_step["keep"]]
    load = " / ".join(f"{results[p]['loadavg'][0]:.1f}" for p in POLICIES)
    print_table(f"segmentation step, {args.input_size}, batch 8: glibc's default policy vs freed memory kept "
                f"(1-minute load at the end of each: {load})",
                ["configuration", "s/step default", "s/step kept", "speed-up", "identical"], rows)
    save_json(args.json, {"args": vars(args), "environment": results["keep"]["environment"],
                          "loadavg_after": {p: results[p]["loadavg"] for p in POLICIES},
                          "seconds_per_step": per_step, "identical": identical,
                          "last_loss": {p: results[p]["last_loss"] for p in POLICIES},
                          "speedup": {label: d / per_step["keep"][label] for label, d in per_step["default"].items()}})


if __name__ == "__main__":
    main()
