"""Checkpoint policy for long runs: ``train.save_every_n_epochs`` keeps periodic weights, ``train.keep_best_k`` the K
best evaluated epochs, ``train.eval_every_n_epochs`` validates every N epochs (early stopping counts evaluations)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from conftest import Started, describe, only_run_dir, read_metrics, tiny_config, write_csv_dataset, write_yaml
from torch import nn

from vistrain.config.schema import TrainCfg
from vistrain.engine.device import pick_precision
from vistrain.engine.hooks import EarlyStopping, FoldRun, Hook
from vistrain.engine.loop import LoopOptions, TrainState
from vistrain.engine.optim import build_optimizer, build_scheduler
from vistrain.engine.trainer import run_epochs

METRICS = {"valid_loss", "macro_f1", "accuracy"}


@dataclass
class Runs:
    policy: Path  # epochs=4, save_every_n_epochs=2, keep_best_k=2
    every2: Path  # epochs=3, eval_every_n_epochs=2, early_stopping_patience=3


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("policy")
    data = write_csv_dataset(root / "data", classes=("a", "b", "c"), per_class=8)
    started = {}
    for name, train in (("policy", {"epochs": 4, "save_every_n_epochs": 2, "keep_best_k": 2}),
                        ("every2", {"epochs": 3, "eval_every_n_epochs": 2, "early_stopping_patience": 3})):
        cfg = tiny_config(data.root, output={"exp_dir": str(root / name), "logs_dir": None},
                          tracking={"tensorboard": False}, train={"batch_size": 4, **train})
        started[name] = Started("train", "--config", str(write_yaml(root / f"{name}.yaml", cfg)), cwd=root)
    for proc in started.values():
        result = proc.wait()
        assert result.returncode == 0, describe(result)
    return Runs(only_run_dir(root / "policy"), only_run_dir(root / "every2"))


def test_save_every_n_epochs_keeps_loadable_weights(runs: Runs) -> None:
    ckpt = runs.policy / "ckpt"
    model = timm.create_model("resnet10t", num_classes=3)
    for epoch in (2, 4):
        saved = torch.load(ckpt / f"epoch{epoch}_fold0.pth", weights_only=True)
        assert saved["epoch"] == epoch and saved["classes"] == ["a", "b", "c"]
        model.load_state_dict(saved["model"])
    assert not (ckpt / "epoch1_fold0.pth").exists() and not (ckpt / "epoch3_fold0.pth").exists()


def test_keep_best_k_keeps_exactly_the_k_best_monitor_epochs(runs: Runs) -> None:
    rows = read_metrics(runs.policy)
    # macro_f1 is maximised; equal values keep the earlier epoch (as NEW_BEST does)
    best2 = sorted(sorted(rows, key=lambda r: (-r["macro_f1"], r["epoch"]))[:2], key=lambda r: r["epoch"])
    kept = sorted(runs.policy.glob("ckpt/top_epoch*_fold0.pth"))
    epochs = sorted(int(re.fullmatch(r"top_epoch(\d+)_fold0\.pth", p.name).group(1)) for p in kept)
    assert epochs == [r["epoch"] for r in best2], (epochs, [(r["epoch"], r["macro_f1"]) for r in rows])
    for epoch, row in zip(epochs, best2):
        saved = torch.load(runs.policy / "ckpt" / f"top_epoch{epoch}_fold0.pth", weights_only=True)
        assert saved["epoch"] == epoch and saved["metrics"]["macro_f1"] == row["macro_f1"]
    assert (runs.policy / "ckpt" / "best_fold0.pth").is_file(), "best_fold{k}.pth stays the single best"


def test_eval_every_n_epochs_rows_and_log(runs: Runs) -> None:
    rows = read_metrics(runs.every2)
    assert [r["epoch"] for r in rows] == [1, 2, 3], "every epoch keeps exactly one row"
    assert not METRICS & set(rows[0]) and {"train_loss", "lr", "time_s"} <= set(rows[0]), rows[0]
    assert all(METRICS <= set(r) for r in rows[1:]), "epoch 2 (every 2nd) and 3 (the last) are evaluated"
    log = (runs.every2 / "train.log").read_text()
    assert "[CFG] validation every 2 epochs; early stopping patience counts evaluations (3 = 6 epochs)" in log
    epoch1 = next(ln for ln in log.splitlines() if "[EPOCH] fold=0 epoch=1/3" in ln)
    assert "macro_f1" not in epoch1 and "valid_loss" not in epoch1
    best = [int(m) for m in re.findall(r"NEW_BEST fold=0 epoch=(\d+)", log)]
    assert best and set(best) <= {2, 3}


def test_keep_best_k_ranking_survives_a_resume(tmp_path: Path) -> None:
    """Stopped after epoch 1 and resumed: the kept files are the 2 best of all 3 epochs, not of the resumed 2."""
    from vistrain.config import load_config
    from vistrain.engine.hooks import Reporter
    from vistrain.engine.training import run_train

    data = write_csv_dataset(tmp_path / "data", classes=("a", "b"), per_class=6)
    cfg = load_config(write_yaml(tmp_path / "cfg.yaml", tiny_config(
        data.root, output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None}, tracking={"tensorboard": False},
        train={"epochs": 3, "batch_size": 4, "keep_best_k": 2, "monitor": "valid_loss"})))

    def stop(row: dict[str, Any]) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, hooks=[Reporter(stop)])
    run_dir = run_train(cfg, resume=True).run_dir
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    best2 = sorted(r["epoch"] for r in sorted(rows, key=lambda r: (r["valid_loss"], r["epoch"]))[:2])
    kept = sorted(int(re.fullmatch(r"top_epoch(\d+)_fold0\.pth", p.name).group(1))
                  for p in run_dir.glob("ckpt/top_epoch*_fold0.pth"))
    assert kept == best2, ([(r["epoch"], r["valid_loss"]) for r in rows], kept)


# ------------------------------------------------------------------------------- the loop, on a toy task

class ConstantTask:
    """A task whose validation metric never changes: only the first evaluation improves on nothing."""

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        pass

    def training_loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        return nn.functional.cross_entropy(model(images), targets), {}

    def eval_outputs(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model(images)

    def eval_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        return None

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        return {"macro_f1": 0.5}


class Record(Hook):
    """Collects each epoch's row and the epochs that improved the monitor (after early stopping, as the
    checkpoints hook sees them)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.improved: list[int] = []

    def after_epoch(self, fold: FoldRun) -> None:
        self.rows.append(fold.row)
        if fold.improved:
            self.improved.append(fold.row["epoch"])


