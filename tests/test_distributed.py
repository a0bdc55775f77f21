"""Data-parallel training on CPU: 2 gloo processes through ``Trainer`` (the torchrun code path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers_training import assert_states_equal, ddp_worker, free_port
from oodtune.models.checkpoint import read_checkpoint
from oodtune.training.trainer import FINAL, HISTORY, LAST
from oodtune.utils.runtime import DistInfo

WORLD = 2

pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available"),
              pytest.mark.e2e]  # training processes: `pytest -m e2e` (scripts/test.sh and CI)


def _run_ddp(tmp_path: Path, batch_size: int) -> list[dict[str, Any]]:
    """Spawn WORLD ranks of :func:`helpers_training.ddp_worker`; returns each rank's report."""
    mp.spawn(ddp_worker, args=(WORLD, free_port(), str(tmp_path), batch_size), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _assert_ranks_partition_global_batches(reports: list[dict[str, Any]], batch_size: int) -> None:
    steps = [r["batches"] for r in reports]
    assert len({len(s) for s in steps}) == 1 and len(steps[0]) > 0
    for step, slices in enumerate(zip(*steps, strict=False)):
        sets = [set(s) for s in slices]
        assert not sets[0] & sets[1], f"step {step}: ranks overlap on {sorted(sets[0] & sets[1])[:5]}"
        assert len(sets[0]) + len(sets[1]) == batch_size
        assert abs(len(sets[0]) - len(sets[1])) <= 1


@pytest.mark.parametrize("batch_size", [32])
def test_two_cpu_ranks(tmp_path: Path, batch_size: int) -> None:
    reports = _run_ddp(tmp_path, batch_size)
    # (b) every global batch is split into disjoint per-rank halves, in both epochs
    _assert_ranks_partition_global_batches(reports, batch_size)
    # (a) identical parameters on both ranks, although they started from different inits. BN running
    # statistics legitimately differ: DDP broadcasts rank 0's buffers *before* each forward, then every rank
    # updates them with its own half-batch (plain BatchNorm, not SyncBatchNorm); rank 0's are the ones saved.
    params = [k for k in reports[0]["state"] if "running_" not in k and "num_batches_tracked" not in k]
    assert_states_equal(*({k: r["state"][k] for k in params} for r in reports))
    # (c) only rank 0 wrote checkpoints: last.pt after each epoch, then model.pt (and the per-epoch history.csv)
    run = tmp_path / "run"
    assert [Path(p).name for p in reports[0]["saves"]] == [LAST, LAST, FINAL]
    assert reports[1]["saves"] == []
    assert sorted(p.name for p in run.iterdir()) == [HISTORY, FINAL]
    assert_states_equal(read_checkpoint(run / FINAL)["model"],
                        {k.removeprefix("model."): v for k, v in reports[0]["state"].items()
                         if k.startswith("model.")})


def test_global_batch_must_split_evenly_over_ranks() -> None:
    DistInfo(rank=0, world=2).check_batch(32)
    with pytest.raises(ValueError, match="multiple of the 2 data-parallel processes"):
        DistInfo(rank=1, world=2).check_batch(33)
    with pytest.raises(ValueError, match="--outlier-batch-size 65"):
        DistInfo(rank=0, world=2).check_batch(65, "--outlier-batch-size")
