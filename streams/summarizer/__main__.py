"""``python -m ctxflow.streams.summarizer [--loglevel info] [--batch-max 64]``: a summarizer worker configured by
``CTXFLOW_*`` environment variables (:class:`~streams.config.Settings`, and ``CTXFLOW_SUMMARIZER_*`` for the
optional endpoint); how :class:`~streams.stack.summarizer_process.SummarizerProcess` runs one."""

from __future__ import annotations

import argparse

from ctxflow.streams import logs
from ctxflow.streams.config import Settings
from ctxflow.streams.summarizer.endpoint import configured_summarizer
from ctxflow.streams.summarizer.worker import run_summarizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ctxflow.streams.summarizer")
    parser.add_argument("--loglevel", default="info")
    parser.add_argument("--batch-max", type=int, default=64)
    args = parser.parse_args(argv)
    logs.configure(args.loglevel)
    run_summarizer(Settings(), configured_summarizer(), batch_max=args.batch_max)


if __name__ == "__main__":
    main()
