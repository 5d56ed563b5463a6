"""Experiment trackers: TensorBoard event files and Weights & Biases, behind one small interface.

The run directory stays the source of truth; trackers are views of it. Both backends are imported
lazily: TensorBoard costs a second of import time, and W&B is an optional extra
(``pip install 'vistrain[wandb]'``) that a run only needs when ``tracking.wandb.enabled`` is set.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from vistrain.config.schema import TrackingCfg, WandbCfg
from vistrain.errors import UserError

log = logging.getLogger(__name__)

WANDB_MISSING = ("tracking.wandb.enabled: the wandb package is not installed; pip install 'vistrain[wandb]' "
                 "or set tracking.wandb.enabled=false")
SKIP_KEYS = ("fold", "epoch")  # the row's coordinates, not metrics


def is_number(value: Any) -> bool:
    """True for int/float (NumPy included) values; bools are flags, not metrics."""
    return isinstance(value, int | float | np.number) and not isinstance(value, bool | np.bool_)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to ``{"a/b/c": value}``; lists of dicts are keyed by position (``folds/0/...``)."""
    if isinstance(obj, dict):
        items: Iterable[tuple[Any, Any]] = obj.items()
    elif isinstance(obj, list) and all(isinstance(x, dict) for x in obj):
        items = enumerate(obj)
    else:
        return {prefix: obj} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}/{key}" if prefix else str(key)))
    return out


def epoch_scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row's numbers as ``{"fold{k}/{key}": value}``."""
    fold = int(row["fold"])
    return {f"fold{fold}/{k}": float(v) for k, v in row.items() if k not in SKIP_KEYS and is_number(v)}


def image_tag(path: Path, run_dir: Path) -> str:
    """``plots/fold0_curves`` for ``<run>/plots/fold0_curves.png``: stable across runs, unique in one."""
    try:
        return str(path.relative_to(run_dir).with_suffix(""))
    except ValueError:
        return path.stem


def read_png(path: Path) -> np.ndarray:
    """An image file as an RGB uint8 array [H, W, 3] (alpha dropped: TensorBoard shows it on black)."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


class Trackers:
    """Every enabled tracker of a run; each method fans out to the ones that are on.

    ``log_epoch`` writes ``fold{k}/{metric}`` at step ``epoch``, so the folds of one run appear as
    separate curves on the same epoch axis.
    """

    def __init__(self, cfg: TrackingCfg, run_dir: Path, run_id: str, config: dict[str, Any],
                 history: list[dict[str, Any]] | None = None):
        """``history``: on resume, the rows of the rebuilt metrics.jsonl (see ``open_tensorboard``)."""
        self.run_dir = Path(run_dir)
        # W&B first: it is the one that can fail (not installed), and then no event file is left open.
        self.wandb_run = open_wandb(cfg.wandb, self.run_dir, run_id, config) if cfg.wandb.enabled else None
        self.tensorboard = open_tensorboard(self.run_dir, history) if cfg.tensorboard else None
        self._wandb_folds: set[int] = set()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(failed=exc_type is not None)

    def log_epoch(self, row: dict[str, Any]) -> None:
        """Every numeric field of a metrics.jsonl row as ``fold{fold}/{key}`` at step ``row['epoch']``."""
        fold, epoch = int(row["fold"]), int(row["epoch"])
        scalars = epoch_scalars(row)
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, global_step=epoch)
            self.tensorboard.flush()  # a crash later should not lose the epoch that was just logged
        if self.wandb_run is not None:
            self._define_fold_axis(fold)
            self.wandb_run.log({**scalars, f"fold{fold}/epoch": epoch})

    def _define_fold_axis(self, fold: int) -> None:
        """W&B steps must only grow, but every fold restarts at epoch 1: give each fold its own x-axis."""
        if fold not in self._wandb_folds:
            self.wandb_run.define_metric(f"fold{fold}/epoch", hidden=True)
            self.wandb_run.define_metric(f"fold{fold}/*", step_metric=f"fold{fold}/epoch")
            self._wandb_folds.add(fold)

    def log_images(self, paths: Iterable[Path], step: int = 0) -> None:
        """PNG files (plots, confusion matrices) as images, tagged by their path in the run directory."""
        paths = [Path(p) for p in paths if Path(p).is_file()]
        if self.tensorboard is not None:
            for path in paths:
                self.tensorboard.add_image(image_tag(path, self.run_dir), read_png(path), global_step=step,
                                           dataformats="HWC")
            self.tensorboard.flush()
        if self.wandb_run is not None and paths:
            import wandb

            self.wandb_run.log({f"images/{image_tag(p, self.run_dir)}": wandb.Image(str(p)) for p in paths})

    def log_summary(self, summary: dict[str, Any]) -> None:
        """summary.json: its numbers as ``summary/...`` scalars and the whole file as text (TensorBoard),
        or as the run summary (W&B)."""
        flat = flatten(summary)
        if self.tensorboard is not None:
            for key, value in flat.items():
                if is_number(value) and math.isfinite(float(value)):
                    self.tensorboard.add_scalar(f"summary/{key}", float(value), global_step=0)
            # Indented by four spaces: TensorBoard renders text as markdown, this makes it a code block.
            text = "\n".join("    " + line for line in json.dumps(summary, indent=2, default=str).splitlines())
            self.tensorboard.add_text("summary", text, global_step=0)
            self.tensorboard.flush()
        if self.wandb_run is not None:
            self.wandb_run.summary.update({k: v for k, v in flat.items() if is_number(v) or isinstance(v, str)})

    def close(self, failed: bool = False) -> None:
        """Flush and close every tracker; safe to call twice."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None


def open_tensorboard(run_dir: Path, history: list[dict[str, Any]] | None = None) -> Any:
    """A SummaryWriter on ``run_dir/tensorboard/``.

    A resumed run (``history``: the rows of the rebuilt metrics.jsonl) replaces the earlier attempts' event files
    by a new one holding exactly those rows. Otherwise an epoch logged after the last checkpoint, then lost with the
    interruption and trained again, would show twice; TensorBoard's ``purge_step`` cannot help, since it cuts
    every tag at one step and each fold has its own epoch axis. The new file is written before the old ones go.
    """
    from torch.utils.tensorboard import SummaryWriter

    log_dir = run_dir / "tensorboard"
    earlier = sorted(log_dir.glob("events.out.tfevents.*")) if history is not None else []
    writer = SummaryWriter(log_dir=str(log_dir))
    for row in history or []:
        for tag, value in epoch_scalars(row).items():
            writer.add_scalar(tag, value, global_step=int(row["epoch"]))
    writer.flush()
    for path in earlier:
        path.unlink(missing_ok=True)
    return writer


def open_wandb(cfg: WandbCfg, run_dir: Path, run_id: str, config: dict[str, Any]) -> Any:
    """A W&B run with id ``run_id``: ``--resume`` of the same run directory continues the same W&B run."""
    try:
        import wandb
    except ImportError as err:
        raise UserError(WANDB_MISSING) from err
    return wandb.init(
        project=cfg.project, entity=cfg.entity, name=cfg.name or run_id, tags=list(cfg.tags), mode=cfg.mode,
        dir=str(run_dir), config=config, id=run_id, resume="allow",
        # The run directory already holds the config, code snapshot and logs; W&B needs none of its own.
        settings=wandb.Settings(disable_code=True, disable_git=True, console="off"),
    )
