"""The example benchmark configs that ship with oodtune, found wherever it is installed.

A wheel installs them as ``PREFIX/share/oodtune/configs/*.toml`` (``[tool.setuptools.data-files]``; the user
scheme for ``pip install --user``); a source checkout has them in ``configs/``. ``oodtune examples`` lists them and
``oodtune benchmark NAME`` runs one by name, so a plain ``pip install oodtune`` is enough to start.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

__all__ = ["example_configs", "find_config"]


def _config_dirs() -> list[Path]:
    schemes = dict.fromkeys([sysconfig.get_default_scheme(), f"{os.name}_user"])
    installed = [Path(sysconfig.get_path("data", s)) / "share" / "oodtune" / "configs" for s in schemes
                 if s in sysconfig.get_scheme_names()]
    return [*installed, Path(__file__).resolve().parents[3] / "configs"]  # src/oodtune/benchmark -> checkout root


def example_configs() -> dict[str, Path]:
    """Example name (file name without ``.toml``) -> path; the first folder that has a name wins."""
    found: dict[str, Path] = {}
    for folder in _config_dirs():
        if folder.is_dir():
            for path in sorted(folder.glob("*.toml")):
                found.setdefault(path.stem, path)
    return found


def find_config(spec: str | os.PathLike) -> Path:
    """``spec`` when it is an existing file, else the example it names (``quickstart-cpu``,
    ``configs/quickstart-cpu.toml``); FileNotFoundError listing the examples otherwise."""
    path = Path(spec)
    if path.is_file():
        return path
    examples = example_configs()
    name = path.name.removesuffix(".toml")
    if name in examples:
        return examples[name]
    raise FileNotFoundError(f"{spec}: no such config file, and no example of that name (examples: "
                            f"{', '.join(examples) or 'none installed'}; `oodtune examples` lists them).")
