"""Tracking: the run directory, tagged logging, metrics.jsonl and summary files."""