def _fit(epochs: int, every: int, patience: int) -> tuple[list[dict[str, Any]], list[int], EarlyStopping]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    t = TrainCfg(epochs=epochs, scheduler="plateau", warmup_epochs=0, eval_every_n_epochs=every,
                 early_stopping_patience=patience)
    optimizer = build_optimizer(model, t)
    stopper = EarlyStopping("macro_f1", patience, every)
    state = TrainState(model, optimizer, build_scheduler(optimizer, t, 1, stopper.mode),
                       torch.amp.GradScaler("cpu", enabled=False), seed=0)
    batch = [(torch.randn(6, 4), torch.tensor([0, 1] * 3), None)]
    record = Record()
    cpu = torch.device("cpu")
    run_epochs(FoldRun(fold=0, state=state, task=ConstantTask(), train_loader=batch, valid_loader=batch,
                       opts=LoopOptions(cpu, pick_precision("fp32", cpu), eval_every=every), epochs=epochs,
                       monitor="macro_f1", hooks=[stopper, record]))
    return record.rows, record.improved, stopper


def test_early_stopping_counts_evaluations() -> None:
    rows, improved, stopper = _fit(epochs=30, every=3, patience=2)
    # evaluations at 3 (first: best), 6 and 9 (no better): two evaluations without improvement stop after epoch 9
    assert [r["epoch"] for r in rows] == list(range(1, 10))
    assert [r["epoch"] for r in rows if "macro_f1" in r] == [3, 6, 9]
    assert improved == [3] and stopper.should_stop and stopper.best_epoch == 3


def test_the_last_epoch_is_always_evaluated() -> None:
    rows, improved, _ = _fit(epochs=4, every=3, patience=0)
    assert [r["epoch"] for r in rows if "macro_f1" in r] == [3, 4]
    assert [r["epoch"] for r in rows if "valid_loss" in r] == [3, 4], "no valid_loss key on unevaluated epochs"


def test_tune_reports_only_evaluated_epochs(tmp_path: Path) -> None:
    """A trial with train.eval_every_n_epochs reports the monitor of evaluated epochs and skips the others."""
    from vistrain.config.schema import Config
    from vistrain.tuning.run import _Context, _Reporter

    class Trial:
        def __init__(self) -> None:
            self.reported: list[tuple[float, int]] = []

        def report(self, value: float, step: int) -> None:
            self.reported.append((value, step))

        def should_prune(self) -> bool:
            return False

    trial = Trial()
    reporter = _Reporter(trial, _Context(Config(), [], tmp_path, [0], 4, "macro_f1", n_trials=1, shared=False))
    reporter({"fold": 0, "epoch": 1, "train_loss": 1.0, "lr": 0.1})
    reporter({"fold": 0, "epoch": 2, "train_loss": 0.9, "valid_loss": 0.8, "macro_f1": 0.5, "lr": 0.1})
    assert trial.reported == [(0.5, 2)]
