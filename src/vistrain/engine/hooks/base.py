"""What a hook is and what it sees: ``Hook`` (no-op methods at five points of a fold's training, and a state that
the last checkpoint keeps) and ``FoldRun`` (the fold being trained: its state, task, loaders, run directory and
the epoch just finished)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from vistrain.engine.checkpoint import rng_state
from vistrain.engine.distributed import SINGLE, DistInfo
from vistrain.engine.loop import LoopOptions, Step, Task, TrainState

if TYPE_CHECKING:
    from vistrain.tracking.rundir import RunDir


class Hook:
    """One behaviour of training (checkpoints, early stopping, EMA ...), called by the trainer at fixed points, in
    the order of the hook list (``engine/hooks/__init__.py: default_hooks``).

    A fold's hooks are built for that fold. When it resumes, ``load_state_dict`` gets what ``state_dict`` returned
    when its last checkpoint was written (under ``ckpt["hooks"][name]``), before ``before_train``; a hook whose name
    the checkpoint lacks (one of an older vistrain) keeps its fresh state.
    """

    name = "hook"  # the key of its state in the last checkpoint: unique in the list
    main_only = False  # True: runs on rank 0 only (it writes files or logs; the other ranks write nothing)

    def before_train(self, fold: FoldRun) -> None:
        """The fold's model, optimiser and state exist (restored when resuming); the model is not compiled yet."""

    def before_epoch(self, fold: FoldRun) -> None:
        """Epoch ``fold.state.epoch + 1`` is about to start (after its step ``fold.state.step`` when a mid-epoch
        checkpoint resumed; the ``EpochOrder`` hook, first in the list, sets the loader to that epoch)."""

    def after_step(self, fold: FoldRun, step: Step) -> None:
        """After every training batch (``step.updated``: the optimiser stepped)."""

    def after_epoch(self, fold: FoldRun) -> None:
        """The epoch's state is final: ``fold.row`` (already in ``state.history``), ``fold.outputs`` (on rank 0: the
        whole validation set) and ``fold.monitor_value`` when it was evaluated, the schedule stepped."""

    def after_train(self, fold: FoldRun) -> None:
        """The fold ended (its epochs, or early stopping), or a preemption signal stopped it (``fold.interrupted``:
        in the middle of an epoch when ``fold.state.step`` > 0); not called for a fold a resume finds finished."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what ``state_dict`` returned."""


@dataclass
class FoldRun:
    """One fold's training as every hook sees it. The trainer fills the epoch fields before ``after_epoch``; the
    early stopping hook sets ``improved``, ``best_epoch`` and ``stop``."""

    fold: int
    state: TrainState
    task: Task
    train_loader: DataLoader | Sequence[Any]
    valid_loader: DataLoader | Sequence[Any]
    opts: LoopOptions
    epochs: int
    monitor: str  # the metric that picks the best epoch (train.monitor)
    hooks: list[Hook] = field(default_factory=list)
    run: RunDir | None = None  # None: nothing is written (tests, benchmarks)
    info: DistInfo = SINGLE
    meta: dict[str, Any] = field(default_factory=dict)  # the plain fields of every checkpoint of the fold
    restored: dict[str, Any] | None = None  # the last checkpoint this fold resumed from
    started: float = field(default_factory=time.time)  # wall clock, less the time of earlier sessions
    # the epoch just trained
    row: dict[str, Any] = field(default_factory=dict)
    outputs: torch.Tensor | None = None  # validation outputs [N, ...] of an evaluated epoch
    monitor_value: float | None = None  # the monitor (rank 0 scores, every rank gets it); None: epoch not validated
    improved: bool = False
    best_epoch: int = -1
    stop: bool = False  # a hook ended training before the last epoch
    interrupted: bool = False  # a preemption signal stopped the fold (engine/preemption.py); it is not finished

    def call(self, point: str, *args: Any) -> None:
        """Every hook's method ``point``, in the list's order."""
        for hook in self.hooks:
            getattr(hook, point)(self, *args)

    def after_step(self, step: Step) -> None:
        self.call("after_step", step)

    def last_checkpoint(self, finished: bool, **extra: Any) -> dict[str, Any]:
        """What ``last_fold{k}.pth`` holds: the training state, the task's state (center-loss centres), the RNG,
        every hook's state and the fold's plain fields; ``finished`` says the fold has nothing left to train."""
        return {**self.state.state_dict(), "task_state": self.task.state_dict(), "rng": rng_state(),
                "finished": finished, "hooks": {h.name: h.state_dict() for h in self.hooks}, **extra, **self.meta}
