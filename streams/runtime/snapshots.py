"""Local table snapshots: a restarted worker reads its changelogs from a recent offset, not from offset 0.

The embedded broker (Tansu) never compacts, so recovering a table from its changelog read every value and
tombstone ever written (7.8 million records after 1,000,000 retired runs: 30 s) to find a small live set.
A snapshot is, per changelog partition, the live keys' value bytes as of an offset ``N`` of that partition,
plus ``N``. It is a base, never a source of truth: recovery loads it and then reads the changelog from
``N + 1`` to its true end with the same apply rules (:mod:`streams.runtime.recovery`), so it recovers exactly
what a read from offset 0 recovers. Records it already holds and that are read again change nothing (the
last value of a key wins), so a snapshot claiming an older ``N`` than its content is still exact; one claiming
a newer ``N`` would not be, which is what every rule below guards against.

Files live under ``<home>/state/<app_id>/<changelog topic>-<partition>.snap``, written atomically (temporary
file, fsync, rename, fsync of the directory), each with a format version, the deployment it belongs to (app
id, topic prefix, partition count) and a SHA-256 of its bytes. A missing, corrupt, foreign or too-new file
is ignored with a log line, and one that no longer fits its changelog (log start after ``N + 1``, or end
before it: the topic was recreated or the state reset) is discarded: recovery then reads from offset 0, as
without snapshots. Deleting the directory is always safe.

They are written at two points, both provably consistent with the durable changelog:

- after a preload that read many records from the log: the preload's live set at the offset it read to, as
  raw bytes from the log itself (:func:`streams.runtime.recovery.preload`);
- while the worker runs, when nothing decided is uncommitted (:class:`TableSnapshots.take`): every table
  value is then one the changelog holds, and the offset of each partition is where this worker's own
  acknowledged writes left it, tracked write by write (:class:`ChangelogPositions`). A write that does not
  land exactly where the previous one ended (another writer, a retried produce, records Faust's own
  recovery applied after the preload) leaves that partition without a position until its next preload.

Periodic snapshots are rate-limited: only once the changelog records written since the last one exceed
``RECORDS_PER_LIVE_KEY`` times the live keys (so encoding the live set costs at most a quarter of what
encoding the writes cost), and only when the worker has caught up (nothing decided is waiting for a commit):
deciding waits while the live set is copied and encoded (seconds for a hundred thousand live keys), so a worker
under sustained load never pauses for one; it takes one at its first quiet moment, and a restart before that
reads the tail since the last one (or the whole changelog, as without snapshots).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_MAGIC = b"CTXSNAP\n"
_LENGTH = struct.Struct(">I")
_PAIR = struct.Struct(">II")
_DIGEST = 32  # SHA-256

#: Changelog records written since the last snapshot, per live key, before the next one is taken.
RECORDS_PER_LIVE_KEY = 4
#: And never fewer than this many (a worker holding almost nothing would snapshot after every batch).
MIN_RECORDS = 1_000

#: ``(changelog topic, partition)``
Partition = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Deployment:
    """What a snapshot belongs to: a file of another deployment sharing the directory is ignored."""

    app_id: str
    topic_prefix: str
    partitions: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The live value bytes of one changelog partition as of ``offset`` (the last offset they include)."""

    offset: int
    values: dict[bytes, bytes]


