"""train.ema: the moving average is what is evaluated and saved as best; the raw weights keep training."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_config, write_csv_dataset, write_yaml

from vistrain.config import load_config
from vistrain.engine.training import run_train


def test_ema_weights_are_the_best_checkpoint_and_survive_in_the_last(tmp_path: Path) -> None:
    data = write_csv_dataset(tmp_path / "data", per_class=6)
    cfg = tiny_config(data.root, train={"ema": True, "ema_decay": 0.99, "epochs": 2, "batch_size": 4,
                                        "early_stopping_patience": 0},
                      output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None}, tracking={"tensorboard": False})
    result = run_train(load_config(write_yaml(tmp_path / "cfg.yaml", cfg)))
    last = torch.load(result.run_dir / "ckpt" / "last_fold0.pth", map_location="cpu", weights_only=False)
    best = torch.load(result.run_dir / "ckpt" / "best_fold0.pth", map_location="cpu", weights_only=False)
    assert last["ema"] is not None
    key = next(k for k, v in last["model"].items() if v.is_floating_point() and v.ndim == 4)
    # the EMA lags the raw weights, so they differ; the best checkpoint holds EMA weights
    assert not torch.equal(last["ema"][key], last["model"][key])
    if best["epoch"] == last["epoch"]:
        assert torch.equal(best["model"][key], last["ema"][key])
