"""Offline evaluation of an eviction policy on recorded transcripts (``ctxflow simulate``)."""

from ctxflow.streams.simulate.run import simulate_sessions
from ctxflow.streams.simulate.transcripts import TranscriptError, read_sessions

__all__ = ["TranscriptError", "read_sessions", "simulate_sessions"]
