"""A benchmark folder never mixes settings: a finished training run is used only if it was made with exactly the
settings the configuration asks for now.

Trained checkpoints (the pretrained model under ``OUT/pretrain``, each fine-tuning run under ``OUT/runs``)
record how they were made (:class:`~oodtune.models.RunMeta`: architecture, data, training configuration,
method, loss options, prior, the SHA-256 of the checkpoint a fine-tuning started from). Before any work, every
finished run the configuration names is compared with what the configuration would train; a difference is
an error naming the run, each differing setting (recorded vs asked) and the fix — retraining silently would
waste the finished run, and tabulating it would report numbers for settings nobody asked for. Evaluations and
other derived values need no such check: they are cached under keys made of their inputs
(:mod:`.store`), so a changed input simply computes a new value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..models import RunMeta
from ..training.config import TrainConfig, recorded_config

__all__ = ["PERFORMANCE_ONLY", "check_finetuned", "check_pretrained", "config_differences"]

#: Training settings that change speed, not what is learned: not compared.
PERFORMANCE_ONLY = frozenset({"device", "compile", "compile_scope", "channels_last"})


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return bool(a == b)


def config_differences(recorded: Mapping[str, Any] | None, asked: TrainConfig) -> list[str]:
    """``"key: recorded -> asked"`` for every result-affecting training setting that differs."""
    if recorded is None:
        return ["training configuration: not recorded in the checkpoint"]
    want, got = asdict(asked), recorded_config(dict(recorded))
    return [f"{k}: {got.get(k)!r} -> {want[k]!r}" for k in sorted(want)
            if k not in PERFORMANCE_ONLY and not _same(got.get(k), want[k])]


def _refuse(path: Path, diffs: list[str], fix: str) -> ConfigError:
    return ConfigError(f"{path} was trained with other settings than the benchmark config asks for "
                       f"(recorded -> asked): {'; '.join(diffs)}. Nothing was run: mixing runs of different "
                       f"settings in one table is refused. {fix}")


def check_pretrained(path: Path, meta: RunMeta, *, arch: str, dataset: str, num_train: int | None,
                     imbalance_ratio: float | None, val_fraction: float | None, config: TrainConfig) -> None:
    """The benchmark's own pretrained checkpoint must match ``[benchmark]`` / ``[pretrain]``."""
    diffs = [f"{name}: {got!r} -> {want!r}" for name, got, want in (
        ("arch", meta.arch, arch), ("id_dataset", meta.dataset, dataset), ("num_train", meta.num_train, num_train),
        ("imbalance_ratio", meta.imbalance_ratio, imbalance_ratio), ("val_fraction", meta.val_fraction, val_fraction))
        if not _same(got, want)]
    diffs += config_differences(meta.train_config, config)
    if diffs:
        raise _refuse(path, diffs, f"Restore those settings, or start over in a new --out (or delete "
                                   f"{path.parent} and every run fine-tuned from it).")


def check_finetuned(path: Path, meta: RunMeta, *, method: str, scratch: bool, outliers: str,
                    loss_options: Mapping[str, Any], prior: Mapping[str, Any] | None, config: TrainConfig,
                    pretrained: Path, pretrained_sha256: str) -> None:
    """A finished fine-tuning run must match its ``[[methods]]`` row, ``[finetune]`` and the pretrained
    checkpoint it is supposed to start from (by content: the SHA-256 recorded at fine-tuning time; checkpoints
    written before that was recorded are matched by path)."""
    diffs = []
    if meta.method != method:
        diffs.append(f"method: {meta.method!r} -> {method!r}")
    stage = "scratch" if scratch else "finetune"
    if meta.stage != stage:
        diffs.append(f"stage: {meta.stage!r} -> {stage!r}")
    if meta.outliers not in (None, outliers):
        diffs.append(f"outliers: {meta.outliers!r} -> {outliers!r}")
    if dict(meta.loss_options) != dict(loss_options):
        diffs.append(f"loss options: {dict(meta.loss_options)} -> {dict(loss_options)}")
    if prior is not None and meta.prior is not None:
        got = (list(meta.prior.get("counts", [])), float(meta.prior.get("gamma", 1.0)))
        if got != (list(prior["counts"]), float(prior["gamma"])):
            diffs.append(f"outlier prior (counts, γ): {got} -> {(list(prior['counts']), float(prior['gamma']))}")
    elif (prior is None) != (meta.prior is None):
        state = {True: "none", False: "set"}
        diffs.append(f"outlier prior: {state[meta.prior is None]} -> {state[prior is None]}")
    if meta.pretrained_sha256 is not None:
        if meta.pretrained_sha256 != pretrained_sha256:
            diffs.append(f"pretrained checkpoint (SHA-256): {meta.pretrained_sha256[:12]}… -> "
                         f"{pretrained_sha256[:12]}… ({pretrained})")
    elif meta.pretrained != str(pretrained):
        diffs.append(f"pretrained checkpoint: {meta.pretrained!r} -> {str(pretrained)!r}")
    diffs += config_differences(meta.train_config, config)
    if diffs:
        raise _refuse(path, diffs, f"Restore those settings, or delete {path.parent} to train this run again "
                                   "with the new ones (or use a new --out).")
