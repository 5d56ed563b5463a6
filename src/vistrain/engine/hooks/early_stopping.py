"""Early stopping, and the best epoch it tracks (which the checkpoints, OOF logits and the summary follow)."""

from __future__ import annotations

import logging
import math
from typing import Any

from vistrain.engine.hooks.base import FoldRun, Hook
from vistrain.registry import higher_is_better

log = logging.getLogger(__name__)


def monitor_mode(monitor: str) -> str:
    """"max" when a larger monitor is better (the metric registry's direction), else "min": which way the monitor
    improves (the plateau schedule needs it too)."""
    return "max" if higher_is_better(monitor) else "min"


class EarlyStopping(Hook):
    """Tracks the best value of the monitored metric over the evaluated epochs; ``fold.improved`` says whether this
    epoch set it. After ``patience`` evaluations without improvement (0: never) training stops. Its state is in
    the last checkpoint, so a resumed fold counts on where it was."""

    name = "early_stopping"

    def __init__(self, monitor: str, patience: int, eval_every: int = 1):
        self.monitor = monitor
        self.patience = patience  # 0 disables stopping (the best epoch is still tracked)
        self.eval_every = eval_every  # for the log line: patience counts evaluations
        self.mode = monitor_mode(monitor)
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = -1
        self.bad_epochs = 0

    def step(self, value: float, epoch: int) -> bool:
        """Whether ``value`` at ``epoch`` improves on the best so far (the first of equal values stays best)."""
        better = value < self.best if self.mode == "min" else value > self.best
        if better:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def before_train(self, fold: FoldRun) -> None:
        fold.best_epoch, fold.stop = self.best_epoch, self.should_stop  # a resumed fold may have stopped already

    def after_epoch(self, fold: FoldRun) -> None:
        if fold.monitor_value is not None:
            fold.improved = self.step(fold.monitor_value, fold.state.epoch)
        fold.best_epoch, fold.stop = self.best_epoch, self.should_stop

    def after_train(self, fold: FoldRun) -> None:
        if self.should_stop:
            log.info("[EPOCH] fold=%d early stop after epoch %d: %s did not improve for %d %s (best %.4f at epoch %d)",
                     fold.fold, fold.state.epoch, self.monitor, self.patience,
                     "epochs" if self.eval_every == 1 else f"evaluations (every {self.eval_every} epochs)",
                     self.best, self.best_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


def best_epochs(history: list[dict[str, Any]], monitor: str, k: int) -> set[int]:
    """The epochs of the ``k`` best ``monitor`` values among the rows that have one (evaluated epochs); equal
    values rank the earlier epoch first, as ``EarlyStopping`` keeps the first of equal bests."""
    sign = -1 if higher_is_better(monitor) else 1
    scored = sorted((sign * row[monitor], row["epoch"]) for row in history if row.get(monitor) is not None)
    return {epoch for _, epoch in scored[:k]}
