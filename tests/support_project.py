"""The project's source tree as pyproject.toml describes it: where it is and which packages it ships."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
#: Installed package name -> the repository folder it is built from (``ctxflow.schemas`` -> ``schemas``).
PACKAGE_DIRS: dict[str, str] = dict(_SETUPTOOLS["package-dir"])
#: Every package the wheel lists, by installed name.
LISTED: tuple[str, ...] = tuple(_SETUPTOOLS["packages"])
#: Top-level repository folders the wheel is built from.
PACKAGES: tuple[str, ...] = tuple(sorted(PACKAGE_DIRS.values()))


def source_dir(package: str) -> Path:
    """The folder an installed package name is built from."""
    parts = package.split(".")
    for depth in range(len(parts), 0, -1):
        if (prefix := ".".join(parts[:depth])) in PACKAGE_DIRS:
            return ROOT / PACKAGE_DIRS[prefix] / Path(*parts[depth:]) if parts[depth:] else ROOT / PACKAGE_DIRS[prefix]
    raise KeyError(package)
