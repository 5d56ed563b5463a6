"""The trainer's hooks, one behaviour per file, and ``default_hooks``: the one ordered list a run's folds use.

Adding a behaviour (SWA, PreciseBN, an extra evaluator) is a ``Hook`` subclass in its own file plus one line in
``default_hooks``, where its place in the order says what it sees: at ``after_epoch`` the hooks above it have run.
"""

from __future__ import annotations

from vistrain.config.schema import Config
from vistrain.engine.hooks.augment_grid import AugmentGrid
from vistrain.engine.hooks.base import FoldRun, Hook
from vistrain.engine.hooks.checkpoints import Checkpoints
from vistrain.engine.hooks.divergence import DivergedError, DivergenceGuard
from vistrain.engine.hooks.early_stopping import EarlyStopping, best_epochs, monitor_mode
from vistrain.engine.hooks.ema import Ema
from vistrain.engine.hooks.epoch_order import EpochOrder
from vistrain.engine.hooks.lr_override import LrOverride
from vistrain.engine.hooks.metrics import MetricsRow
from vistrain.engine.hooks.oof import OofLogits
from vistrain.engine.hooks.reporter import Reporter
from vistrain.tracking.rundir import RunDir
from vistrain.tracking.writers import Trackers

__all__ = ["AugmentGrid", "Checkpoints", "DivergedError", "DivergenceGuard", "EarlyStopping", "Ema", "EpochOrder",
           "FoldRun", "Hook", "LrOverride", "MetricsRow", "OofLogits", "Reporter", "best_epochs", "default_hooks",
           "monitor_mode"]


def default_hooks(cfg: Config, fold: int, run: RunDir, trackers: Trackers, keep_valid_outputs: bool) -> list[Hook]:
    """A fold's hooks in the order they run. Before training: the run's augment grid (its first fold only). Before
    an epoch: the loader is set to it. At the end of an epoch: a non-finite value stops the run before anything is
    written; early stopping decides whether the epoch is the best; then the files, in the order that makes a kill
    at any moment safe (OOF logits and best weights, the policy files, the last checkpoint) and the metrics row last
    of all, so a kill leaves exactly one row per completed epoch."""
    t = cfg.train
    hooks: list[Hook | None] = [
        EpochOrder(),
        AugmentGrid(run / "plots" / "augment_grid.png", cfg),
        DivergenceGuard(),
        Ema(t.ema_decay) if t.ema else None,
        LrOverride(t.lr),
        EarlyStopping(t.monitor, t.early_stopping_patience, t.eval_every_n_epochs),
        OofLogits(run / "oof" / f"fold{fold}_valid_logits.npy") if keep_valid_outputs else None,
        Checkpoints(run, t.monitor, t.save_every_n_epochs, t.keep_best_k),
        MetricsRow(run, trackers, t.epochs),
    ]
    return [h for h in hooks if h is not None]
