"""Eviction planning: what leaves a run's context window, and the summaries that replace it."""
