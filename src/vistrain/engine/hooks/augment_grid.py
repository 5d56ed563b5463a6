"""The run's augment grid: the first training batch of its first fold, as the model receives it, drawn before that
fold trains into ``RUN/plots/augment_grid.png`` (the report shows it)."""

from __future__ import annotations

import logging
from pathlib import Path

from vistrain.config.schema import Config
from vistrain.data.preprocess import Preprocessor
from vistrain.engine.augment_preview import draw, first_batch, title
from vistrain.engine.hooks.base import FoldRun, Hook

log = logging.getLogger(__name__)
SHOWN = 32  # images of the batch in the grid


class AugmentGrid(Hook):
    """At ``before_train`` of the first fold that finds no grid (a resumed run keeps the one it has): one batch,
    made on rank 0 with every generator put back (``augment_preview.first_batch``), so the training is the same
    with or without it. No state."""

    name = "augment_grid"
    main_only = True

    def __init__(self, path: Path, cfg: Config):
        self.path, self.cfg = path, cfg

    def before_train(self, fold: FoldRun) -> None:
        if self.path.exists():
            return
        pre = Preprocessor.from_dict(fold.meta["preprocess"])
        batch = first_batch(fold.train_loader, fold.task, fold.opts.batch_transform, fold.opts.device,
                            fold.state.seed, pre, SHOWN)
        classes = [str(c) for c in fold.meta["classes"]]
        draw(batch, classes, self.cfg.train.label_smoothing, self.path, title(self.cfg, fold.fold, len(batch.images)))
        log.info("[DATA] augment grid: %d images of fold %d's first training batch -> %s", len(batch.images),
                 fold.fold, self.path)
