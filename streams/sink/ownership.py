"""Which process holds an embedded chDB, and where the others send their queries.

chDB locks its directory (an exclusive ``flock`` on ``<dir>/status``): one process at a time opens it, and
:func:`open_backend` asks the lock before it tries, since chDB's own refusal does not say why. The process that
opened it writes ``<dir>.owner.json`` beside it (pid, start time, the URL of its query endpoint) and removes it
when it lets go; :func:`current_owner` reads it back, and trusts it only while that pid still runs with that start
time, so a crashed owner's file is ignored. A ClickHouse server has no owner: any number of processes write and
query it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ctxflow.sinks.clickhouse import ClickHouseSink
from ctxflow.sinks.table_retention import TableRetention
from ctxflow.streams.config import Settings
from ctxflow.streams.stack.processes import pid_alive, start_time_of

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Owner:
    """The process holding a chDB directory: its pid (and start time, when it wrote the owner file), what it is
    (``worker``, ``sink``; ``unknown`` when only chDB's own status file names it) and its query URL, if any."""

    pid: int
    role: str
    query_url: str | None = None
    start_time: int | None = None

    def describe(self) -> str:
        """``worker pid 123 (queries at http://...)`` for messages."""
        where = f" (queries at {self.query_url})" if self.query_url else ""
        return f"{self.role} pid {self.pid}{where}"


class BackendHeld(RuntimeError):
    """Another process holds the chDB directory; ``owner`` says which, when anything does."""

    def __init__(self, directory: Path, owner: Owner | None) -> None:
        holder = owner.describe() if owner else "another process"
        super().__init__(f"chDB at {directory} is held by {holder}: chDB admits one process per directory")
        self.directory = directory
        self.owner = owner


def chdb_directory(settings: Settings) -> Path | None:
    """The chDB data directory in force, or None when the DSN names a ClickHouse server."""
    dsn = settings.chdb_dsn
    return Path(dsn.removeprefix("chdb://")) if dsn.startswith("chdb:") else None


def open_backend(settings: Settings) -> ClickHouseSink:
    """A ClickHouse sink on the configured DSN with its schema ready.

    Raises :class:`BackendHeld` when another process holds the chDB directory, and whatever the driver raises
    when the backend does not answer (a server down, a directory that cannot be written).
    """
    directory = chdb_directory(settings)
    if directory is not None and _locked(directory):  # asked first: chDB's own refusal does not say why
        raise BackendHeld(directory, current_owner(settings) or _status_owner(directory))
    try:
        sink = ClickHouseSink(settings.chdb_dsn)
    except Exception as error:
        if directory is not None and _locked(directory):  # taken between the check and the open
            raise BackendHeld(directory, current_owner(settings) or _status_owner(directory)) from error
        raise
    try:
        sink.ensure_schema(
            TableRetention(settings.clickhouse_retention_days, settings.clickhouse_rollup_retention_days))
    except BaseException:
        sink.close()
        raise
    return sink


def announce(settings: Settings, role: str, query_url: str | None) -> None:
    """Record this process as the chDB directory's owner (no-op for a ClickHouse server)."""
    path = _owner_file(settings)
    if path is None:
        return
    owner = Owner(os.getpid(), role, query_url, start_time_of(os.getpid()))
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(owner)))
    tmp.replace(path)


def retire(settings: Settings) -> None:
    """Remove the owner file if it names this process (it no longer holds the directory)."""
    path = _owner_file(settings)
    owner = _read(path) if path is not None else None
    if path is not None and owner is not None and owner.pid == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def current_owner(settings: Settings) -> Owner | None:
    """The live process that announced itself as the chDB directory's owner, or None."""
    path = _owner_file(settings)
    owner = _read(path) if path is not None else None
    if owner is None or not pid_alive(owner.pid, owner.start_time):
        return None
    return owner


def _owner_file(settings: Settings) -> Path | None:
    directory = chdb_directory(settings)
    return None if directory is None else directory.with_name(f"{directory.name}.owner.json")


def _read(path: Path) -> Owner | None:
    try:
        return Owner(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _locked(directory: Path) -> bool:
    """True while a process holds chDB's lock on ``<dir>/status`` (an exclusive ``flock``, as ClickHouse takes it)."""
    try:
        fd = os.open(directory / "status", os.O_RDONLY)
    except OSError:
        return False  # never opened, or its holder exited cleanly (it removes the file)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _status_owner(directory: Path) -> Owner | None:
    """The pid chDB itself wrote into ``<dir>/status`` (``PID: 123``), for a holder that wrote no owner file."""
    try:
        found = re.search(r"^PID:\s*(\d+)", (directory / "status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return Owner(int(found[1]), "unknown") if found else None


def redacted(dsn: str) -> str:
    """``dsn`` without its password, for logs and ``/health``."""
    scheme, sep, rest = dsn.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return dsn
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{host}"
