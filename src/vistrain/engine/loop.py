"""The training step and the evaluation pass: ``train_one_epoch`` and ``evaluate`` (``engine/trainer.py`` runs the
epochs around them, with hooks). A task object supplies the loss and the metrics, so every task shares this loop
and the loop never branches on the task."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from vistrain.engine.device import Precision, autocast
from vistrain.engine.distributed import SINGLE, DistInfo, EvalShard, all_reduce_floats, gather_to_main, unwrap
from vistrain.engine.preemption import StopCheck

log = logging.getLogger(__name__)


class Task(Protocol):
    """What the loop and the Trainer ask of a task (see engine/tasks.py)."""

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None: ...  # epoch is 0-based
    def training_loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]: ...  # loss, its parts
    def mix_batch(self, images: torch.Tensor, targets: torch.Tensor, mixed: int
                  ) -> tuple[torch.Tensor, torch.Tensor]: ...  # what training_loss gives the model (mixup)
    def eval_outputs(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor: ...
    def eval_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None: ...
    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...  # in the last checkpoint (center-loss centres)
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """Everything a resumed fold needs; ``state_dict`` is what goes into the checkpoint."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # timm Scheduler
    scaler: torch.amp.GradScaler
    seed: int  # reseeds shuffling and augmentation every epoch, so a resumed epoch draws the same batches
    # timm ModelEmaV3 when train.ema (made by the EMA hook): evaluated and saved as best instead of the raw weights
    ema: Any = None
    epoch: int = 0  # completed epochs
    num_updates: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # A checkpoint written in the middle of epoch ``epoch + 1`` (a preemption): the batches of it already trained
    # (the loader leaves them out on resume) and the loss sums over them (``_LossSums.state_dict``); 0 and None
    # between epochs.
    step: int = 0
    epoch_sums: dict[str, Any] | None = None

    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and saved as best: the EMA when there is one."""
        return self.ema.module if self.ema is not None else unwrap(self.model)

    def state_dict(self) -> dict[str, Any]:
        """The last checkpoint's training state; ``ema`` sits beside ``model`` because the weights files read it
        from there (the EMA hook, which creates the average, loads it back)."""
        return {
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "num_updates": self.num_updates,
            "history": self.history,
            "step": self.step,
            "epoch_sums": self.epoch_sums,
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.num_updates, self.history = ckpt["epoch"], ckpt["num_updates"], list(ckpt["history"])
        self.step, self.epoch_sums = ckpt.get("step", 0), ckpt.get("epoch_sums")  # older checkpoints: epoch ends


@dataclass(frozen=True)
class LoopOptions:
    device: torch.device
    precision: Precision
    grad_accum_steps: int = 1
    grad_clip_norm: float | None = None
    channels_last: bool = False
    log_interval: int = 50
    progress: bool = False  # a tqdm bar (terminals only); plain log lines otherwise
    label: str = ""  # "fold 0" in progress lines
    row_prefix: dict[str, Any] = field(default_factory=dict)  # leading fields of each metrics row ({"fold": 0})
    dist: DistInfo = SINGLE  # several processes: losses and rates summed over the ranks, rank 0's validation row
    sync_bn: bool = False  # train.sync_bn: BatchNorm synchronised in the forward; else averaged before evaluation
    # asked after each optimiser update: True ends the epoch there, mid-epoch checkpoint to follow (preemption)
    stop: StopCheck | None = None
    eval_every: int = 1  # validate every N epochs and at the last one; early stopping counts evaluations
    # training batches on the device -> the model's input (augment.device: uint8 -> augmented, normalised float)
    batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None


def _to_device(images: torch.Tensor, targets: torch.Tensor, opt: LoopOptions,
               transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(opt.device, non_blocking=True)
    if transform is not None:
        images = transform(images)
    if opt.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(opt.device, non_blocking=True)


class _LossSums:
    """Batch-weighted sums of the loss and its parts, kept on the device: adding one is an asynchronous kernel, so
    the host never waits for the device on a step; ``read`` copies them back (one synchronisation). Under several
    processes ``read`` sums them over the ranks first (one all-reduce, at the same steps on every rank): the means
    are the whole job's, weighted by images, and a non-finite loss on any rank is non-finite on all of them, so
    the divergence guard stops every rank at the same step."""

    def __init__(self, device: torch.device, info: DistInfo = SINGLE, saved: dict[str, Any] | None = None):
        """``saved``: the job's sums over the batches a mid-epoch checkpoint trained (``state_dict``), to go on
        from; under several processes rank 0 holds them and the other ranks start from zero."""
        self.device, self.info = device, info
        self.total = torch.zeros((), device=device)
        self.window = torch.zeros((), device=device)  # since the last read: where a non-finite loss is looked for
        self.parts: dict[str, torch.Tensor | float] = {}
        self.count = 0
        self.window_count = 0
        if saved is not None and info.rank == 0:
            self.total = saved["total"].to(device)
            self.parts = {k: v.to(device) if torch.is_tensor(v) else v for k, v in saved["parts"].items()}
            self.count = saved["count"]
        self.resumed = self.count  # images counted before this process: not in its img_per_s

    def state_dict(self) -> dict[str, Any]:
        """The sums so far, for a checkpoint in the middle of the epoch: adding the rest to them gives the bits the
        uninterrupted epoch would have. Under several processes they are summed over the ranks (a collective:
        every rank calls it at the same step)."""
        total, count = self.total.detach().clone(), self.count
        parts = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in self.parts.items()}
        if self.info.enabled:
            stacked = torch.stack([total.double(), *(torch.as_tensor(v, device=self.device).double()
                                                     for v in parts.values()),
                                   torch.tensor(float(count), dtype=torch.float64, device=self.device)])
            torch.distributed.all_reduce(stacked)
            total_d, *parts_d, count_d = stacked.tolist()
            total = torch.tensor(total_d, dtype=torch.float32)
            parts = {k: torch.tensor(v, dtype=torch.float32) for k, v in zip(parts, parts_d)}
            count = int(round(count_d))
        return {"total": total.cpu(), "parts": {k: v.cpu() if torch.is_tensor(v) else v for k, v in parts.items()},
                "count": count}

    def add(self, loss: torch.Tensor, parts: dict[str, Any], batch: int) -> None:
        weighted = loss.detach().float() * batch
        self.total += weighted
        self.window += weighted
        for name, value in parts.items():
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            self.parts[name] = self.parts.get(name, 0.0) + value * batch
        self.count += batch
        self.window_count += batch

    def read(self) -> tuple[float, float, dict[str, float]]:
        """(mean loss of the window since the last read, mean loss so far, mean of each part so far)."""
        values = [self.window, self.total, *(torch.as_tensor(v, device=self.device) for v in self.parts.values())]
        counts = torch.tensor([self.window_count, self.count], dtype=torch.float64, device=self.device)
        stacked = torch.cat([torch.stack([v.double() for v in values]), counts])
        if self.info.enabled:
            torch.distributed.all_reduce(stacked)
        window, total, *parts, window_count, count = stacked.tolist()
        self.window.zero_()
        self.window_count = 0
        return window / max(window_count, 1), total / max(count, 1), {k: v / count for k, v in zip(self.parts, parts)}


@dataclass(frozen=True)
class Step:
    """One training batch, as the ``after_step`` hooks see it."""

    index: int  # 1-based batch number in the epoch
    updated: bool  # the optimiser stepped after this batch (every grad_accum_steps batches and the epoch's last)
    # The mean loss of batches window_start..index, read from the device at this batch (every log_interval batches
    # and the epoch's last: the one host synchronisation there is); None between reads.
    window_loss: float | None
    window_start: int


def _group_size(step: int, n_batches: int, accum: int) -> int:
    """How many batches the optimiser update that ``step`` (1-based) belongs to averages: ``accum``, or fewer in a
    short last group (timm's train.py: its losses are divided by its own length, so each update is a mean)."""
    tail = n_batches % accum
    return tail if tail and step > n_batches - tail else accum


def train_one_epoch(state: TrainState, task: Task, loader: DataLoader, opt: LoopOptions,
                    after_step: Callable[[Step], None] | None = None) -> dict[str, float] | None:
    """One pass over ``loader``; returns the mean training loss, the mean of each loss part, ``img_per_s`` (training
    images per second, data loading included) and ``data_wait_frac`` (the share of the epoch spent waiting for the
    next batch). ``after_step(step)`` runs after every batch (the trainer's hooks: EMA, divergence guard). Under
    several processes the means are over every rank's images, ``img_per_s`` the ranks' sum, ``data_wait_frac``
    their mean, and DDP all-reduces the gradients only at an optimiser update (``no_sync`` on the other batches).

    Losses stay on the device and are read every ``opt.log_interval`` steps and at the epoch's last batch, so the
    host waits for the device only there; ``Step.window_loss`` carries what was read.

    A mid-epoch checkpoint's epoch (``state.step`` > 0) goes on from its batch ``state.step + 1``: the loader leaves
    out the batches before (``EpochBatches``) and the loss sums start from ``state.epoch_sums``. When ``opt.stop``
    says so after an optimiser update, the epoch ends there: ``state.step`` and ``state.epoch_sums`` say how far it
    got (for the last checkpoint) and the return value is None."""
    model, optimizer = state.model, state.optimizer
    model.train()
    start = state.step
    n_batches = start + len(loader)
    bar = tqdm(total=n_batches, initial=start, desc=f"{opt.label} epoch {state.epoch + 1}", leave=False,
               disable=not opt.progress, dynamic_ncols=True)
    sums = _LossSums(opt.device, opt.dist, state.epoch_sums)
    optimizer.zero_grad(set_to_none=True)
    started = ready = time.perf_counter()
    waited, read_from, last_read = 0.0, start + 1, None
    for step, (images, targets, _) in enumerate(loader, start=start + 1):
        waited += time.perf_counter() - ready
        images, targets = _to_device(images, targets, opt, opt.batch_transform)
        updated = step % opt.grad_accum_steps == 0 or step == n_batches
        # DDP: a batch that does not step the optimiser keeps its gradients local (they add up in .grad)
        local = model.no_sync() if not updated and hasattr(model, "no_sync") else contextlib.nullcontext()
        with local:
            with autocast(opt.device, opt.precision):
                loss, parts = task.training_loss(model, images, targets)
            state.scaler.scale(loss / _group_size(step, n_batches, opt.grad_accum_steps)).backward()
        if updated:
            if opt.grad_clip_norm:
                state.scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip_norm)
            state.scaler.step(optimizer)
            state.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state.num_updates += 1
            state.scheduler.step_update(num_updates=state.num_updates)
        sums.add(loss, parts, images.shape[0])
        bar.update(1)
        # Only after an update: the gradients of an unfinished accumulation group are in no checkpoint.
        stopping = updated and step < n_batches and opt.stop is not None and opt.stop(state.num_updates)
        logged = bool(opt.log_interval) and step % opt.log_interval == 0
        window = mean = None
        if logged or step == n_batches or stopping:
            last_read = sums.read()
            window, mean, _ = last_read
        if after_step is not None:
            after_step(Step(step, updated, window, read_from))
        if window is not None:
            read_from = step + 1
        if logged:
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
            if not opt.progress:
                log.info("[TRAIN] %s epoch=%d step=%d/%d loss=%.4f lr=%.3e", opt.label, state.epoch + 1, step,
                         n_batches, mean, lr)
        if stopping:
            bar.close()
            state.step, state.epoch_sums = step, sums.state_dict()
            return None
        ready = time.perf_counter()
    bar.close()
    if last_read is None:
        raise RuntimeError("the training loader yielded no batch")
    _, mean, parts_mean = last_read  # read at the last batch: nothing was added since
    seconds = max(time.perf_counter() - started, 1e-9)
    state.step, state.epoch_sums = 0, None
    img_per_s, wait = all_reduce_floats(opt.dist, [(sums.count - sums.resumed) / seconds, waited / seconds],
                                        opt.device)
    return {"train_loss": mean, **parts_mean, "img_per_s": round(img_per_s, 1),
            "data_wait_frac": round(wait / opt.dist.world, 4)}


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, loader: DataLoader, opt: LoopOptions
             ) -> tuple[float | None, torch.Tensor | None, torch.Tensor | None]:
    """Model outputs for every item of ``loader`` in order: (mean loss or None when the task has no validation
    loss, outputs [N, ...] fp32 CPU, targets [N]). A loader sharded over the ranks (``EvalShard``) evaluates this
    rank's share; rank 0 gets every rank's outputs in order, the other ranks (None, None, None)."""
    model.eval()
    outputs, targets_all = [], []
    for images, targets, _ in tqdm(loader, desc=f"{opt.label} eval", leave=False, disable=not opt.progress):
        images, targets = _to_device(images, targets, opt)
        with autocast(opt.device, opt.precision):
            out = task.eval_outputs(model, images)
        outputs.append(out.float().cpu())
        targets_all.append(targets.cpu())
    if isinstance(getattr(loader, "sampler", None), EvalShard):
        shards = gather_to_main(opt.dist, (outputs, targets_all))
        if shards is None:
            return None, None, None
        outputs, targets_all = [o for shard, _ in shards for o in shard], [t for _, shard in shards for t in shard]
    out, tgt = torch.cat(outputs), torch.cat(targets_all)
    loss = task.eval_loss(out, tgt)
    return (None if loss is None else float(loss)), out, tgt
