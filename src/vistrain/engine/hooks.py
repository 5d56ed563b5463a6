"""Small stateful helpers whose state goes into the checkpoint, so they survive a resume."""

from __future__ import annotations

import math
from typing import Any

MINIMISE = {"valid_loss", "train_loss"}


class EarlyStopping:
    """Tracks the best value of the monitored metric; ``step`` says whether this epoch improved it."""

    def __init__(self, monitor: str, patience: int):
        self.monitor = monitor
        self.patience = patience  # 0 disables stopping (the best epoch is still tracked)
        self.mode = "min" if monitor in MINIMISE else "max"
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = -1
        self.bad_epochs = 0

    def step(self, value: float, epoch: int) -> bool:
        better = value < self.best if self.mode == "min" else value > self.best
        if better:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


def best_epochs(history: list[dict[str, Any]], monitor: str, k: int) -> set[int]:
    """The epochs of the ``k`` best ``monitor`` values among the rows that have one (evaluated epochs); equal
    values rank the earlier epoch first, as ``EarlyStopping`` keeps the first of equal bests."""
    sign = 1 if monitor in MINIMISE else -1
    scored = sorted((sign * row[monitor], row["epoch"]) for row in history if row.get(monitor) is not None)
    return {epoch for _, epoch in scored[:k]}
