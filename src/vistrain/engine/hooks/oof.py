"""A classification fold's validation logits at its best epoch: the fold's part of the out-of-fold logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vistrain.engine.hooks.base import FoldRun, Hook
from vistrain.tracking.files import write_npy


class OofLogits(Hook):
    """Writes ``oof/fold{k}_valid_logits.npy`` [N_valid, C] whenever the epoch improved the monitor. It runs before
    the checkpoints hook writes the last checkpoint: a kill in between re-runs the epoch, which writes it again."""

    name = "oof_logits"
    main_only = True

    def __init__(self, path: Path):
        self.path = path

    def after_epoch(self, fold: FoldRun) -> None:
        if fold.improved and fold.outputs is not None:
            write_npy(self.path, fold.outputs.numpy().astype(np.float32))
