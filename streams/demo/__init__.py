"""``ctxflow demo``: the multi-tenant workload (:mod:`.workload`, :mod:`.run_script`), the run that drives it
through a real worker (:mod:`.run`) and the report read back from ClickHouse and Redis (:mod:`.report`)."""
