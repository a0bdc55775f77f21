"""Results tables as Markdown and JSON files (written atomically, never silently overwritten)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic

METRIC_LABELS = {"auroc": "AUROC↑", "aupr_in": "AUPR-In↑", "aupr_out": "AUPR-Out↑", "fpr95": "FPR95↓"}


def fmt(value: Any, digits: int = 2) -> str:
    """Numbers with ``digits`` decimals; (mean, std) pairs as 'mean ± std'; anything else as str."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` restricted to ``columns``."""
    headers = list(headers or [METRIC_LABELS.get(c, c) for c in columns])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_json(path: str | os.PathLike, data: Any, *, overwrite: bool = False) -> Path:
    """Pretty JSON, atomically; refuses to replace an existing file unless ``overwrite``."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n", overwrite=overwrite)
