"""The ``ctxflow`` command line (:mod:`.main`); ``python -m streams.cli`` runs it too."""
