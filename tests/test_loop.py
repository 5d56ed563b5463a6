"""The training loop does not wait on the device each step: losses are read at ``log_interval`` and at the epoch
end (where a non-finite loss is caught, named with its step range); each epoch reports ``img_per_s`` and
``data_wait_frac``; ``train.compile`` and ``train.channels_last: auto``."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from test_checkpoint_policy import ConstantTask
from torch import nn

from vistrain.config.loader import validate
from vistrain.engine.device import pick_precision
from vistrain.engine.hooks import DivergedError, DivergenceGuard, FoldRun, Hook
from vistrain.engine.loop import LoopOptions, TrainState, train_one_epoch
from vistrain.engine.optim import build_optimizer
from vistrain.engine.trainer import run_epochs
from vistrain.errors import ConfigError
from vistrain.models.build import compile_model, is_convolutional

CPU = torch.device("cpu")


class Scheduler:
    def step_update(self, num_updates: int) -> None: ...
    def step(self, epoch: int, metric: Any = None) -> None: ...


class Task(ConstantTask):
    """Cross-entropy of a linear model (validation as ``ConstantTask``); ``nan_at`` (1-based step) makes that step's
    loss NaN."""

    def __init__(self, nan_at: int | None = None):
        self.nan_at, self.step = nan_at, 0

    def training_loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.step += 1
        loss = nn.functional.cross_entropy(model(images), targets)
        if self.step == self.nan_at:
            loss = loss * float("nan")
        return loss, {"loss_ce": loss.detach()}


class Batches:
    """``n`` batches of 6; each takes ``delay`` seconds to arrive (a slow data path)."""

    def __init__(self, n: int, delay: float = 0.0):
        self.n, self.delay = n, delay
        self.data = [(torch.randn(6, 4), torch.tensor([0, 1] * 3), None) for _ in range(n)]

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Any]:
        for batch in self.data:
            time.sleep(self.delay)
            yield batch


def make_state() -> TrainState:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # no .item() inside its step
    return TrainState(model, optimizer, Scheduler(), torch.amp.GradScaler("cpu", enabled=False), seed=0)


def opts(log_interval: int) -> LoopOptions:
    return LoopOptions(CPU, pick_precision("fp32", CPU), log_interval=log_interval, label="fold 0")


def test_losses_are_read_at_log_interval_not_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__"):
        real = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *a: Any, _real: Any = real, _name: str = name, **k: Any) -> Any:
            reads.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    out = train_one_epoch(make_state(), Task(), Batches(12), opts(log_interval=4))
    monkeypatch.undo()
    assert len(reads) <= 4, reads  # at steps 4, 8, 12 and the epoch's means: never once per step
    assert out["train_loss"] == pytest.approx(out["loss_ce"]) and out["train_loss"] > 0


def fold_run(state: TrainState, task: Any, train: Any, valid: Any, epochs: int, options: LoopOptions,
             hooks: list[Hook]) -> FoldRun:
    return FoldRun(fold=0, state=state, task=task, train_loader=train, valid_loader=valid, opts=options,
                   epochs=epochs, monitor="macro_f1", hooks=hooks)


class Rows(Hook):
    """Collects each epoch's row."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def after_epoch(self, fold: FoldRun) -> None:
        self.rows.append(fold.row)


@pytest.mark.parametrize(("log_interval", "steps"), [(4, "steps 5-8"), (0, "steps 1-10")])
def test_a_nan_loss_is_caught_with_its_step_range(log_interval: int, steps: str) -> None:
    """The divergence guard sees the loss where the loop reads it anyway, and names the steps that read covers."""
    state, task, batches, options = make_state(), Task(nan_at=6), Batches(10), opts(log_interval)
    fold = fold_run(state, task, batches, Batches(1), 1, options, [DivergenceGuard()])
    with pytest.raises(DivergedError, match=rf"^training loss is nan at fold 0 epoch 1 {steps}; lower train.lr"):
        run_epochs(fold)


def test_each_epoch_reports_throughput_and_data_wait() -> None:
    state = make_state()
    fast = train_one_epoch(state, Task(), Batches(8), opts(0))  # also the warm-up of autograd's first call
    rows = Rows()
    run_epochs(fold_run(state, Task(), Batches(8, delay=0.1), Batches(1), 2, opts(0), [rows]))
    row = rows.rows[0]
    assert set(row) >= {"img_per_s", "data_wait_frac"}
    assert row["data_wait_frac"] > 0.5, row  # 0.8 s of the epoch waiting for batches
    assert row["img_per_s"] <= 48 / 0.8, row  # no faster than the data arrives
    assert fast["data_wait_frac"] < row["data_wait_frac"] and fast["img_per_s"] > row["img_per_s"]


# ------------------------------------------------------------------------------------- speed settings

def test_compile_that_fails_trains_without_it_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: nn.Module, *a: Any, **k: Any) -> None:
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(nn.Module, "compile", broken)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("vistrain.models.build")
    logger.addHandler(handler)
    try:
        model = nn.Linear(4, 2)
        compile_model(model, "max-autotune")
    finally:
        logger.removeHandler(handler)
    assert lines == ["[FALLBACK] train.compile: torch.compile -> eager: RuntimeError: no compiler here (--strict makes "
                     "this an error)"]
    assert model(torch.randn(2, 4)).shape == (2, 2)


def test_compile_and_channels_last_keys() -> None:
    base = {"data": {"train_csv": "x.csv"}}
    assert validate({**base, "train": {"compile": "max-autotune"}}).train.compile == "max-autotune"
    assert validate({**base, "train": {"compile": True}}).train.compile is True
    assert validate(base).train.channels_last == "auto" and validate(base).train.compile is False
    with pytest.raises(ConfigError, match="train.compile"):
        validate({**base, "train": {"compile": "fast"}})


def test_channels_last_auto_is_for_convolutional_models() -> None:
    assert is_convolutional("resnet10t")
    assert not is_convolutional("vit_tiny_patch16_224")


def test_adamw_is_not_fused_on_the_cpu() -> None:
    from vistrain.config.schema import TrainCfg

    opt = build_optimizer(nn.Linear(4, 2), TrainCfg())
    assert not opt.defaults.get("fused")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adamw_is_fused_on_cuda() -> None:
    from vistrain.config.schema import TrainCfg

    assert build_optimizer(nn.Linear(4, 2).cuda(), TrainCfg()).defaults.get("fused") is True
