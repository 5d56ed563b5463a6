"""A resumed fold whose effective ``train.lr`` differs from the one its checkpoint was trained with."""

from __future__ import annotations

import logging

from vistrain.engine.hooks.base import FoldRun, Hook

log = logging.getLogger(__name__)


class LrOverride(Hook):
    """``--resume RUN train.lr=...`` (e.g. after a divergence): the optimiser and scheduler state just restored
    carry the old rate, so every learning rate they hold (the groups' current and initial rates, the scheduler's
    base and warm-up values) is scaled by new / old; the schedule's shape and position stay. "Old" is the lr of
    the effective config stored in the checkpoint, so a later plain ``--resume`` (same effective lr) scales
    nothing."""

    name = "lr_override"

    def __init__(self, lr: float):
        self.lr = lr

    def before_train(self, fold: FoldRun) -> None:
        if fold.restored is None:
            return
        old = fold.restored.get("config", {}).get("train", {}).get("lr")
        if old is None or old == self.lr or old <= 0:
            return
        factor = self.lr / old
        for group in fold.state.optimizer.param_groups:
            for key in ("lr", "initial_lr"):
                if key in group:
                    group[key] *= factor
        sched = fold.state.scheduler
        sched.base_values = [v * factor for v in sched.base_values]
        if getattr(sched, "warmup_t", 0):
            sched.warmup_lr_init *= factor
            sched.warmup_steps = [(v - sched.warmup_lr_init) / sched.warmup_t for v in sched.base_values]
        log.warning("[RESUME] fold=%d train.lr %g -> %g: the optimiser's and scheduler's learning rates are scaled "
                    "by %g from epoch %d on", fold.fold, old, self.lr, factor, fold.state.epoch + 1)
