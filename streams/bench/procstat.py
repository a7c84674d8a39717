"""A process's resident memory and CPU time from ``/proc`` (Linux), and cores used between two readings.

A reading of a process that is gone is ``None``, never an error: the soak reads a worker it may just have
killed. CPU is user + system time of the process itself (not its children), in seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuMeter", "ProcReading", "read_proc"]

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcReading:
    """One reading of ``pid``: resident set size in bytes and CPU seconds used since it started."""

    pid: int
    rss_bytes: int
    cpu_s: float


def read_proc(pid: int) -> ProcReading | None:
    """``pid``'s RSS (``VmRSS`` of ``/proc/<pid>/status``) and CPU (``utime + stime`` of ``/proc/<pid>/stat``),
    or None when the process is gone or is a zombie (which has no VmRSS)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rss = next((line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")), None)
    if rss is None:
        return None
    # Fields 14 and 15; the command name (field 2) may hold spaces, so split after its closing parenthesis.
    fields = stat.rsplit(")", 1)[1].split()
    return ProcReading(pid, int(rss) * 1024, (int(fields[11]) + int(fields[12])) / _TICKS_PER_S)


class CpuMeter:
    """CPU seconds one role (the worker, the broker) used, across replacements of its process.

    Feed it a reading now and then; a reading of a new pid counts that process's whole CPU time (it started
    after the previous reading), so a killed and restarted worker is charged for both processes, minus what the
    killed one used between its last reading and its death, which no reading can see.
    """

    def __init__(self) -> None:
        self._last: ProcReading | None = None
        self.total_s = 0.0

    def add(self, reading: ProcReading | None) -> None:
        """Account the CPU time used since the previous reading of the same process."""
        if reading is None:
            return
        if self._last is not None and self._last.pid == reading.pid:
            self.total_s += max(0.0, reading.cpu_s - self._last.cpu_s)
        else:
            self.total_s += reading.cpu_s
        self._last = reading
