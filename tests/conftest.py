"""Fixtures that pytest injects by name into every test module, and the ``slow`` marker: slow tests are skipped
unless a marker expression is given (``pytest -m slow`` runs them; ``scripts/test.sh`` runs both sets)."""

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="slow probe: run with `pytest -m slow` (scripts/test.sh and CI do)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
