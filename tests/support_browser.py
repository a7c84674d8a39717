"""Headless Chromium for tests that look at a page as a person would: through a screenshot.

Chromium is Debian's package, installed on first use (the machines run as root and reach Debian's mirror); a
failed install fails the test with apt-get's own words, never a skip.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
_APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
#: Another engineer's apt-get may hold the dpkg lock: wait for it instead of failing.
_LOCK_WAIT = ["-o", "DPkg::Lock::Timeout=600"]
log = logging.getLogger(__name__)


def chromium() -> Path:
    """The Chromium binary, installing Debian's ``chromium`` package (no recommends) when it is missing."""
    if CHROMIUM.exists():
        return CHROMIUM
    began = time.monotonic()
    for command in (["apt-get", *_LOCK_WAIT, "update"],
                    ["apt-get", *_LOCK_WAIT, "install", "-y", "--no-install-recommends", "chromium"]):
        done = subprocess.run(command, env=_APT_ENV, capture_output=True, text=True, timeout=1200, check=False)
        if done.returncode != 0:
            pytest.fail(f"headless Chromium is needed to look at the HTML report and `{' '.join(command)}` failed "
                        f"(exit {done.returncode}); install Debian's chromium package by hand:\n{done.stderr[-2000:]}")
    log.warning("installed chromium in %.0f s", time.monotonic() - began)
    return CHROMIUM


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 3000) -> Path:
    """A PNG of ``page`` as headless Chromium draws it in a ``width`` x ``height`` window, with every network
    request sent to a closed port: whatever the page needs from outside is missing from the picture."""
    done = subprocess.run(
        [str(chromium()), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--no-first-run",
         "--disable-background-networking", f"--window-size={width},{height}", f"--screenshot={png}",
         page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0 and png.is_file(), f"chromium drew no screenshot: {done.stderr[-2000:]}"
    return png
