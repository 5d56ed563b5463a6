"""The Trainer: trains the folds of a run, each through its epochs (``engine/loop.py``'s ``train_one_epoch`` and
``evaluate``), and calls the fold's hooks (``engine/hooks/``) in their order at ``before_train``,
``before_epoch``, ``after_step``, ``after_epoch`` and ``after_train``. Everything a run does besides training
(checkpoints, early stopping, EMA, metrics rows, OOF logits, the divergence guard, tune's reports) is a hook.

Per fold: seed, the task's setup (``SETUPS``: model, loaders, task object), DDP wrap, optimiser, schedule and
``TrainState``; the hooks; when resuming, the last checkpoint restores the state, the task, the RNG and every
hook's state; ``before_train``; ``torch.compile``; then the epochs.

A preemption signal (``engine/preemption.py``) during the folds ends the epoch after its current optimiser update
(or before the next epoch); ``after_train`` then writes the last checkpoint of the unfinished fold and the Trainer
raises ``Preempted``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vistrain._version import __version__
from vistrain.config.loader import config_to_dict
from vistrain.config.schema import Config
from vistrain.data.prepare import Prepared
from vistrain.data.preprocess import Preprocessor
from vistrain.engine import distributed, preemption
from vistrain.engine.checkpoint import load_checkpoint, seed_everything, set_rng_state
from vistrain.engine.device import peak_memory_mib
from vistrain.engine.hooks import FoldRun, Hook, default_hooks, monitor_mode
from vistrain.engine.hooks.metrics import RESUME_HINT
from vistrain.engine.loop import LoopOptions, TrainState, evaluate, train_one_epoch
from vistrain.engine.optim import build_optimizer, build_scheduler
from vistrain.engine.run_setup import Machine
from vistrain.engine.setup import SETUPS, FoldSetup, batch_transform, fold_seed
from vistrain.engine.summary import fold_result
from vistrain.errors import Preempted
from vistrain.fallbacks import Fallbacks
from vistrain.models.build import compile_fallbacks, compile_model, count_parameters
from vistrain.tracking.logs import show_progress
from vistrain.tracking.rundir import RunDir
from vistrain.tracking.writers import Trackers

log = logging.getLogger(__name__)


class Trainer:
    """Trains ``folds`` of one run. ``extra_hooks`` run after the default ones in every fold, so after the metrics
    row (``tune`` reports there). They are observers: what they change at ``after_epoch`` is not in that epoch's
    last checkpoint, so a behaviour with state goes into ``default_hooks`` above ``Checkpoints``. Unlike the
    default hooks, built afresh per fold, they are shared by the folds."""

    def __init__(self, cfg: Config, data: Prepared, run: RunDir, machine: Machine, info: distributed.DistInfo,
                 trackers: Trackers, extra_hooks: Sequence[Hook] = (), fallbacks: Fallbacks | None = None):
        self.cfg, self.data, self.run, self.machine, self.info = cfg, data, run, machine, info
        self.trackers, self.extra_hooks = trackers, list(extra_hooks)
        self.fallbacks = fallbacks or Fallbacks()  # torch.compile -> eager (summary.json's fallbacks)

    def fit(self, folds: list[int]) -> list[dict[str, Any]]:
        """Each fold's summary entry (``engine.summary.fold_result``). A preemption signal meanwhile stops the
        training at the next step in good order (``Preempted``). run.json's ``folds_done`` grows after each fold
        (``vistrain runs`` shows a run's progress before its summary.json exists)."""
        results = []
        with preemption.deferred(), compile_fallbacks(self.cfg.train.compile, self.fallbacks):
            for k in folds:
                results.append(self.train_fold(k))
                if self.info.is_main:
                    self.run.record(folds_done=[r["fold"] for r in results])
        return results

    def train_fold(self, k: int) -> dict[str, Any]:
        t = self.cfg.train
        fold = self._build(k)
        self._restore(fold)
        fold.call("before_train")
        # after before_train: the EMA copies first
        compile_model(distributed.unwrap(fold.state.model), t.compile, self.fallbacks)
        if fold.restored is not None:
            if fold.restored.get("finished"):
                log.info("[RESUME] fold=%d already finished (%d epochs); skipped", k, fold.state.epoch)
                return fold_result(fold, fold.restored.get("time_s", 0.0))
            if fold.state.step:  # written by a preemption in the middle of an epoch
                log.info("[RESUME] fold=%d in epoch %d of %d after its step %d", k, fold.state.epoch + 1, t.epochs,
                         fold.state.step)
            else:
                log.info("[RESUME] fold=%d from epoch %d of %d", k, fold.state.epoch, t.epochs)
        run_epochs(fold)
        fold.call("after_train")
        if fold.interrupted:
            raise self._stopped(fold)
        return fold_result(fold, time.time() - fold.started)

    def _stopped(self, fold: FoldRun) -> Preempted:
        """What a preempted fold finished, logged, as the exception that ends the command."""
        state = fold.state
        where = (f"fold {fold.fold} epoch {state.epoch + 1} step {state.step}" if state.step
                 else f"fold {fold.fold} epoch {state.epoch}")
        err = preemption.stopped(where, f"vistrain train --resume {self.run.path}")
        log.warning("[STOP] %s", err)
        return err

    def _build(self, k: int) -> FoldRun:
        """The fold's setup, optimiser, schedule, state and hooks, from a seed of its own."""
        cfg, t, info = self.cfg, self.cfg.train, self.info
        seed_everything(cfg.project.seed + k)
        setup = SETUPS[cfg.task](cfg, self.data, k, self.machine.device, info)
        model = setup.model
        if t.sync_bn:
            model = distributed.sync_batchnorm(model, info, self.machine.device)
        # A frozen backbone leaves parameters without gradients, which DDP must be told to expect.
        model = distributed.wrap(model, info, self.machine.device, find_unused=t.freeze_backbone_epochs > 0)
        optimizer = build_optimizer(setup.params, t)
        updates = -(-len(setup.train_loader) // t.grad_accum_steps)
        state = TrainState(model=model, optimizer=optimizer,
                           scheduler=build_scheduler(optimizer, t, updates, monitor_mode(t.monitor)),
                           scaler=torch.amp.GradScaler(self.machine.device.type,
                                                       enabled=self.machine.precision.use_scaler),
                           seed=fold_seed(cfg.project.seed, k))
        self._log_model(k, setup)
        hooks = default_hooks(cfg, k, self.run, self.trackers, setup.keep_valid_outputs) + self.extra_hooks
        meta = {"fold": k, "classes": self.data.classes, "preprocess": setup.preprocessor.to_dict(),
                "config": config_to_dict(cfg), "task": cfg.task, "vistrain_version": __version__}
        return FoldRun(fold=k, state=state, task=setup.task, train_loader=setup.train_loader,
                       valid_loader=setup.valid_loader, opts=self._options(k, setup.preprocessor), epochs=t.epochs,
                       monitor=t.monitor, hooks=[h for h in hooks if info.is_main or not h.main_only], run=self.run,
                       info=info, meta=meta)

    def _options(self, k: int, pre: Preprocessor) -> LoopOptions:
        cfg, t = self.cfg, self.cfg.train
        return LoopOptions(device=self.machine.device, precision=self.machine.precision,
                           grad_accum_steps=t.grad_accum_steps, grad_clip_norm=t.grad_clip_norm,
                           channels_last=t.channels_last is True, log_interval=t.log_interval,
                           batch_transform=batch_transform(cfg, pre, self.machine.device),
                           progress=show_progress() and self.info.is_main, label=f"fold {k}", row_prefix={"fold": k},
                           dist=self.info, sync_bn=t.sync_bn, eval_every=t.eval_every_n_epochs,
                           stop=preemption.StopCheck(self.info, self.machine.device))

    def _log_model(self, k: int, setup: FoldSetup) -> None:
        total, trainable = count_parameters(setup.model)
        log.info("[MODEL] fold=%d %s | pooling=%s | weights=%s | params=%.2fM (trainable %.2fM) | %s | "
                 "train=%d valid=%d | batches/epoch=%d", k, self.cfg.model.name, self.cfg.model.pooling, setup.weights,
                 total / 1e6, trainable / 1e6, setup.preprocessor.describe(), len(setup.train_loader.dataset),
                 setup.n_valid, len(setup.train_loader))

    def _restore(self, fold: FoldRun) -> None:
        """A resumed fold with a last checkpoint: its training state, the task's state, the RNG and the hooks'
        states. A checkpoint of vistrain before hooks holds only early stopping's, under its own key."""
        path = self.run.ckpt("last", fold.fold)
        if not (self.run.resumed and path.is_file()):
            return
        ckpt = load_checkpoint(path, self.machine.device, hint=RESUME_HINT)
        fold.state.load_state_dict(ckpt)
        fold.task.load_state_dict(ckpt.get("task_state", {}))
        set_rng_state(ckpt["rng"])
        states = ckpt.get("hooks", {"early_stopping": ckpt.get("early_stopping")})
        for hook in fold.hooks:
            if states.get(hook.name) is not None:
                hook.load_state_dict(states[hook.name])
        fold.restored = ckpt
        fold.started = time.time() - (fold.state.history[-1].get("fold_time_s", 0.0) if fold.state.history else 0.0)


def run_epochs(fold: FoldRun) -> None:
    """Train from ``fold.state.epoch`` to ``fold.epochs`` or until a hook stops it; validate every
    ``opts.eval_every`` epochs and at the last. An epoch without validation has a row of training values only.
    A preemption signal ends it with ``fold.interrupted`` (mid-epoch: ``state.step`` says where)."""
    state, opts = fold.state, fold.opts
    while state.epoch < fold.epochs and not fold.stop:
        if opts.stop is not None and opts.stop.now():  # a preemption signal since the last epoch
            fold.interrupted = True
            return
        start = time.time()
        if opts.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(opts.device)
        fold.task.on_epoch_start(state.model, state.epoch)
        fold.call("before_epoch")
        train = train_one_epoch(state, fold.task, fold.train_loader, opts, fold.after_step)
        if train is None:  # stopped after an optimiser update by a preemption signal
            fold.interrupted = True
            return
        if not opts.sync_bn:  # every epoch: the last checkpoint, and so a resume, has the statistics all ranks share
            averages = [state.ema.module] if state.ema is not None else []
            distributed.distribute_bn(opts.dist, distributed.unwrap(state.model), *averages)
        row = {**opts.row_prefix, "epoch": state.epoch + 1, **train}
        fold.outputs, fold.monitor_value, fold.improved = None, None, False
        if (state.epoch + 1) % opts.eval_every == 0 or state.epoch + 1 == fold.epochs:
            row.update(validate(fold))
            fold.monitor_value = row[fold.monitor]
        row["lr"] = state.optimizer.param_groups[0]["lr"]
        state.epoch += 1
        state.scheduler.step(state.epoch, metric=fold.monitor_value)  # plateau: only evaluated epochs count
        row["time_s"] = round(time.time() - start, 3)
        (mem,) = distributed.all_reduce_floats(opts.dist, [peak_memory_mib(opts.device)], opts.device, op="max")
        row["mem_MiB"] = round(mem, 1)
        row = {k: (float(v) if isinstance(v, np.floating) else v) for k, v in row.items()}
        row["fold_time_s"] = round(time.time() - fold.started, 3)
        state.history.append(row)
        fold.row = row
        fold.call("after_epoch")


def validate(fold: FoldRun) -> dict[str, Any]:
    """The epoch's validation entries (``valid_loss`` and the task's metrics) on every rank. Under several processes
    each rank evaluates its shard, rank 0 scores the gathered outputs (``fold.outputs``) once and sends the entries
    to the others (or its error, so no rank waits for a row that never comes)."""
    state, opts = fold.state, fold.opts
    valid_loss, fold.outputs, targets = evaluate(state.eval_model(), fold.task, fold.valid_loader, opts)
    return distributed.from_main(opts.dist, lambda: {"valid_loss": valid_loss,
                                                     **fold.task.metrics(fold.outputs, targets)})
