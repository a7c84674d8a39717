"""The ``ctxflow`` command line (:mod:`.main`); ``python -m ctxflow.streams.cli`` runs it too."""
