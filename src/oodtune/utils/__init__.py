"""Plumbing every layer may use: atomic writes (:mod:`.atomic`), one writer per output folder (:mod:`.lock`),
the process's allocation policy (:mod:`.memory`), progress reports (:mod:`.progress`), and
device/precision/compile/data-parallel settings (:mod:`.runtime`)."""

from . import atomic, lock, memory, progress, runtime
from .atomic import *  # noqa: F403
from .lock import *  # noqa: F403
from .memory import *  # noqa: F403
from .progress import *  # noqa: F403
from .runtime import *  # noqa: F403

__all__ = [*atomic.__all__, *lock.__all__, *memory.__all__, *progress.__all__, *runtime.__all__]
