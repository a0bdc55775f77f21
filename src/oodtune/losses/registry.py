"""The loss registry of every task (:data:`TASK_LOSSES`) and the help text of an option with each task's default."""

from __future__ import annotations

from .options import LOSS_OPTIONS, TaskLosses
from .pixel import SEGMENTATION_LOSSES
from .terms import CLASSIFICATION_LOSSES

__all__ = ["TASK_LOSSES", "option_help"]

#: task name -> its loss registry.
TASK_LOSSES: dict[str, TaskLosses] = {r.task: r for r in (CLASSIFICATION_LOSSES, SEGMENTATION_LOSSES)}


def option_help(name: str) -> str:
    """What loss option ``name`` means and its default for each task that takes it, e.g. ``[default: -23.0 for
    classification, -12.0 for segmentation]``, or ``[classification only; default: 0.5]``."""
    defaults = [(task, r.defaults[name]) for task, r in TASK_LOSSES.items() if name in r.defaults]
    if len(defaults) == 1:
        shown = f"{defaults[0][0]} only; default: {defaults[0][1]}"
    elif len({repr(v) for _, v in defaults}) == 1:
        shown = f"default: {defaults[0][1]}"
    else:
        shown = "default: " + ", ".join(f"{v} for {task}" for task, v in defaults)
    return f"{LOSS_OPTIONS[name].help} [{shown}]"
