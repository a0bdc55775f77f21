"""The closed schema of a saved detector file (``oodtune calibrate --out``): every field, its type and range.

A detector file is JSON a person may open, edit or damage. :func:`validate_record` checks the whole record
before anything is built from it: no unknown field, no missing one, every value of its type and in its range
(a threshold is a finite number: NaN would silently disable OOD flagging, since ``score < NaN`` is never true).
An image classifier's detector and a segmenter's (``task: "segmentation"``: a pixel threshold, the frame size
and the 16-bit scaling of anomaly maps) each have their own closed set of fields.
The first problem found is one :class:`~oodtune.errors.ConfigError` naming the file and the field (dotted:
``calibration.threshold``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError

__all__ = ["DETECTOR_FORMAT", "DETECTOR_VERSION", "check_state_value", "validate_record"]

DETECTOR_FORMAT = "oodtune-detector"
DETECTOR_VERSION = 1

Check = Callable[[Any], str | None]  # None: valid; else what is wrong


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
            high_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if not _is_number(v) or not math.isfinite(v):
            return f"must be a finite number, got {v!r}"
        if v < low or v > high or (low_open and v == low) or (high_open and v == high):
            return (f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}, "
                    f"got {v!r}")
        return None
    return check


def _integer(low: int) -> Check:
    return lambda v: None if _is_int(v) and v >= low else f"must be an integer >= {low}, got {v!r}"


def _text(optional: bool = False) -> Check:
    return lambda v: None if isinstance(v, str) or (optional and v is None) else \
        f"must be a string{' or null' if optional else ''}, got {v!r}"


def _sidecar(v: Any) -> str | None:
    """The statistics file: null, or a bare file name beside the detector (never a path elsewhere)."""
    if v is None:
        return None
    if not isinstance(v, str) or not v or v in (".", "..") or "/" in v or "\\" in v:
        return f"must be null or the bare name of the statistics file beside the detector, got {v!r}"
    return None


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def _sha256(v: Any) -> str | None:
    ok = isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)
    return None if ok else f"must be 64 lowercase hex digits (a SHA-256), got {v!r}"


def _triple(positive: bool) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, list) or len(v) != 3 or not all(_is_number(x) and math.isfinite(x) for x in v):
            return f"must be a list of 3 finite numbers (one per RGB channel), got {v!r}"
        return "must be > 0 per channel" if positive and min(v) <= 0 else None
    return check


def _classes(v: Any) -> str | None:
    ok = isinstance(v, list) and v and all(isinstance(c, str) for c in v)
    return None if ok else f"must be a non-empty list of class names, got {v!r}"


def _state(v: Any) -> str | None:
    if not isinstance(v, dict):
        return f"must be an object of score attributes, got {v!r}"
    bad = [k for k, x in v.items() if not (x is None or isinstance(x, (bool, int, float, str)))]
    return f"holds non-scalar value(s) at {bad}" if bad else None


CHECK_KEYS: dict[str, Check] = {"data": _text(), "n": _integer(1), "acceptance": _number(0, 1),
                                "std": _number(0), "z": _number()}
CALIBRATION_KEYS: dict[str, Check] = {
    "threshold": _number(), "tpr": _number(0, 1, low_open=True, high_open=True), "achieved": _number(0, 1),
    "n": _integer(1), "data": _text(), "held_out": _boolean, "expected": _number(0, 1), "expected_std": _number(0),
}
def _one_of(*values: str) -> Check:
    return lambda v: None if v in values else f"must be one of {', '.join(map(repr, values))}, got {v!r}"


def _size(v: Any) -> str | None:
    ok = isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 1 for x in v)
    return None if ok else f"must be [width, height] in pixels (two integers >= 1), got {v!r}"


def _scale(v: Any) -> str | None:
    return None if v is None else _number(0, low_open=True)(v)


COMMON_KEYS: dict[str, Check] = {
    "format": lambda v: None if v == DETECTOR_FORMAT else f"must be {DETECTOR_FORMAT!r}, got {v!r}",
    "version": _integer(1), "oodtune_version": _text(), "checkpoint": _text(optional=True),
    "weights_sha256": _sha256, "classes": _classes, "mean": _triple(False), "std": _triple(True),
    "score": _text(), "rule": _text(),
}
RECORD_KEYS: dict[str, Check] = {  # an image classifier's detector (``task`` is absent in older files)
    **COMMON_KEYS, "resolution": _integer(1), "head": _text(optional=True), "score_state": _state,
    "statistics": _sidecar, "fit_source": _text(optional=True),
}
ANOMALY_PNG_KEYS: dict[str, Check] = {"zero": _integer(0), "levels_per_unit": _scale, "formula": _text()}
PIXEL_RECORD_KEYS: dict[str, Check] = {  # a segmenter's detector: a pixel threshold and 16-bit map scaling
    **COMMON_KEYS, "task": _one_of("segmentation"), "channel_order": _one_of("rgb", "bgr"), "input_size": _size,
    "blur": _boolean, "anomaly_png": lambda v: None if isinstance(v, dict) else f"must be an object, got {v!r}",
}
PIXEL_CALIBRATION_KEYS: dict[str, Check] = {
    **CALIBRATION_KEYS, "frames": _integer(1), "blur": _boolean, "map_scale": _number(0, low_open=True),
    "unit": _one_of("pixels"),
}
PIXEL_CHECK_KEYS: dict[str, Check] = {**CHECK_KEYS, "frames": _integer(1)}


def _fail(path: os.PathLike | str, field: str, problem: str) -> ConfigError:
    return ConfigError(f"{path}: field {field!r} {problem}. The detector file is damaged or was edited by hand: "
                       "restore it, or calibrate again (`oodtune calibrate`).")


def _check_object(path: os.PathLike | str, obj: Any, keys: dict[str, Check], where: str,
                  optional: dict[str, Check | None] | None = None) -> None:
    """``obj`` must hold every field of ``keys``, each passing its check, and may hold those of ``optional``
    (checked when present; ``None``: checked by the caller)."""
    optional = optional or {}
    prefix = f"{where}." if where else ""
    if not isinstance(obj, dict):
        raise _fail(path, where or "(top level)", f"must be an object, got {type(obj).__name__} {obj!r}")
    unknown = sorted(set(obj) - set(keys) - set(optional))
    if unknown:
        raise _fail(path, prefix + unknown[0], f"is not a field of a detector file (known: {', '.join(keys)})")
    for key, check in keys.items():
        if key not in obj:
            raise _fail(path, prefix + key, "is missing")
        problem = check(obj[key])
        if problem:
            raise _fail(path, prefix + key, problem)
    for key, maybe in optional.items():
        problem = maybe(obj[key]) if maybe is not None and key in obj else None
        if problem:
            raise _fail(path, prefix + key, problem)


def validate_record(record: Any, path: os.PathLike | str) -> dict[str, Any]:
    """``record`` (parsed JSON of ``path``) when it is a complete, well-typed detector record; else a
    :class:`ConfigError` naming the file and the first bad field (see the module docstring)."""
    if not isinstance(record, dict) or record.get("format") != DETECTOR_FORMAT:
        raise ConfigError(f"{path} is not an oodtune detector file (written by `oodtune calibrate`).")
    version = record.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > DETECTOR_VERSION:
        raise ConfigError(f"{path} has detector format version {version}, newer than this oodtune understands "
                          f"({DETECTOR_VERSION}); upgrade oodtune.")
    pixels = record.get("task", "classification") != "classification"
    if pixels:
        _check_object(path, record, PIXEL_RECORD_KEYS, "", optional={"calibration": None})
        _check_object(path, record["anomaly_png"], ANOMALY_PNG_KEYS, "anomaly_png")
    else:
        # ``guarantee``: the threshold choice and the calibration scores, checked field by field by
        # :meth:`oodtune.deploy.guarantee.Guarantee.from_dict` (absent in files of older versions)
        _check_object(path, record, RECORD_KEYS, "", optional=dict.fromkeys(("calibration", "task", "guarantee")))
    calibration = record.get("calibration")
    if calibration is not None:
        _check_object(path, calibration, PIXEL_CALIBRATION_KEYS if pixels else CALIBRATION_KEYS, "calibration",
                      optional={"check": None, "precision": _one_of("fp32", "bf16")})  # precision: newer files
        check = calibration.get("check")
        if check is not None:
            _check_object(path, check, PIXEL_CHECK_KEYS if pixels else CHECK_KEYS, "calibration.check")
    return record


def check_state_value(path: os.PathLike | str, field: str, current: Any, value: Any) -> None:
    """A saved score attribute ``value`` must have the kind of the attribute it replaces (``current``): a number
    for a number (finite), a string for a string, a flag for a flag."""
    if _is_number(current):
        problem = _number()(value)
    elif isinstance(current, bool):
        problem = _boolean(value)
    elif isinstance(current, str):
        problem = _text()(value)
    else:
        problem = None
    if problem:
        raise _fail(path, f"score_state.{field}", problem)
