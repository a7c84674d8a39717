"""The ClickHouse sink runtime: projected topics into ClickHouse, in a consumer group apart from the deciding workers.

The deciding workers never write ClickHouse. The sink reads the projected topics (:mod:`.catalogue`) in its own
group (``<app_id>-sink``), writes them in large idempotent batches and commits exactly the offsets it wrote
(:mod:`.runner`), riding out backend outages with backoff. The records the workers consume are written as the
workers decided them (:mod:`.verdict`, :mod:`.intake`), so ClickHouse holds what the budget counted. It runs inside
a worker process by default (:mod:`.host`: a thread of its own, never the worker's event loop) or as
``ctxflow sink`` (:mod:`.serve`). An embedded chDB admits one process per directory: :mod:`.ownership` decides
which process holds it and tells the others where to send queries (:mod:`.web`).
"""
