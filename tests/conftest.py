"""Fixtures that pytest injects by name into every test module. The default run leaves out the ``e2e`` and ``slow``
tests (``addopts`` in pyproject.toml); ``pytest -m e2e`` / ``pytest -m slow`` run them, ``scripts/test.sh`` all three
sets."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Isolated root + cache (``OODTUNE_CACHE``), progress bars off."""
    root, cache = tmp_path / "root", tmp_path / "cache"
    root.mkdir()
    monkeypatch.setenv("OODTUNE_CACHE", str(cache))
    monkeypatch.setenv("OODTUNE_PROGRESS", "0")
    monkeypatch.delenv("OODTUNE_DATA", raising=False)
    return {"root": root, "cache": cache, "tmp": tmp_path}
