"""The divergence guard: a NaN or infinite training loss (or monitored metric) stops the run as "diverged"."""

from __future__ import annotations

import logging
import math

from vistrain.engine.hooks.base import FoldRun, Hook
from vistrain.engine.loop import Step
from vistrain.errors import describe

log = logging.getLogger(__name__)


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite. The run stops with run.json status "diverged"; its last checkpoint
    is the last good epoch, from which ``--resume RUN train.lr=...`` continues."""

    run_status = "diverged"


class DivergenceGuard(Hook):
    """Looks at the loss where the loop reads it from the device anyway (every ``train.log_interval`` batches and
    at the epoch's last one: no synchronisation of its own), and at each evaluated monitor value. It stops the run
    before the epoch's checkpoints, so the last checkpoint stays the last good epoch. Under several processes the
    loss it sees is summed over the ranks and the monitor is rank 0's, so every rank stops at the same step."""

    name = "divergence"

    def after_step(self, fold: FoldRun, step: Step) -> None:
        if step.window_loss is None or math.isfinite(step.window_loss):
            return
        steps = f"step {step.index}" if step.window_start == step.index else f"steps {step.window_start}-{step.index}"
        self._stop(fold, f"training loss is {step.window_loss} at {fold.opts.label} epoch {fold.state.epoch + 1} "
                         f"{steps}; lower train.lr, set train.grad_clip_norm or use train.amp=fp32")

    def after_epoch(self, fold: FoldRun) -> None:
        value = fold.monitor_value
        if value is not None and not math.isfinite(value):
            self._stop(fold, f"{fold.monitor} is {value} at {fold.opts.label} epoch {fold.state.epoch}")

    @staticmethod
    def _stop(fold: FoldRun, message: str) -> None:
        """Rank 0 logs the error and how to go on from the last good epoch, which the checkpoints keep."""
        err = DivergedError(message)
        if fold.info.is_main:
            log.error("[ERROR] %s", describe(err))
        if fold.run is not None and fold.info.is_main:
            log.warning("[DIVERGED] kept the last good epoch's checkpoint and the best model in %s; continue from "
                        "there with: vistrain train --resume %s train.lr=<lower>", fold.run / "ckpt", fold.run.path)
        raise err
