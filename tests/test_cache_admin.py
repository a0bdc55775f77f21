"""`oodtune cache`: entries grouped by kind and name with their disk usage, and removal by kind and age."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from helpers_cli import fails, ok
from oodtune.data.cache_admin import cache_entries, remove_entries
from oodtune.errors import ConfigError

DAY = 86400


def _file(path: Path, size: int, age_days: float = 0.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    stamp = time.time() - age_days * DAY
    os.utime(path, (stamp, stamp))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    _file(root / "images" / "cifar10-test-32px-v2-aa.images.npy", 30000, age_days=40)
    _file(root / "images" / "cifar10-test-32px-v2-aa.npz", 1000, age_days=40)
    _file(root / "images" / "dtd-test-32px-v2-bb.npz", 2000, age_days=1)
    _file(root / "trunk" / "k1" / "features.npy", 50000, age_days=30)
    _file(root / "trunk" / "k1" / "filled.npy", 100, age_days=2)  # used two days ago: the entry is 2 days old
    _file(root / "trunk" / "k2" / "features.npy", 50000, age_days=20)
    os.utime(root / "trunk" / "k1", (time.time() - 30 * DAY,) * 2)
    os.utime(root / "trunk" / "k2", (time.time() - 20 * DAY,) * 2)
    monkeypatch.setenv("OODTUNE_CACHE", str(root))
    return root


def test_entries_group_the_files_of_one_set_and_measure_what_removal_frees(cache: Path) -> None:
    entries = {(e.kind, e.name): e for e in cache_entries()}
    assert set(entries) == {("images", "cifar10-test-32px-v2-aa"), ("images", "dtd-test-32px-v2-bb"),
                            ("trunk", "k1"), ("trunk", "k2")}
    pair = entries["images", "cifar10-test-32px-v2-aa"]
    assert len(pair.paths) == 2 and pair.size >= 31000
    assert entries["trunk", "k1"].size >= 50100
    assert entries["trunk", "k1"].age_days() == pytest.approx(2, abs=0.01)  # its newest file
    assert entries["trunk", "k2"].age_days() == pytest.approx(20, abs=0.01)
    assert cache_entries(cache / "absent") == []


def test_remove_by_kind_and_age(cache: Path) -> None:
    gone = remove_entries(["trunk", "images"], older_than_days=10)
    assert sorted(e.name for e in gone) == ["cifar10-test-32px-v2-aa", "k2"]
    assert not (cache / "trunk" / "k2").exists() and (cache / "trunk" / "k1" / "features.npy").exists()
    assert not list((cache / "images").glob("cifar10-*")) and (cache / "images" / "dtd-test-32px-v2-bb.npz").exists()
    with pytest.raises(ConfigError, match="holds no 'segmentation' entries; its kinds are images, trunk, or all"):
        remove_entries(["segmentation"])
    assert len(remove_entries(["all"])) == 2 and cache_entries() == []


def test_the_command_lists_and_clears(cache: Path) -> None:
    res = ok("cache", "-v")
    assert f"{cache}: " in res.output and "4 entries" in res.output
    assert "trunk" in res.output and "k2" in res.output and "written 20 days ago" in res.output
    fails("cache", "--older-than", "3", match="give --clear KIND")
    fails("cache", "--clear", "nope", match="its kinds are images, trunk, or all")
    res = ok("cache", "--clear", "trunk", "--older-than", "10")
    assert "removed 1 entry" in res.output
    res = ok("cache", "--clear", "all")
    assert "removed 3 entries" in res.output
    assert "empty" in ok("cache").output
