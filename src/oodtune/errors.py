"""One exception family for every mistake a user can make or fix.

Everything oodtune raises on purpose — bad data, a foreign checkpoint, an invalid option, a run folder that
holds another run, a device that is not there, a diverging run — is an :class:`OodtuneError`. The command
line reports exactly these (and missing/existing files) as ``Error: message`` without a traceback; anything
else is a bug and keeps its traceback. Each subclass also derives from the built-in exception a Python user
would expect (``ValueError`` for bad values, ``RuntimeError`` for a missing device, ``FloatingPointError`` for
non-finite numbers), so ``except ValueError`` keeps working.

Messages name the problem and the fix. Where the fix is a library argument they name it as a Python keyword
(``overwrite=True``); the command line rewrites those into its flags (``--overwrite``).
"""

from __future__ import annotations

__all__ = [
    "OodtuneError", "ConfigError", "DataError", "ModelError", "CheckpointError", "PriorError", "ScoreError",
    "ResumeMismatchError", "DeviceUnavailableError", "DivergenceError", "StorageError", "MergeError",
    "OutputInUseError",
]


class OodtuneError(Exception):
    """Base of every error oodtune raises for a problem the user can fix (see the module docstring)."""


class ConfigError(OodtuneError, ValueError):
    """An option, argument or configuration file has an invalid value or an unknown name."""


class DataError(OodtuneError, ValueError):
    """A dataset is missing, corrupt or malformed. The message names the file/problem and the fix."""


class ModelError(OodtuneError, ValueError):
    """An architecture cannot be built, or a model does not have the interface oodtune needs."""


class CheckpointError(OodtuneError, ValueError):
    """A checkpoint file is missing, unreadable or not an oodtune checkpoint."""


class PriorError(OodtuneError, ValueError):
    """An outlier-prior file or value is invalid; the message names the file/problem and the fix."""


class ScoreError(OodtuneError, ValueError):
    """Bad inputs to a score (shapes, non-finite values, missing ``fit``)."""


class ResumeMismatchError(OodtuneError, ValueError):
    """A run folder holds a run with other settings than the ones asked for; resuming it would mix two runs."""


class DeviceUnavailableError(OodtuneError, RuntimeError):
    """The requested device (e.g. ``cuda``) does not exist on this machine."""


class DivergenceError(OodtuneError, FloatingPointError):
    """A loss or a model output became NaN/inf (diverged training, or a diverged checkpoint). ``terms``: the loss
    terms by name when a loss raised it."""

    terms: dict[str, float] | None = None


class StorageError(OodtuneError, OSError):
    """An output or cache file cannot be written: no space left, a read-only folder, a file where a folder should be.
    Whatever was there before is left unchanged."""


class MergeError(OodtuneError, RuntimeError):
    """Two output folders of one benchmark hold different runs under one name; the message names both folders."""


class OutputInUseError(OodtuneError, RuntimeError):
    """Another process is writing into the same output folder (see :func:`oodtune.utils.lock.output_lock`)."""
