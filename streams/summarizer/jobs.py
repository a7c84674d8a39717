"""One compression job's summary: the summarizer's output as a ``Summary`` record with its provenance.

Pure apart from the summarizer it is given: no Kafka. The record's id is derived from the job's id, so a job
delivered twice (a redelivery after a crash or a rebalance, or the planner requesting it again on a replay)
yields a summary with the same id, which the planner keeps once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

from ctxflow.processors.eviction.summarizer import SourceItem
from ctxflow.processors.eviction.summarizer import Summary as Prepared
from ctxflow.processors.tokens import TokenCounter
from ctxflow.schemas.models import CompressionJob, Summary


class Summarizer(Protocol):
    """What the worker runs: the extractive summarizer, or :class:`~.endpoint.EndpointSummarizer`."""

    name: str
    version: str

    def summarize(self, sources: Sequence[SourceItem], max_tokens: int, count: Callable[[str], int]) -> Prepared:
        """A summary of ``sources`` within ``max_tokens`` as ``count`` counts them (raises ``SummaryRefused``)."""
        ...


def summary_id_of(job_id: str) -> str:
    """The summary id of a job: the same for every delivery of the job."""
    return f"summary:{job_id}"


def token_count_for(counter: TokenCounter, model: str | None) -> Callable[[str], int]:
    """How the budget counts a text for the job's model (the estimator when the job names none)."""
    name = model or ""
    return lambda text: counter.count(text, name).tokens


def summarize_job(job: CompressionJob, items: Sequence[SourceItem], summarizer: Summarizer,
                  count: Callable[[str], int], now: datetime) -> Summary:
    """The ``Summary`` record for ``job`` over its resolved ``items`` (in the job's order).

    Source ids and digests are the job's, which :func:`~.sources.resolve_sources` checked against the log; the
    text, depth, fidelity, summarizer name and version are what the summarizer returned (a summarizer that falls
    back to another names the one that wrote the text). Raises what the summarizer raises.
    """
    prepared = summarizer.summarize(items, job.max_tokens, count)
    return Summary(
        summary_id=summary_id_of(job.job_id),
        job_id=job.job_id,
        tenant_id=job.tenant_id,
        user_id=job.user_id,
        session_id=job.session_id,
        run_id=job.run_id,
        slot=job.slot,
        text=prepared.text,
        token_count=count(prepared.text),
        source_ids=[source.item_id for source in job.sources],
        source_digests=[source.content_digest for source in job.sources],
        summarizer=prepared.summarizer,
        summarizer_version=prepared.version,
        depth=prepared.depth,
        fidelity=prepared.fidelity,
        produced_at=now,
    )
