"""The Trainer's hooks (issue 19 item 1): every hook's state is in the last checkpoint and comes back on resume, an
extra hook is one object passed to ``run_train``, and a last checkpoint of vistrain before hooks still resumes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import read_metrics, tiny_config, write_csv_dataset, write_yaml

from vistrain.config import load_config
from vistrain.engine.hooks import FoldRun, Hook, Reporter
from vistrain.engine.loop import Step
from vistrain.engine.training import run_train


class CountSteps(Hook):
    """A stateful extra hook: counts the optimiser updates and the epochs it saw start, and records what it was
    given back on resume. (Extra hooks run after the metrics row, so they count at ``before_epoch`` and
    ``after_step``: what they change at ``after_epoch`` is not in that epoch's checkpoint.)"""

    name = "count_steps"

    def __init__(self) -> None:
        self.updates, self.epochs, self.restored = 0, 0, []

    def after_step(self, fold: FoldRun, step: Step) -> None:
        self.updates += step.updated

    def before_epoch(self, fold: FoldRun) -> None:
        self.epochs += 1

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restored.append(dict(state))
        self.updates, self.epochs = state["updates"], state["epochs"]


def stop_after_epoch(row: dict[str, Any]) -> None:
    raise KeyboardInterrupt  # as Ctrl-C once the row is written


@pytest.fixture
def cfg(tmp_path: Path) -> Any:
    data = write_csv_dataset(tmp_path / "data", classes=("a", "b"), per_class=8, size=16)
    raw = tiny_config(data.root, train={"epochs": 3, "batch_size": 4, "early_stopping_patience": 5},
                      output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None}, tracking={"tensorboard": False})
    return load_config(write_yaml(tmp_path / "cfg.yaml", raw))


def test_every_hook_state_is_in_the_last_checkpoint_and_comes_back_on_resume(cfg: Any) -> None:
    counter = CountSteps()
    with pytest.raises(KeyboardInterrupt):  # the extra hooks run after the defaults, in the order given
        run_train(cfg, hooks=[counter, Reporter(stop_after_epoch)])
    (last,) = Path(cfg.output.exp_dir).glob("*/*/ckpt/last_fold0.pth")
    ckpt = torch.load(last, weights_only=True)
    assert list(ckpt["hooks"]) == ["epoch_order", "augment_grid", "divergence", "lr_override", "early_stopping",
                                   "oof_logits", "checkpoints", "metrics", "count_steps", "reporter"]
    updates_per_epoch = 2  # 8 training images in batches of 4
    assert ckpt["hooks"]["count_steps"] == {"updates": updates_per_epoch, "epochs": 1} and ckpt["num_updates"] == 2
    assert ckpt["hooks"]["early_stopping"]["best_epoch"] == 1

    resumed = CountSteps()
    run = run_train(cfg, resume=True, hooks=[resumed]).run_dir
    assert resumed.restored == [{"updates": updates_per_epoch, "epochs": 1}]
    assert (resumed.updates, resumed.epochs) == (3 * updates_per_epoch, 3)
    assert torch.load(last, weights_only=True)["hooks"]["count_steps"] == {"updates": 6, "epochs": 3}
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3]


def test_a_last_checkpoint_of_vistrain_before_hooks_resumes_with_its_early_stopping_state(cfg: Any) -> None:
    """Older last checkpoints hold early stopping's state under ``early_stopping`` and no ``hooks``. A best value no
    epoch can reach (macro_f1 5.0) shows it is read: no later epoch becomes the best."""
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, hooks=[Reporter(stop_after_epoch)])
    (run,) = Path(cfg.output.exp_dir).glob("*/*")
    last = run / "ckpt" / "last_fold0.pth"
    ckpt = torch.load(last, weights_only=True)
    del ckpt["hooks"]
    ckpt["early_stopping"] = {"best": 5.0, "best_epoch": 1, "bad_epochs": 0}
    torch.save(ckpt, last)
    run_train(cfg, resume=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["folds"][0]["best_epoch"] == 1 and summary["folds"][0]["epochs_run"] == 3
    assert torch.load(run / "ckpt" / "best_fold0.pth", weights_only=True)["epoch"] == 1
    assert torch.load(last, weights_only=True)["hooks"]["early_stopping"] == {"best": 5.0, "best_epoch": 1,
                                                                                "bad_epochs": 2}
