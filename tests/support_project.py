"""The project's source tree as pyproject.toml describes it: where it is and which packages it ships."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_FIND = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
#: Top-level packages the wheel is built from ("streams*" in the find patterns: streams and below).
PACKAGES: tuple[str, ...] = tuple(sorted(pattern.removesuffix("*") for pattern in _FIND["include"]))
