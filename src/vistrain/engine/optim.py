"""Optimisers and learning-rate schedules from ``train.*`` (timm's implementations).

Every schedule is stepped the same way by the loop: ``step_update(n)`` after each optimiser step and
``step(epoch, metric)`` after each epoch; per-update schedules ignore the second, plateau the first. The names are
``vistrain.registry``'s ``OPTIMIZERS`` (each with timm's name) and ``SCHEDULERS`` (registered below).
"""

from __future__ import annotations

from typing import Any

from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PlateauLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn
from torch.optim import Optimizer

from vistrain.config.schema import TrainCfg
from vistrain.registry import OPTIMIZERS, SCHEDULERS


def build_optimizer(params: nn.Module | list[dict[str, Any]], cfg: TrainCfg) -> Optimizer:
    """Weight decay is skipped for biases and norm layers (timm's ``filter_bias_and_bn``)."""
    opt = OPTIMIZERS.lookup(cfg.optimizer)  # timm's name
    extra: dict[str, Any] = {"momentum": cfg.momentum, "nesterov": True} if opt == "momentum" else {}
    if opt in ("adamw", "adam") and _on_cuda(params):
        extra["fused"] = True  # one kernel updates every tensor: no per-tensor launches on the step
    return create_optimizer_v2(params, opt=opt, lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)


def _on_cuda(params: nn.Module | list[dict[str, Any]]) -> bool:
    tensors = params.parameters() if isinstance(params, nn.Module) else (p for g in params for p in g["params"])
    first = next(iter(tensors), None)
    return first is not None and first.is_cuda


def _warmup(cfg: TrainCfg, upe: int) -> dict[str, Any]:
    return {"warmup_t": round(cfg.warmup_epochs * upe), "warmup_lr_init": cfg.lr * cfg.warmup_lr_factor}


@SCHEDULERS.register("cosine")
def cosine(opt: Optimizer, cfg: TrainCfg, upe: int, mode: str) -> Scheduler:
    return CosineLRScheduler(opt, t_initial=cfg.epochs * upe, lr_min=cfg.min_lr, t_in_epochs=False,
                             **_warmup(cfg, upe))


@SCHEDULERS.register("cosine_restarts")
def cosine_restarts(opt: Optimizer, cfg: TrainCfg, upe: int, mode: str) -> Scheduler:
    # SGDR: cycles of restart_epochs * restart_mult**i, each back to the full lr (no decay across cycles).
    return CosineLRScheduler(opt, t_initial=cfg.restart_epochs * upe, lr_min=cfg.min_lr, t_in_epochs=False,
                             cycle_mul=cfg.restart_mult, cycle_decay=1.0, cycle_limit=10_000, **_warmup(cfg, upe))


@SCHEDULERS.register("step")
def step(opt: Optimizer, cfg: TrainCfg, upe: int, mode: str) -> Scheduler:
    return MultiStepLRScheduler(opt, decay_t=[m * upe for m in cfg.step_milestones], decay_rate=cfg.step_gamma,
                                t_in_epochs=False, **_warmup(cfg, upe))


@SCHEDULERS.register("plateau")
def plateau(opt: Optimizer, cfg: TrainCfg, upe: int, mode: str) -> Scheduler:
    # Plateau reacts to the epoch's metric, so its warm-up counts epochs too.
    return PlateauLRScheduler(opt, decay_rate=cfg.step_gamma, patience_t=cfg.plateau_patience, mode=mode,
                              lr_min=cfg.min_lr, warmup_t=round(cfg.warmup_epochs),
                              warmup_lr_init=cfg.lr * cfg.warmup_lr_factor)


@SCHEDULERS.register("none")
def constant(opt: Optimizer, cfg: TrainCfg, upe: int, mode: str) -> Scheduler:
    return StepLRScheduler(opt, decay_t=10**9, decay_rate=1.0, t_in_epochs=False, **_warmup(cfg, upe))


def build_scheduler(opt: Optimizer, cfg: TrainCfg, updates_per_epoch: int, monitor_mode: str) -> Scheduler:
    """``updates_per_epoch`` counts optimiser steps (batches / grad_accum_steps)."""
    return SCHEDULERS.lookup(cfg.scheduler)(opt, cfg, max(updates_per_epoch, 1), monitor_mode)
