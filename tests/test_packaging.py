"""Packaging: licence, type marker, one version, example configs that a plain `pip install` carries."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import oodtune
from helpers_cli import ok
from oodtune.benchmark import example_configs, find_config

pytestmark = pytest.mark.e2e  # real runs end to end: `pytest -m e2e` (scripts/test.sh and CI)

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_license_version_and_type_marker():
    assert PYPROJECT["project"]["license"] == {"text": "MIT"}
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
    assert "version" not in PYPROJECT["project"] and PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "oodtune.__version__"}
    assert (ROOT / "src" / "oodtune" / "py.typed").exists()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["oodtune"]


def test_example_configs_by_name():
    names = set(example_configs())
    assert {p.stem for p in (ROOT / "configs").glob("*.toml")} <= names
    assert find_config("quickstart-cpu").name == "quickstart-cpu.toml"
    assert find_config("configs/quickstart-cpu.toml").is_file()
    with pytest.raises(FileNotFoundError, match="oodtune examples"):
        find_config("no-such-config")
    listing = ok("examples").output
    assert "quickstart-cpu" in listing and str(find_config("quickstart-cpu")) in listing


def test_wheel_carries_configs_and_type_marker(tmp_path):
    src = tmp_path / "src-tree"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for name in ("src", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist")], capture_output=True, text=True, check=False)
    if res.returncode != 0 and "No module named pip" in res.stderr:
        pytest.skip("pip is not available in this environment")
    assert res.returncode == 0, res.stderr
    (wheel,) = (tmp_path / "dist").glob("oodtune-*.whl")
    assert wheel.name.startswith(f"oodtune-{oodtune.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "oodtune/py.typed" in names
    shipped = {Path(n).name for n in names if "/data/share/oodtune/configs/" in n}
    assert shipped == {p.name for p in (ROOT / "configs").glob("*.toml")}
