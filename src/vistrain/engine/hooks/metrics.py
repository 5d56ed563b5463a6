"""The epoch's metrics row: ``metrics.jsonl``, the trackers (TensorBoard, W&B) and the ``[EPOCH]`` / ``NEW_BEST``
log lines; and, when a run resumes, ``metrics.jsonl`` rebuilt from the checkpoints."""

from __future__ import annotations

import logging
from typing import Any

from vistrain.config.loader import config_to_dict
from vistrain.config.schema import Config, TrackingCfg
from vistrain.engine.checkpoint import load_checkpoint
from vistrain.engine.distributed import DistInfo
from vistrain.engine.hooks.base import FoldRun, Hook
from vistrain.tracking.files import atomic_write_text, json_line
from vistrain.tracking.rundir import RunDir
from vistrain.tracking.writers import Trackers

log = logging.getLogger(__name__)
# What to do about a last checkpoint that cannot be read when a run resumes.
RESUME_HINT = "; delete it to train that fold again from the start, or start a new run with --fresh"


class MetricsRow(Hook):
    """The row goes to ``metrics.jsonl`` last of all the epoch's files: a kill before it re-runs the epoch, and
    ``rebuild_metrics`` drops a row whose epoch the checkpoints do not have, so each completed epoch has one row."""

    name = "metrics"
    main_only = True

    def __init__(self, run: RunDir, trackers: Trackers, epochs: int):
        self.run, self.trackers, self.epochs = run, trackers, epochs

    def after_epoch(self, fold: FoldRun) -> None:
        row = fold.row
        self.run.append_metrics(row)
        self.trackers.log_epoch(row)
        log.info("[EPOCH] fold=%d epoch=%d/%d %s", fold.fold, row["epoch"], self.epochs, " ".join(
            f"{k}={_fmt(k, v)}" for k, v in row.items() if k not in ("fold", "epoch", "fold_time_s") and v is not None))
        if fold.improved:
            log.info("NEW_BEST fold=%d epoch=%d %s=%.4f -> %s", fold.fold, row["epoch"], fold.monitor,
                     row[fold.monitor], self.run.ckpt("best", fold.fold).relative_to(self.run.path))


def open_trackers(cfg: Config, run: RunDir, info: DistInfo) -> Trackers:
    """The run's trackers (a context manager). Only rank 0 tracks: the other ranks get every writer switched off.
    A resumed run's ``metrics.jsonl`` is rebuilt first, and the trackers replay it."""
    history = rebuild_metrics(run, cfg.data.folds) if info.is_main and run.resumed else None
    tracking = cfg.tracking if info.is_main else TrackingCfg(tensorboard=False)
    return Trackers(tracking, run.path, run.run_id, config_to_dict(cfg), history=history)


def rebuild_metrics(run: RunDir, n_folds: int) -> list[dict[str, Any]]:
    """metrics.jsonl from the checkpoints' histories: one row per completed epoch, none repeated or lost."""
    rows = []
    for fold in range(n_folds):
        last = run.ckpt("last", fold)
        if last.is_file():
            rows += load_checkpoint(last, hint=RESUME_HINT)["history"]
    atomic_write_text(run / "metrics.jsonl", "".join(json_line(r) for r in rows))
    return rows


def _fmt(key: str, v: Any) -> str:
    if key in ("time_s", "mem_MiB", "img_per_s"):
        return f"{v:.1f}"
    if isinstance(v, float):
        return f"{v:.3e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"
    return str(v)
