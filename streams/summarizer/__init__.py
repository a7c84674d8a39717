"""The summarizer worker (``ctxflow summarizer``): compression runs off the deciding hot path.

The eviction planner publishes a ``CompressionJob`` to ``compression.jobs`` when a run's slot nears its budget;
summarizer workers, a consumer group of their own (``<app_id>-summarizer``) scaled apart from the deciding
workers, read each job's sources from the log by position, summarize them and publish a ``Summary`` to
``summaries``, which the planner swaps in later. Jobs that cannot be summarized become dead letters.

- :mod:`.worker`: the service and its commit order (produce, acknowledged, then commit).
- :mod:`.sources`: bulk reads by position, and the checks each source must pass.
- :mod:`.jobs`: one job's ``Summary`` record and its deterministic id.
- :mod:`.endpoint`: the optional OpenAI-compatible summarizer and its environment settings.

``python -m ctxflow.streams.summarizer`` runs one from ``CTXFLOW_*`` environment variables.
"""

from ctxflow.streams.summarizer.jobs import Summarizer, summary_id_of
from ctxflow.streams.summarizer.worker import SummarizerWorker, run_summarizer, summarizer_group

__all__ = ["Summarizer", "SummarizerWorker", "run_summarizer", "summarizer_group", "summary_id_of"]
