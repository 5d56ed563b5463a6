"""The training loader's epoch (``set_epoch``): which batches an epoch trains, from (seed, fold, epoch) alone."""

from __future__ import annotations

from vistrain.engine.hooks.base import FoldRun, Hook


class EpochOrder(Hook):
    """Before each epoch, sets the training loader's batch sampler (``data.samplers.EpochBatches``) to it: the
    shuffling and every item's augmentation seed follow from the fold's seed and the epoch, and a mid-epoch
    checkpoint's batches already trained (``state.step``) are left out. So a resumed epoch, whether it starts
    afresh or goes on from the middle, trains exactly the batches of the uninterrupted run. It keeps no state of its
    own: the epoch and step are the training state's."""

    name = "epoch_order"

    def before_epoch(self, fold: FoldRun) -> None:
        batches = getattr(fold.train_loader, "batch_sampler", None)
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(fold.state.seed, fold.state.epoch, skip=fold.state.step)
