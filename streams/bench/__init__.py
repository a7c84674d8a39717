"""``ctxflow bench``: what one worker process sustains, measured end to end against its own embedded stack.

Modules: :mod:`.corpus` (encoded inputs), :mod:`.throughput` (raw decode ceiling, worker rate),
:mod:`.latency` (produce -> decision), :mod:`.load` (the latency phase's load, from a child process),
:mod:`.sessions` (memory per active run, SIGKILL recovery), :mod:`.retention` (a worker after a million retired
runs against an empty one),
:mod:`.core` (the budget core alone), :mod:`.report` (results JSON, targets), :mod:`.runner` (the run).
"""

from ctxflow.streams.bench.report import BenchResults, verdicts
from ctxflow.streams.bench.runner import BenchConfig, run_bench

__all__ = ["BenchConfig", "BenchResults", "run_bench", "verdicts"]
