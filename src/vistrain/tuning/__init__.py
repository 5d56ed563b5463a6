"""Tuning: the search space (tune.space) and the Optuna study around it (storage, reports, continuing)."""
