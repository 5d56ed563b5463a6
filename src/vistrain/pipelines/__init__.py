"""The verbs: one module per command, each with one top-level ``run_*`` function."""