class SnapshotFiles:
    """Reads and writes the snapshot files of one deployment; writes run on one thread of their own, in order."""

    def __init__(self, directory: Path, deployment: Deployment) -> None:
        self.directory = directory
        self.deployment = deployment
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="table-snapshots")
        self._saved: dict[Partition, int] = {}

    def path(self, topic: str, partition: int) -> Path:
        return self.directory / f"{topic}-{partition}.snap"

    def load(self, topic: str, partition: int) -> Snapshot | None:
        """The partition's snapshot, or None (logged unless simply missing) when there is no usable one."""
        path = self.path(topic, partition)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            return self._ignored(path, f"unreadable: {error}")
        if len(raw) < len(_MAGIC) + _LENGTH.size + _DIGEST or not raw.startswith(_MAGIC):
            return self._ignored(path, "not a table snapshot")
        if hashlib.sha256(raw[:-_DIGEST]).digest() != raw[-_DIGEST:]:
            return self._ignored(path, "checksum mismatch")
        try:
            start = len(_MAGIC) + _LENGTH.size
            (header_length,) = _LENGTH.unpack_from(raw, len(_MAGIC))
            header = json.loads(raw[start:start + header_length])
            version = int(header["version"])
            if version > FORMAT_VERSION:
                return self._ignored(path, f"format version {version} is newer than {FORMAT_VERSION}")
            expected = {**asdict(self.deployment), "topic": topic, "partition": partition}
            foreign = {name: header.get(name) for name, value in expected.items() if header.get(name) != value}
            if foreign:
                return self._ignored(path, f"another deployment's: {foreign}")
            values = _pairs(raw, start + header_length, len(raw) - _DIGEST)
            if len(values) != header["keys"]:
                return self._ignored(path, "key count mismatch")
            return Snapshot(int(header["offset"]), values)
        except (ValueError, KeyError, TypeError, struct.error) as error:
            return self._ignored(path, f"malformed: {error}")

    def discard(self, topic: str, partition: int, reason: str) -> None:
        log.warning("table snapshot discarded", extra={"path": str(self.path(topic, partition)), "reason": reason})
        self.path(topic, partition).unlink(missing_ok=True)
        self._saved.pop((topic, partition), None)

    def save(self, topic: str, partition: int, offset: int, values: Iterable[tuple[bytes, bytes]]) -> int:
        """Write the snapshot (blocking; see :meth:`submit`); returns its size in bytes, 0 when it was not newer."""
        if self._saved.get((topic, partition), -1) >= offset:
            return 0
        header = {**asdict(self.deployment), "version": FORMAT_VERSION, "topic": topic, "partition": partition,
                  "offset": offset}
        body = bytearray()
        keys = 0
        for key, value in values:
            body += _PAIR.pack(len(key), len(value))
            body += key
            body += value
            keys += 1
        encoded = json.dumps({**header, "keys": keys}, separators=(",", ":")).encode()
        raw = bytearray(_MAGIC)
        raw += _LENGTH.pack(len(encoded))
        raw += encoded
        raw += body
        raw += hashlib.sha256(raw).digest()
        path = self.path(topic, partition)
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        with open(temporary, "wb") as file:
            file.write(raw)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self._saved[(topic, partition)] = offset
        return len(raw)

    def submit(self, job: Callable[[], Any]) -> Future[Any]:
        """Run ``job`` (which saves snapshots) on the writer thread, after any submitted before it."""
        return self._writer.submit(job)

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    @staticmethod
    def _ignored(path: Path, reason: str) -> None:
        log.warning("table snapshot ignored; its partition is read from offset 0",
                    extra={"path": str(path), "reason": reason})
        return None


def _pairs(raw: bytes, at: int, end: int) -> dict[bytes, bytes]:
    values: dict[bytes, bytes] = {}
    view = memoryview(raw)
    unpack, size = _PAIR.unpack_from, _PAIR.size
    while at < end:
        key_length, value_length = unpack(raw, at)
        at += size
        key_end = at + key_length
        value_end = key_end + value_length
        if value_end > end:
            raise ValueError("a value runs past the end")
        values[bytes(view[at:key_end])] = bytes(view[key_end:value_end])
        at = value_end
    return values


