"""The deciding worker: Faust wiring, the batch pipeline and its commit order, intake, tables, recovery.

Read :mod:`.pipeline` first: its docstring is the commit order every effect follows.
"""
