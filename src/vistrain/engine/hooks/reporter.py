"""Hands each epoch's metrics row to a plain function: ``tune`` reports it to Optuna and prunes there."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vistrain.engine.hooks.base import FoldRun, Hook


class Reporter(Hook):
    """``report(row)`` after the row is written; an exception it raises ends the run (``tune`` raises
    ``optuna.TrialPruned`` with ``run_status = "pruned"``). The engine knows nothing of Optuna."""

    name = "reporter"
    main_only = True

    def __init__(self, report: Callable[[dict[str, Any]], None]):
        self.report = report

    def after_epoch(self, fold: FoldRun) -> None:
        self.report(fold.row)
