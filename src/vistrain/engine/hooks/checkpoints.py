"""The checkpoint policy: ``best_fold{k}`` when the monitor improved, ``epoch{E}_fold{k}`` every N epochs, the K best
epochs as ``top_epoch{E}_fold{k}``, and ``last_fold{k}`` (everything a resume needs) after every epoch."""

from __future__ import annotations

import re
import time
from typing import Any

from vistrain.engine.checkpoint import save_weights
from vistrain.engine.hooks.base import FoldRun, Hook
from vistrain.engine.hooks.early_stopping import best_epochs
from vistrain.tracking.rundir import RunDir


class Checkpoints(Hook):
    """Writes the epoch's weights files, then the last checkpoint: a kill before that re-runs the whole epoch.
    Hooks after this one in the list must keep no state their ``after_epoch`` changes (the last checkpoint has
    their state from before it)."""

    name = "checkpoints"
    main_only = True

    def __init__(self, run: RunDir, monitor: str, save_every: int, keep_best_k: int):
        self.run, self.monitor = run, monitor
        self.save_every = save_every  # train.save_every_n_epochs (0: none)
        self.keep_best_k = keep_best_k  # train.keep_best_k (0: none)

    def after_epoch(self, fold: FoldRun) -> None:
        state = fold.state
        weights = {"model": state.eval_model().state_dict(), "epoch": state.epoch, "metrics": fold.row, **fold.meta}
        if fold.improved:
            save_weights(weights, self.run.ckpt("best", fold.fold))
        self._policy(fold.fold, state.history, weights)
        save_weights(fold.last_checkpoint(finished=False), self.run.ckpt("last", fold.fold))

    def after_train(self, fold: FoldRun) -> None:
        """The finished last checkpoint; a preempted fold's unfinished one (mid-epoch: ``state.step`` and the loss
        sums so far are in it)."""
        elapsed = time.time() - fold.started
        save_weights(fold.last_checkpoint(finished=not fold.interrupted, time_s=elapsed),
                     self.run.ckpt("last", fold.fold))

    def _policy(self, fold: int, history: list[dict[str, Any]], weights: dict[str, Any]) -> None:
        """``epoch{E}_fold{k}.pth``, kept. The K best evaluated epochs as ``top_epoch{E}_fold{k}.pth``; the ranking
        comes from ``history`` (in the last checkpoint, so a resumed run keeps it), and files of epochs pushed out
        of it (or left by a crash) are removed."""
        epoch = weights["epoch"]
        if self.save_every and epoch % self.save_every == 0:
            save_weights(weights, self.run.ckpt(f"epoch{epoch}", fold))
        if not self.keep_best_k or self.monitor not in history[-1]:
            return
        keep = best_epochs(history, self.monitor, self.keep_best_k)
        if epoch in keep:
            save_weights(weights, self.run.ckpt(f"top_epoch{epoch}", fold))
        for path in (self.run / "ckpt").glob(f"top_epoch*_fold{fold}.*"):
            found = re.fullmatch(rf"top_epoch(\d+)_fold{fold}\.(pth|safetensors)", path.name)
            if found and int(found.group(1)) not in keep:
                path.unlink()
