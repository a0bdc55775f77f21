"""The loss options, defined once: what each option means and which values it takes (:data:`LOSS_OPTIONS`), and
per task the methods and the default of every option they take (:class:`TaskLosses`; the classification registry
is :data:`oodtune.losses.terms.CLASSIFICATION_LOSSES`, the segmentation one
:data:`oodtune.losses.pixel.SEGMENTATION_LOSSES`, both in :data:`oodtune.losses.registry.TASK_LOSSES`).

The command line's ``finetune`` options and their help, and the benchmark TOML schema, are generated from these
tables, so a default shown to a user is the default of the checkpoint's task (``m_in``: -23 for a classifier, as in
the Energy paper; -12 for a segmenter, as in PEBAL).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["LOSS_OPTIONS", "LossOption", "TaskLosses"]


@dataclass(frozen=True)
class LossOption:
    """One loss option: its name (``m_in``: the keyword of the loss builders, the TOML key; ``--m-in`` on the command
    line), the type of its values (``kind``), its allowed values (``choices``, for strings), whether ``"auto"`` is
    accepted (a margin proposed from the pretrained model's energies) and what it means."""

    name: str
    help: str
    kind: type = float
    choices: tuple[str, ...] = ()
    auto: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def toml_types(self) -> tuple[type, ...]:
        """The TOML value types a benchmark row may give (a string for ``"auto"`` where it is accepted)."""
        return (self.kind, str) if self.auto and self.kind is not str else (self.kind,)


#: Every loss option of every task, in the order the command line lists them.
LOSS_OPTIONS: dict[str, LossOption] = {o.name: o for o in (
    LossOption("m_in", "In-distribution energy margin; auto = proposed from this model's energies as "
                       "`oodtune propose-margins` does (recorded in the checkpoint).", auto=True),
    LossOption("m_out", "Outlier energy margin; auto as for --m-in.", auto=True),
    LossOption("alpha", "Balanced Energy margin scale α."),
    LossOption("energy_weight", "Weight of the energy terms."),
    LossOption("oe_weight", "OE weight λ."),
    LossOption("sparsity_weight", "Sparsity λ; the public code used 0.02."),
    LossOption("balanced_reduction", "How Balanced Energy averages the outlier hinge: normalized (Σ h²·Z / Σ Z, the "
                                     "reference code) or mean (mean h²·Z, the slides).", str, ("normalized", "mean")),
    LossOption("detach_z", "Balanced Energy: stop the gradient through the prior weights Z.", bool),
    LossOption("smooth_normalization", "PEBAL's energy smoothness: reference (its sum rescaled to the reference "
                                       "batch, 8 x 900 x 900 pixels, so that its weight relative to the averaged "
                                       "terms is the reference's at any frame size) or sum (the plain sum over this "
                                       "batch's pixels: weaker at smaller frames).", str, ("reference", "sum")),
)}


@dataclass(frozen=True)
class TaskLosses:
    """One task's loss registry: its method names (``methods_help``: how to name them, for help texts) and the
    default of every loss option its methods take (an option it does not list does not apply to the task)."""

    task: str
    methods: tuple[str, ...]
    defaults: Mapping[str, Any]
    methods_help: str

    def __post_init__(self) -> None:
        unknown = sorted(set(self.defaults) - set(LOSS_OPTIONS))
        if unknown:
            raise ValueError(f"{self.task} loss options {unknown} are not in LOSS_OPTIONS")