class ChangelogPositions:
    """Where this worker's own acknowledged writes left each changelog partition it owns.

    Seeded by the preload with the true end of each partition it read (the tables then hold exactly the log up
    to it); every acknowledged batch of changelog records must start there and moves it on. A batch starting
    anywhere else means records this worker did not write (or wrote twice) sit in the log: the partition has
    no position, hence no periodic snapshot, until it is preloaded again.
    """

    def __init__(self) -> None:
        self._next: dict[Partition, int | None] = {}
        #: Changelog records acknowledged since the last periodic snapshot.
        self.written = 0

    def seed(self, partitions: dict[Partition, int]) -> None:
        """After a preload: ``partitions`` (changelog partition -> true end) are all this worker owns now."""
        self._next = dict(partitions)

    def acked(self, topic: str, partition: int, base_offset: int, count: int) -> None:
        key = (topic, partition)
        expected = self._next.get(key)
        if expected == base_offset:
            self._next[key] = base_offset + count
        elif expected is not None:
            log.info("changelog written by another writer too; no snapshot of it until its next preload",
                     extra={"topic": topic, "partition": partition, "expected": expected, "base": base_offset})
            self._next[key] = None
        self.written += count

    def last_offsets(self) -> dict[Partition, int]:
        """Partition -> its last offset (-1 when empty), for every partition with a known position."""
        return {key: end - 1 for key, end in self._next.items() if end is not None}


@dataclass(frozen=True, slots=True)
class HeldValues:
    """One table's values held for one changelog partition, and how to encode them as its changelog does."""

    topic: str
    partition: int
    items: list[tuple[str, Any]]
    dumps: Callable[[Any], bytes]


class TableSnapshots:
    """The worker's snapshots: files, positions and when to take the next one."""

    def __init__(self, files: SnapshotFiles, clock: Callable[[], float] = time.monotonic) -> None:
        self.files = files
        self.positions = ChangelogPositions()
        self._clock = clock
        self._last = clock()
        #: Snapshots written by this process (reported in logs and read by tests).
        self.taken = 0

    def due(self, live_keys: int, *, idle: bool) -> bool:
        """Whether to take one now: enough written since the last, and the worker idle (see the module docstring:
        a snapshot pauses deciding, which a busy worker must not do)."""
        return idle and self.positions.written >= max(RECORDS_PER_LIVE_KEY * live_keys, MIN_RECORDS)

    async def take(self, collect: Callable[[], list[HeldValues] | None]) -> None:
        """Snapshot what ``collect`` returns (every value of every table, or None when they are ahead of the
        changelogs) for the partitions with a known position. The caller keeps nothing decided uncommitted
        until this returns: the values are encoded on the snapshot thread, from the objects themselves."""
        began = time.perf_counter()
        held = collect()  # with the positions, before any await: both describe the same moment
        offsets = self.positions.last_offsets()
        collected_s = time.perf_counter() - began
        written = self.positions.written
        # Counted as taken either way: a refusal that lasted would otherwise pause deciding after every commit.
        self.positions.written = 0
        self._last = self._clock()
        if held is None:
            log.info("table snapshot skipped: the tables hold values not captured for their changelogs")
            return
        if not offsets:  # no partition whose position is known (a rebalance is under way)
            return
        by_partition: dict[Partition, list[HeldValues]] = {key: [] for key in offsets}
        for values in held:
            if (values.topic, values.partition) in by_partition:
                by_partition[(values.topic, values.partition)].append(values)
        files = self.files

        def save_all() -> int:
            size = 0
            for (topic, partition), tables in by_partition.items():
                pairs = ((key.encode(), v.dumps(value)) for v in tables for key, value in v.items)
                size += files.save(topic, partition, offsets[(topic, partition)], pairs)
            return size

        try:
            size = await asyncio.wrap_future(files.submit(save_all))
        except Exception:
            log.exception("table snapshot failed; recovery reads the changelogs as before")
            return
        self.taken += 1
        log.info("table snapshot written", extra={
            "partitions": len(by_partition), "keys": sum(len(v.items) for v in held), "bytes": size,
            "records_since_last": written, "collect_s": round(collected_s, 4),
            "seconds": round(time.perf_counter() - began, 3)})
