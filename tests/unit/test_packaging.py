"""A built wheel carries every module and every contract schema of the source tree, all beneath ``ctxflow``.

The development install is editable (the source tree is on the path), so nothing else would notice a
subpackage or a data file left out of the distribution: ``pip install`` of such a wheel gives a ``ctxflow``
whose ``bench`` command cannot import, or a codec without its schemas.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.support_project import LISTED, PACKAGES, ROOT, source_dir


def test_wheel_holds_every_module_and_schema(tmp_path: Path) -> None:
    # Built from a copy: setuptools leaves build/ in the tree it builds, and a stale build/ would ship files
    # the source no longer has.
    source = tmp_path / "source"
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    assert "BuildBackendWarning" not in build.stderr, build.stderr
    (wheel,) = tmp_path.glob("ctxflow-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    # Nothing but ctxflow at the top of site-packages: applications have packages named schemas or processors.
    assert {name.split("/")[0] for name in shipped if not name.startswith("ctxflow-")} == {"ctxflow"}
    expected = {
        ("" if package == "ctxflow" else "ctxflow/") + path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for pattern in ("*.py", "*.avsc")
        for path in (ROOT / package).rglob(pattern)
        if "__pycache__" not in path.parts
    }
    assert any(name.endswith(".avsc") for name in expected)
    assert "ctxflow/streams/bench/runner.py" in expected
    assert expected - shipped == set()


def test_every_package_folder_is_listed() -> None:
    """A remapped folder cannot be discovered: a subpackage missing from pyproject's list would not install."""
    folders = {
        path.parent for package in PACKAGES for path in (ROOT / package).rglob("__init__.py")
        if "__pycache__" not in path.parts
    }
    listed = {source_dir(package) for package in LISTED}
    assert folders - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert all(name == "ctxflow" or name.startswith("ctxflow.") for name in LISTED)
