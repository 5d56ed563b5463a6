"""Preemption: SIGTERM (Kubernetes, Docker, systemd, SLURM at the time limit) and SIGUSR1 (SLURM's
``--signal=USR1@120``) stop a run in good order instead of killing it.

While the Trainer trains (``deferred``), a signal only records the request: training finishes the optimiser step in
progress (a whole accumulation group), the last checkpoint of the partial epoch is written with its step index
(``TrainState.step``) and the loss sums so far, and the command ends with ``Preempted`` (run.json status
``interrupted``, ``[EXIT] TRAINING INTERRUPTED code=143``, or ``train.requeue_exit_code``). ``--resume`` then
continues in the middle of that epoch with the very batches the uninterrupted run would have trained
(``data.samplers.EpochBatches``). Outside training (reading the data, the summary) there is nothing to save: the
signal stops the command at once, with the same exit.

Under torchrun every rank must stop at the same step, or the others would wait forever in the next collective:
``StopCheck`` all-reduces the flag (any rank's signal stops every rank) after every ``CHECK_EVERY`` optimiser updates
and at each epoch's start, the same points on every rank.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

import torch
import torch.distributed as dist

from vistrain.engine.distributed import DistInfo
from vistrain.errors import Preempted

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_CODE = 143  # 128 + SIGTERM: what a process ended by SIGTERM reports, so schedulers read it the same way
# Optimiser updates between two agreements under several processes: each is a collective and a host-device
# synchronisation, so not every update; the stop comes at most this many updates after the signal.
CHECK_EVERY = 10


@dataclass
class _Requests:
    signal: str | None = None  # the first signal received ("SIGTERM")
    deferring: bool = False  # inside ``deferred``: record the signal, the Trainer stops at its next check
    exit_code: int = EXIT_CODE


_requests = _Requests()


def _handle(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    _requests.signal = _requests.signal or name
    if not _requests.deferring:
        raise Preempted(f"stopped by {name} outside training (no step to finish)", _requests.exit_code)


@contextmanager
def handle_signals(requeue_exit_code: int | None = None) -> Iterator[None]:
    """SIGTERM and SIGUSR1 stop the command in good order for the duration (``train``, ``tune``); the handlers
    before are put back afterwards, so these nest (``tune``'s trials). Python handles signals in the main thread
    only: called from another thread (a notebook's worker) it changes nothing. ``requeue_exit_code``: the exit code
    of a preempted run instead of 143 (``train.requeue_exit_code``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outer = (_requests.signal, _requests.deferring, _requests.exit_code)
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    _requests.signal, _requests.deferring = None, False
    _requests.exit_code = EXIT_CODE if requeue_exit_code is None else requeue_exit_code
    for sig in SIGNALS:
        signal.signal(sig, _handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():  # None: set outside Python; the default is the best guess
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        _requests.signal, _requests.deferring, _requests.exit_code = outer


@contextmanager
def deferred() -> Iterator[None]:
    """Inside (the Trainer's folds) a signal is only recorded: ``StopCheck`` finds it at the next step or epoch.
    A signal recorded before stops here at once."""
    if _requests.signal is not None:
        raise Preempted(f"stopped by {_requests.signal} outside training (no step to finish)", _requests.exit_code)
    _requests.deferring = True
    try:
        yield
    finally:
        _requests.deferring = False


def stopped(where: str, resume_hint: str) -> Preempted:
    """The exception that ends a preempted training: what it finished and how to go on."""
    by = _requests.signal or "a preemption signal on another process"
    return Preempted(f"stopped by {by} after {where}; the last checkpoint holds it: continue with {resume_hint}",
                     _requests.exit_code)


@dataclass(frozen=True)
class StopCheck:
    """Whether training stops now: one answer on every rank. Alone, the recorded signal; under several processes
    the maximum of every rank's flag (all-reduced), asked at points every rank reaches together."""

    info: DistInfo
    device: torch.device

    def __call__(self, updates: int) -> bool:
        """Asked after each optimiser update (``updates`` so far in the fold): alone every time (a flag read);
        under several processes every ``CHECK_EVERY`` updates."""
        if self.info.enabled and updates % CHECK_EVERY:
            return False
        return self.now()

    def now(self) -> bool:
        """Asked at each epoch's start (every rank)."""
        flag = _requests.signal is not None
        if not self.info.enabled:
            return flag
        agreed = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return bool(agreed.item())
