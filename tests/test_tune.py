"""Hyper-parameter search: the space and its errors, pruning, failed trials, shared studies, auto-continue.

One test trains for real (a 4-trial study that prunes, then the full training with the best values); the
others replace ``run_train`` with a fake that reports scripted metrics, so the study's logic (failures,
directions, two worker processes sharing one SQLite study) is checked in milliseconds per trial.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import describe, last_line, run_cli, run_dirs, tiny_config, write_csv_dataset, write_yaml

from vistrain.config.loader import load_config, validate
from vistrain.config.schema import Config
from vistrain.engine import training as train_mod
from vistrain.engine.hooks import DivergedError
from vistrain.errors import ConfigError, UserError
from vistrain.tuning.run import _initial_trials
from vistrain.tuning.space import Param, config_keys, default_space, parse_space

LR_SPACE = {"train.lr": {"type": "categorical", "choices": ["1e-9", 3e-3]}}  # "1e-9": how YAML reads 1e-9


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Tiny models train fastest on one thread (and several test processes share few cores); the trials' runs
    resolve train.num_threads: auto from OMP_NUM_THREADS."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    return write_csv_dataset(tmp_path / "data", per_class=8, size=32).root  # 24 images, 3 classes


def make_cfg(root: Path, tmp_path: Path, **sections: dict[str, Any]) -> Config:
    raw = tiny_config(root, model={"name": "test_resnet"}, output={"exp_dir": str(tmp_path / "exp"),
                                                                   "logs_dir": None})
    raw["tune"] = {"epochs": 2}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return validate(raw)


def space_problems(space: dict[str, Any], **train: Any) -> list[str]:
    cfg = load_config(None, overrides=[f"train.{k}={v}" for k, v in train.items()])
    cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"space": space})})
    with pytest.raises(ConfigError) as err:
        parse_space(cfg)
    return err.value.problems


# ------------------------------------------------------------------------------------------------ space

def test_space_errors_one_line_per_problem_naming_the_key() -> None:
    problems = space_problems({
        "train.lrr": {"type": "float", "low": 1e-5, "high": 1e-2},
        "train.weight_decay": {"type": "floot", "low": 0, "high": 1},
        "augment.mixup_alpha": {"type": "float", "low": 0.1},
        "train.label_smoothing": {"type": "float", "low": 0.2, "high": 0.1},
        "train.optimizer": {"type": "categorical"},
        "train.momentum": {"type": "float", "low": 0.8, "hihg": 0.99},
    })
    assert problems == [
        "tune.space.train.lrr: not a config key (did you mean 'train.lr'?)",
        "tune.space.train.weight_decay: unknown type 'floot'; valid: float, int, categorical (did you mean 'float'?)",
        "tune.space.augment.mixup_alpha: type float needs high (e.g. low: 1e-5, high: 1e-2)",
        "tune.space.train.label_smoothing: low (0.2) must be less than high (0.1)",
        "tune.space.train.optimizer: categorical needs a non-empty list 'choices', e.g. choices: [adamw, sgd]",
        "tune.space.train.momentum: unknown field 'hihg' for type float; valid: type, low, high, log, step "
        "(did you mean 'high'?)",
        "tune.space.train.momentum: type float needs high (e.g. low: 1e-5, high: 1e-2)",
    ]


def test_space_values_are_checked_against_the_schema() -> None:
    problems = space_problems({
        "train.lr": {"type": "float", "low": 0, "high": 1e-2},
        "train.optimizer": {"type": "categorical", "choices": ["adamw", "adamz"]},
        "train": {"type": "float", "low": 0, "high": 1},
        "tune.n_trials": {"type": "int", "low": 1, "high": 5},
        "train.weight_decay": {"type": "float", "low": 0, "high": 0.1, "log": True},
    })
    assert len(problems) == 5
    assert problems[0] == "tune.space.train: not a config key; name a key inside it, e.g. train.img_size"
    assert problems[1].startswith("tune.space.tune.n_trials: the tune section configures the search")
    assert problems[2] == "tune.space.train.weight_decay: log: true needs low > 0; got low=0.0"
    assert problems[3].startswith("tune.space.train.lr: low 0.0 is not a valid value: train.lr:")
    assert problems[4].startswith("tune.space.train.optimizer: choice 'adamz' is not a valid value: train.optimizer:")


def test_space_reads_yaml_numbers_and_types_choices() -> None:
    cfg = load_config(None)
    space = {"train.lr": {"type": "float", "low": "1e-5", "high": "1e-2", "log": True},
             "train.weight_decay": {"type": "categorical", "choices": ["1e-9", 0.01]},
             "train.batch_size": {"type": "int", "low": 8, "high": 64, "step": 8}}
    cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"space": space})})
    params = {p.key: p for p in parse_space(cfg)}
    assert params["train.lr"] == Param("train.lr", "float", 1e-5, 1e-2, True)
    assert params["train.weight_decay"].choices == (1e-9, 0.01)
    assert params["train.batch_size"].step == 8


def test_default_space_is_small_and_valid() -> None:
    cfg = load_config(None)
    keys = [p.key for p in parse_space(cfg)]
    assert keys == ["train.lr", "train.weight_decay", "augment.mixup_alpha"]
    assert "augment.mixup_alpha" not in default_space(load_config(None, overrides=["train.batch_size=7"]))
    assert set(keys) <= set(config_keys())


def test_first_trials_are_the_baseline_then_every_choice() -> None:
    cfg = load_config(None, overrides=["train.lr=1e-3", "train.optimizer=sgd"])
    params = [Param("train.lr", "categorical", choices=(1e-9, 3e-3)),
              Param("train.optimizer", "categorical", choices=("adamw", "sgd", "adam")),
              Param("train.weight_decay", "float", 1e-6, 1e-2, log=True)]
    first = _initial_trials(cfg, params, n_trials=10)
    # The config's own lr (1e-3) is not a choice: the nearest one (in log scale) is its stand-in.
    assert first[0] == {"train.lr": 3e-3, "train.optimizer": "sgd", "train.weight_decay": 1e-2}
    assert first[1:] == [{"train.lr": 1e-9, "train.optimizer": "adamw"}, {"train.lr": 1e-9, "train.optimizer": "adam"}]
    assert len(_initial_trials(cfg, params, n_trials=2)) == 2


# ------------------------------------------------------------------------------- studies with a fake trainer

CKPT_FILES = ("best_fold{k}.pth", "best_fold{k}.safetensors", "last_fold{k}.pth", "last_fold{k}.safetensors",
              "epoch1_fold{k}.pth")  # what a run's ckpt/ holds after an epoch (with train.save_every_n_epochs)


def fake_trainer(monkeypatch: pytest.MonkeyPatch, score: Any, calls: list[dict[str, Any]] | None = None
                 ) -> list[Config]:
    """Replace run_train: each epoch writes the checkpoint files of ``CKPT_FILES`` and hands the row with
    ``score(cfg, epoch)`` to the hooks' ``after_epoch`` (tune's reporter); a raised exception crashes the trial.
    ``calls`` collects each call's other keyword arguments."""
    seen: list[Config] = []

    def run_train(cfg: Config, *, folds: list[int] | None = None, hooks: Any = (), **kwargs: Any
                  ) -> train_mod.RunResult:
        seen.append(cfg)
        if calls is not None:
            calls.append(kwargs)
        run_dir = Path(cfg.output.exp_dir) / "day" / f"{cfg.project.name}-x"
        (run_dir / "ckpt").mkdir(parents=True, exist_ok=True)
        best = None
        for fold in folds or cfg.folds_to_train():
            for epoch in range(1, cfg.train.epochs + 1):
                for name in CKPT_FILES:
                    (run_dir / "ckpt" / name.format(k=fold)).write_bytes(b"weights")
                value = score(cfg, epoch)
                best = value if best is None else max(best, value)
                for hook in hooks:
                    hook.after_epoch(SimpleNamespace(row={"fold": fold, "epoch": epoch, cfg.train.monitor: value}))
        return train_mod.RunResult(run_dir, {"mean": {cfg.train.monitor: best}})

    monkeypatch.setattr(train_mod, "run_train", run_train)
    return seen


def test_failed_trial_is_recorded_and_the_study_goes_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    from vistrain.tuning.run import run_tune

    def score(cfg: Config, epoch: int) -> float:
        if cfg.train.lr == 1e-2:
            raise DivergedError("training loss is nan at fold 0 epoch 1 step 1; lower train.lr")
        return cfg.train.lr * 100 + cfg.train.weight_decay + epoch / 100

    fake_trainer(monkeypatch, score)
    cfg = make_cfg(tmp_path, tmp_path, tune={"pruner": "none", "space": {
        "train.lr": {"type": "categorical", "choices": [1e-3, 1e-2, 3e-3]},
        "train.weight_decay": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}})
    result = run_tune(cfg, n_trials=5)
    trials = pd.read_csv(result.tune_dir / "trials.csv")
    assert len(trials) == 5
    failed = trials[trials["state"] == "FAIL"]
    assert len(failed) == 1 and (trials["state"] == "COMPLETE").sum() == 4  # it went on after the failure
    assert failed["user_attrs_fail_reason"].iloc[0].startswith("DivergedError: training loss is nan")
    assert (result.tune_dir / "failed" / f"trial_{failed['number'].iloc[0]}.txt").is_file()
    assert result.best_params["train.lr"] == 3e-3
    assert result.counts == {"COMPLETE": 4, "FAIL": 1}
    # Two parameters varied over >= 2 completed trials: every plot, the importances included.
    for name in ("optimization_history", "intermediate_values", "param_importances", "parallel_coordinate"):
        assert (result.tune_dir / "plots" / f"{name}.png").stat().st_size > 1000, name


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plots cost seconds each; the tests that do not look at them skip them."""
    from vistrain.tuning import run as tune

    monkeypatch.setattr(tune, "write_plots", lambda study, out: {})


@pytest.mark.usefixtures("no_plots")
def test_user_error_stops_the_study_at_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    from vistrain.tuning.run import run_tune

    def score(cfg: Config, epoch: int) -> float:
        raise UserError("data.train_csv: file not found: /nowhere.csv")

    seen = fake_trainer(monkeypatch, score)
    with pytest.raises(UserError, match="file not found"):
        run_tune(make_cfg(tmp_path, tmp_path, tune={"space": LR_SPACE}), n_trials=4)
    assert len(seen) == 1
    tune_dir = next((tmp_path / "exp").glob("*/*_tune"))
    assert '"status": "error"' in (tune_dir / "tune.json").read_text()
    assert pd.read_csv(tune_dir / "trials.csv")["state"].tolist() == ["FAIL"]


@pytest.mark.usefixtures("no_plots")
def test_no_completed_trial_is_an_error_with_the_reasons(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    from vistrain.tuning.run import run_tune

    def score(cfg: Config, epoch: int) -> float:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    fake_trainer(monkeypatch, score)
    with pytest.raises(UserError, match=r"no trial of study 'tiny' completed \(2 fail\)"):
        run_tune(make_cfg(tmp_path, tmp_path, tune={"space": LR_SPACE}), n_trials=2)


@pytest.mark.usefixtures("no_plots")
def test_trial_config_and_valid_loss_minimised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    from vistrain.tuning.run import run_tune

    seen = fake_trainer(monkeypatch, lambda cfg, epoch: 1.0 / epoch + cfg.train.lr)
    cfg = make_cfg(tmp_path, tmp_path, train={"epochs": 9, "monitor": "valid_loss"},
                   tune={"epochs": None, "pruner": "hyperband", "folds": [0, 1],
                         "space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}})
    result = run_tune(cfg, n_trials=3, study_name="losses")
    assert result.direction == "minimize" and result.study_name == "losses"
    trial = seen[0]
    assert trial.train.epochs == 3 and not trial.tracking.tensorboard and trial.output.logs_dir is None
    assert Path(trial.output.exp_dir) == result.tune_dir / "trials"
    assert result.tune_dir.parent.parent == tmp_path / "exp" and result.tune_dir.name.endswith("_tune")
    # Minimising: the best trial has the smallest lr of those tried.
    tried = [c.train.lr for c in seen]
    assert result.best_params["train.lr"] == pytest.approx(min(tried))


def test_a_ratio_split_study_trains_fold_0_whatever_tune_folds_says(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path, no_plots: None) -> None:
    """data.split: ratio trains one model (fold 0); the trials' steps must follow it, not tune.folds."""
    pytest.importorskip("optuna")
    from vistrain.tuning.run import run_tune

    calls: list[dict[str, Any]] = []
    fake_trainer(monkeypatch, lambda cfg, epoch: cfg.train.lr + epoch, calls)
    cfg = make_cfg(tmp_path, tmp_path, data={"split": "ratio"}, tune={"folds": [1], "pruner": "none", "space": {
        "train.lr": {"type": "categorical", "choices": [1e-3, 3e-3]}}})
    result = run_tune(cfg, n_trials=2)
    assert result.counts == {"COMPLETE": 2}


# --------------------------------------------------------------------------------------- real training

def test_tiny_study_prunes_a_learning_rate_that_cannot_learn_and_continues(data_root: Path, tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    from vistrain.tuning.run import run_tune

    # The pruner waits for 2 completed trials (the baseline, then 1e-9); 1e-8 learns no more than 1e-9 did.
    cfg = make_cfg(data_root, tmp_path, tune={"space": {"train.lr": {"type": "categorical",
                                                                     "choices": ["1e-9", 3e-3, "1e-8"]}}})
    result = run_tune(cfg, n_trials=4, auto_continue=True, use_calibration=True)

    tune_dir = result.tune_dir
    for name in ("study.db", "best_params.yaml", "trials.csv", "tune.json", "tune.log",
                 "plots/optimization_history.png", "plots/parallel_coordinate.png"):
        assert (tune_dir / name).is_file(), name
    study = optuna.load_study(study_name=result.study_name, storage=f"sqlite:///{tune_dir / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert len(states) == 4 and "PRUNED" in states, states
    assert all(t.params["train.lr"] == 1e-8 for t in study.trials if t.state.name == "PRUNED")
    best = yaml.safe_load((tune_dir / "best_params.yaml").read_text())
    assert best == {"train": {"lr": 3e-3}} == {"train": {"lr": result.best_params["train.lr"]}}
    assert (tune_dir / "best_params.yaml").read_text().startswith("# best trial ")
    # Every trial that trained has its run directory; a repeat of completed values reuses their result.
    trained = [t for t in study.trials if "repeat_of" not in t.user_attrs]
    assert all(Path(t.user_attrs["run_dir"]).is_dir() for t in trained)
    assert len(list((tune_dir / "trials").glob("*/tiny-trial*"))) == len(trained) >= 2
    # Each trial's own run.json tells a pruned trial from a completed one (and from a crash).
    run_status = {t.state.name: json.loads((Path(t.user_attrs["run_dir"]) / "run.json").read_text())["status"]
                  for t in trained}
    assert run_status == {"PRUNED": "pruned", "COMPLETE": "success"}, run_status
    last_lines = {t.state.name: (Path(t.user_attrs["run_dir"]) / "train.log").read_text().rstrip().splitlines()[-1]
                  for t in trained}
    assert last_lines["PRUNED"].endswith("[EXIT] TRAINING PRUNED"), last_lines
    assert last_lines["COMPLETE"].endswith("[EXIT] TRAINING SUCCESS code=0"), last_lines
    # tune.keep_checkpoints: best (the default): a completed trial keeps its best weights only, a pruned one none.
    kept = {t.state.name: sorted(p.name for p in (Path(t.user_attrs["run_dir"]) / "ckpt").iterdir()) for t in trained}
    assert kept == {"COMPLETE": ["best_fold0.pth"], "PRUNED": []}, kept

    # auto-continue: an ordinary run directory with the best values and a note of where they came from.
    run_dir = result.run_dir
    assert run_dir is not None and run_dir.parent.parent == tmp_path / "exp"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == 3e-3
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == cfg.train.epochs
    tuned = yaml.safe_load((run_dir / "tuned_from.json").read_text())
    assert tuned["tune_dir"] == str(tune_dir) and tuned["best_trial"] == result.best_trial
    assert (run_dir / "summary.json").is_file()
    calibration = json.loads((run_dir / "calibration.json").read_text())  # --use-calibration: the run is calibrated
    assert calibration["temperature"] > 0


def test_cli_optimize_auto_continue_ends_each_log_with_one_exit_line(data_root: Path, tmp_path: Path) -> None:
    """``train --optimize --auto-continue`` for real: the console, tune.log and every run's train.log (the trials'
    and the final run's) end with exactly one [EXIT] line; the final run's report shows its final status."""
    pytest.importorskip("optuna")
    raw = tiny_config(data_root, model={"name": "test_resnet"}, tracking={"tensorboard": False},
                      output={"exp_dir": str(tmp_path / "exp"), "logs_dir": str(tmp_path / "logs")})
    raw["tune"] = {"epochs": 1, "space": LR_SPACE}
    config = write_yaml(tmp_path / "tune.yaml", raw)
    r = run_cli("train", "--config", str(config), "--optimize", "--n-trials", "2", "--auto-continue", cwd=tmp_path)
    assert r.returncode == 0, describe(r)
    assert r.stdout.count("[EXIT]") == 1 and last_line(r.stdout) == "[EXIT] TRAINING SUCCESS code=0", describe(r)
    (final,) = run_dirs(tmp_path / "exp")
    (tune_dir,) = (tmp_path / "exp").glob("*/*_tune")
    (copy,) = (tmp_path / "logs").glob(f"run_*_{final.name}.log")
    trial_logs = sorted((tune_dir / "trials").glob("*/*/train.log"))
    assert len(trial_logs) == 2
    success = "[EXIT] TRAINING SUCCESS code=0"
    for log, marker in [(final / "train.log", success), (copy, success), (tune_dir / "tune.log", "TUNING SUCCESS"),
                        *((p, "[EXIT] TRAINING ") for p in trial_logs)]:
        text = log.read_text()
        assert text.count("[EXIT]") == 1 and marker in text.rstrip().splitlines()[-1], (log, text[-600:])
    assert "status: success |" in (final / "report.html").read_text(encoding="utf-8")


# Shared studies (several worker processes on one storage): tests/test_tune_shared.py.


# ---------------------------------------------------------------------------------- CLI (once it is wired)

def test_cli_space_error_is_exit_2_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vistrain.cli import main

    raw = tiny_config(tmp_path, output={"exp_dir": str(tmp_path / "exp")})
    raw["tune"] = {"space": {"train.lrr": {"type": "float", "low": 1e-5, "high": 1e-2}}}
    config = write_yaml(tmp_path / "bad.yaml", raw)
    assert main(["tune", "--config", str(config), "--n-trials", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: tune.space.train.lrr: not a config key (did you mean 'train.lr'?)"]


@pytest.mark.usefixtures("no_plots")
def test_cli_train_optimize_auto_continue(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("optuna")
    from vistrain.cli import main

    seen = fake_trainer(monkeypatch, lambda cfg, epoch: 0.1 if cfg.train.lr < 1e-6 else 0.5 + epoch / 10)
    raw = tiny_config(tmp_path, output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None})
    raw["tune"] = {"space": LR_SPACE}
    config = write_yaml(tmp_path / "tune.yaml", raw)
    assert main(["train", "--config", str(config), "--optimize", "--n-trials", "3", "--auto-continue"]) == 0
    out = capsys.readouterr().out
    assert "[DONE] tune directory:" in out and "[EXIT] TRAINING SUCCESS code=0" in out
    final = seen[-1]  # the continued run: the best lr, the config's own epochs and output folder
    assert final.train.lr == 3e-3 and final.train.epochs == 2 and Path(final.output.exp_dir) == tmp_path / "exp"
    assert (tmp_path / "exp" / "day" / "tiny-x" / "tuned_from.json").is_file()


@pytest.mark.usefixtures("no_plots")
def test_repeated_values_reuse_the_result(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    from vistrain.tuning.run import run_tune

    seen = fake_trainer(monkeypatch, lambda cfg, epoch: 0.5 + epoch / 10)
    space = {"train.lr": {"type": "categorical", "choices": [3e-3]}}
    result = run_tune(make_cfg(tmp_path, tmp_path, tune={"space": space}), n_trials=3)
    assert len(seen) == 1  # trained once; the two repeats reuse trial 0's value and curve
    study = optuna.load_study(study_name=result.study_name, storage=f"sqlite:///{result.tune_dir / 'study.db'}")
    assert [t.user_attrs.get("repeat_of") for t in study.trials] == [None, 0, 0]
    assert [t.value for t in study.trials] == [0.7] * 3 and study.trials[2].intermediate_values == {1: 0.6, 2: 0.7}


# ------------------------------------------------------------- the study's log, calibration, continuing a study

def tune_config(tmp_path: Path, space: dict[str, Any] = LR_SPACE) -> Path:
    raw = tiny_config(tmp_path, output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None})
    raw["tune"] = {"space": space}
    return write_yaml(tmp_path / "tune.yaml", raw)


def only_tune_dir(tmp_path: Path) -> Path:
    (tune_dir,) = (tmp_path / "exp").glob("*/*_tune")
    return tune_dir


def good_lr(cfg: Config, epoch: int) -> float:
    return 0.1 if cfg.train.lr < 1e-6 else 0.5 + epoch / 10


@pytest.mark.usefixtures("no_plots")
@pytest.mark.parametrize("fails", [False, True])
def test_tune_log_ends_with_the_outcome(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str], fails: bool) -> None:
    pytest.importorskip("optuna")
    from vistrain.cli import main

    def score(cfg: Config, epoch: int) -> float:
        if fails:
            raise UserError("data.train_csv: file not found: /nowhere.csv")
        return good_lr(cfg, epoch)

    fake_trainer(monkeypatch, score)
    assert main(["tune", "--config", str(tune_config(tmp_path)), "--n-trials", "2"]) == (2 if fails else 0)
    out, err = capsys.readouterr()
    assert out.count("[EXIT]") == 1 and "Traceback" not in out + err
    tune_dir = only_tune_dir(tmp_path)
    lines = [ln for ln in (tune_dir / "tune.log").read_text().splitlines() if ln.strip()]
    info = json.loads((tune_dir / "tune.json").read_text())
    if not fails:
        assert lines[-1].endswith("[EXIT] TUNING SUCCESS code=0"), lines[-3:]
        assert info["status"] == "success"
        return
    assert lines[-1].endswith("[EXIT] TUNING ERROR code=2"), lines[-3:]
    text = "\n".join(lines)
    assert "[ERROR] data.train_csv: file not found: /nowhere.csv" in text
    assert "Traceback (most recent call last)" in text
    assert info["status"] == "error" and info["exit_code"] == 2
    assert info["error"] == "data.train_csv: file not found: /nowhere.csv"


@pytest.mark.usefixtures("no_plots")
@pytest.mark.parametrize("auto_continue", [True, False])
def test_optimize_use_calibration_calibrates_the_continued_run(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        auto_continue: bool) -> None:
    pytest.importorskip("optuna")
    from vistrain.cli import main

    calls: list[dict[str, Any]] = []
    seen = fake_trainer(monkeypatch, good_lr, calls)
    argv = ["train", "--config", str(tune_config(tmp_path)), "--optimize", "--n-trials", "2", "--use-calibration"]
    assert main(argv + (["--auto-continue"] if auto_continue else [])) == 0, capsys.readouterr().err
    trials = [c for c, cfg in zip(calls, seen) if "-trial" in cfg.project.name]
    assert len(trials) == 2 and not any(c.get("use_calibration") for c in trials)
    log = (only_tune_dir(tmp_path) / "tune.log").read_text()
    if auto_continue:
        assert len(calls) == 3 and calls[-1]["use_calibration"] is True
        assert seen[-1].train.lr == 3e-3
    else:
        assert len(calls) == 2
        assert "[TUNE] --use-calibration applies to the run that --auto-continue trains; " in log


@pytest.mark.usefixtures("no_plots")
def test_auto_continue_finishes_the_interrupted_study_then_trains_the_best(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    optuna = pytest.importorskip("optuna")
    from vistrain.cli import main

    config = tune_config(tmp_path, {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})
    trained = 0

    def score(cfg: Config, epoch: int) -> float:
        nonlocal trained
        trained += epoch == 1
        if trained == 3:  # Ctrl-C during the third trial
            raise KeyboardInterrupt
        return good_lr(cfg, epoch)

    calls: list[dict[str, Any]] = []
    seen = fake_trainer(monkeypatch, score, calls)
    assert main(["train", "--config", str(config), "--optimize", "--n-trials", "4"]) == 130
    tune_dir = only_tune_dir(tmp_path)
    info = json.loads((tune_dir / "tune.json").read_text())
    assert info["status"] == "interrupted"
    # A process killed outright leaves its trial "running" in the study.
    optuna.load_study(study_name=info["study_name"], storage=f"sqlite:///{tune_dir / 'study.db'}").ask()

    assert main(["train", "--config", str(config), "--auto-continue", "--use-calibration"]) == 0, \
        capsys.readouterr().err
    assert only_tune_dir(tmp_path) == tune_dir, "the study continues in its own tune directory"
    info = json.loads((tune_dir / "tune.json").read_text())
    study = optuna.load_study(study_name=info["study_name"], storage=f"sqlite:///{tune_dir / 'study.db'}")
    states = [t.state.name for t in study.trials]
    # Trials 0 and 1 done, 2 (Ctrl-C) and 3 (killed) interrupted, recorded as failed; then the 2 still missing
    # of the 4 asked for.
    assert len(states) == 6 and states[2:4] == ["FAIL", "FAIL"] and states.count("FAIL") == 2, states
    assert all(t.user_attrs.get("interrupted") is True for t in study.trials[2:4])
    assert info["status"] == "success"
    final = seen[-1]
    assert final.train.lr == info["best"]["params"]["train.lr"] and "-trial" not in final.project.name
    assert calls[-1]["use_calibration"] is True and calls[-1]["resume"] is True
    assert (tmp_path / "exp" / "day" / "tiny-x" / "tuned_from.json").is_file()
    log = (tune_dir / "tune.log").read_text()
    assert "[TUNE] continuing the unfinished study" in log
    assert log.rstrip().splitlines()[-1].endswith("[EXIT] TUNING SUCCESS code=0")

    # Nothing left to continue now: a user error naming what to run.
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--auto-continue"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: --auto-continue: nothing left to continue") and "--optimize" in line, line


class _Killed(BaseException):
    """What SIGTERM raises in this test where vistrain leaves it unhandled (instead of ending pytest)."""


def _sigterm_raises(signum: int, frame: Any) -> None:
    raise _Killed


def test_sigterm_stops_the_study_as_interrupted_and_auto_continue_runs_that_trial_again(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM (a preemption) during the third trial: the study ends in good order (exit 143, tune.log's
    ``[EXIT] TUNING INTERRUPTED code=143``, tune.json ``interrupted``), the trial is recorded as interrupted, not
    failed, and ``--auto-continue`` runs the trials still missing."""
    optuna = pytest.importorskip("optuna")
    import signal

    from vistrain.cli import main

    config = tune_config(tmp_path, {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})
    trained = 0

    def score(cfg: Config, epoch: int) -> float:
        nonlocal trained
        trained += epoch == 1
        if trained == 3 and epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return good_lr(cfg, epoch)

    fake_trainer(monkeypatch, score)
    previous = signal.signal(signal.SIGTERM, _sigterm_raises)
    try:
        code = main(["train", "--config", str(config), "--optimize", "--n-trials", "4"])
    except _Killed:
        code = None
    finally:
        signal.signal(signal.SIGTERM, previous)
    out, err = capsys.readouterr()
    assert code == 143, (code, out[-2000:], err[-2000:])
    assert last_line(out) == "[EXIT] TRAINING INTERRUPTED code=143"  # the console names the command: train
    assert "stopped by SIGTERM" in err and "error:" not in err, err
    tune_dir = only_tune_dir(tmp_path)
    info = json.loads((tune_dir / "tune.json").read_text())
    assert info["status"] == "interrupted" and info["exit_code"] == 143, info
    assert last_line((tune_dir / "tune.log").read_text()).endswith("[EXIT] TUNING INTERRUPTED code=143")
    study = optuna.load_study(study_name=info["study_name"], storage=f"sqlite:///{tune_dir / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL"]
    assert study.trials[2].user_attrs.get("interrupted") is True and "fail_reason" not in study.trials[2].user_attrs

    assert main(["train", "--config", str(config), "--auto-continue"]) == 0, capsys.readouterr().err
    study = optuna.load_study(study_name=info["study_name"], storage=f"sqlite:///{tune_dir / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert json.loads((tune_dir / "tune.json").read_text())["status"] == "success"


@pytest.mark.usefixtures("no_plots")
def test_auto_continue_after_a_finished_search_trains_its_best_values(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Seed 000: ``--optimize`` alone searches; ``--auto-continue`` afterwards goes on to the full training of the
    best trial's values (no trial runs again), logged with the study and its best value."""
    pytest.importorskip("optuna")
    from vistrain.cli import main

    calls: list[dict[str, Any]] = []
    seen = fake_trainer(monkeypatch, good_lr, calls)
    config = tune_config(tmp_path)
    assert main(["train", "--config", str(config), "--optimize", "--n-trials", "2"]) == 0
    assert len(seen) == 2
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--auto-continue"]) == 0, capsys.readouterr().err
    assert len(seen) == 3, "only the full training ran"
    final = seen[-1]
    assert final.train.lr == 3e-3 and "-trial" not in final.project.name and final.train.epochs == 2
    assert calls[-1]["resume"] is True
    tune_dir = only_tune_dir(tmp_path)
    info = json.loads((tune_dir / "tune.json").read_text())
    assert info["continued"]["status"] == "success" and info["best"]["params"] == {"train.lr": 3e-3}
    run_dir = Path(info["continued"]["run_dir"])
    assert json.loads((run_dir / "tuned_from.json").read_text())["tune_dir"] == str(tune_dir)
    log = (tune_dir / "tune.log").read_text()
    assert (f"[TUNE] auto-continue: full training with the best values of study 'tiny': trial 0, "
            f"macro_f1={info['best']['value']:.4f}: train.lr=0.003") in log, log
    # Both trained: nothing is left, and the message says where the best values were trained.
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--auto-continue"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "nothing left to continue" in line and str(run_dir) in line and "--optimize" in line, line


# ------------------------------------------------------------ what n_trials means, the pruner, the metric name

def test_help_says_n_trials_is_the_studys_total() -> None:
    from vistrain.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for verb in ("tune", "train"):
        text = " ".join(sub.choices[verb].format_help().split())
        assert "trials this process runs" not in text, verb
        assert "--n-trials N" in text and "the study's total" in text, text


@pytest.mark.usefixtures("no_plots")
def test_n_trials_is_the_studys_total_as_the_log_says_and_the_study_names_its_metric(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A second process asked for 3 trials of a study that holds 2 runs one; its log says so; Optuna's dashboard
    (and trials.csv) name the objective after train.monitor."""
    optuna = pytest.importorskip("optuna")
    from vistrain.tuning.run import run_tune

    seen = fake_trainer(monkeypatch, good_lr)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    cfg = make_cfg(tmp_path, tmp_path, tune={"pruner": "none", "space": {
        "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}})
    first = run_tune(cfg, n_trials=2, storage=url, study_name="shared")
    second = run_tune(cfg, n_trials=3, storage=url, study_name="shared")
    assert len(seen) == 3, "3 is the study's total, not this process's count"
    study = optuna.load_study(study_name="shared", storage=url)
    assert len(study.trials) == 3 and study.metric_names == ["macro_f1"]
    assert "value_macro_f1" in pd.read_csv(second.tune_dir / "trials.csv").columns
    for result, before in ((first, 0), (second, 2)):
        log = (result.tune_dir / "tune.log").read_text()
        n = 2 if result is first else 3
        assert (f"{n} trial(s) in the study in all, by every process working on it ({before} ended so far, "
                f"{n - before} left)") in log, log


@pytest.mark.parametrize(("n_trials", "warmup", "epochs", "startup", "first_epoch"), [
    (6, 1, 4, 2, 2),  # the digits demo: 12 epochs, a third per trial, one warm-up epoch
    (20, 1, 4, 5, 2),  # the default 20 trials: Optuna's own default of 5 startup trials
    (100, 0, 10, 10, 4),
    (20, 3, 9, 5, 5),
    (2, 0, 1, 2, 1),
    (8, 5, 3, 2, 3),  # a warm-up longer than the trial: only the last epoch may prune
    (20, 0.5, 4, 5, 2),  # a warm-up ending within epoch 1
])
def test_pruner_plan_scales_with_the_study_and_the_warm_up(n_trials: int, warmup: float, epochs: int, startup: int,
                                                           first_epoch: int) -> None:
    from vistrain.tuning.run import pruner_plan

    plan = pruner_plan(n_trials, warmup, epochs)
    assert (plan.startup, plan.first_epoch) == (startup, first_epoch)
    assert plan.first_epoch > min(warmup, epochs - 1), "never judged on a warm-up epoch while a later one comes"


@pytest.mark.usefixtures("no_plots")
def test_the_pruner_lets_a_study_learn_past_the_warm_up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The issue's study: in the warm-up epoch every new trial scores near chance while the baseline does not,
    and later they all beat it. Judged on epoch 1 after one completed trial, every sampled trial was pruned."""
    pytest.importorskip("optuna")
    from vistrain.tuning.run import run_tune

    def score(cfg: Config, epoch: int) -> float:
        if cfg.train.lr < 3e-4:
            return 0.1  # a learning rate that cannot learn in 3 epochs: pruned once it may be
        baseline = cfg.train.lr == 3e-3
        if epoch == 1:
            return 0.5 if baseline else 0.1
        return (0.5 if baseline else 0.8) + epoch / 10

    fake_trainer(monkeypatch, score)
    cfg = make_cfg(tmp_path, tmp_path, train={"warmup_epochs": 1}, tune={"epochs": 3, "space": {
        "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}})
    result = run_tune(cfg, n_trials=6)
    trials = pd.read_csv(result.tune_dir / "trials.csv")
    assert (trials["state"] == "COMPLETE").sum() >= 3, trials[["number", "state", "params_train.lr"]]
    assert result.best_params["train.lr"] != 3e-3, "a trial that learns better than the baseline won"
    for at in trials.get("user_attrs_pruned_at", pd.Series(dtype=object)).dropna():
        assert eval(at)["epoch"] >= 2, at  # noqa: S307 - a dict repr Optuna wrote from our own user attribute
    log = (result.tune_dir / "tune.log").read_text()
    assert ("[TUNE] pruner=median: once 2 trial(s) have completed, a trial may be stopped from epoch 2 of 3 on "
            "(train.warmup_epochs=1: no pruning during the learning-rate warm-up)") in log, log


# --------------------------------------------------------------------------------- tune.keep_checkpoints

@pytest.mark.usefixtures("no_plots")
@pytest.mark.parametrize("keep", ["best", "none", "all"])
def test_keep_checkpoints_decides_what_an_ended_trial_leaves_on_disk(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path, keep: str) -> None:
    optuna = pytest.importorskip("optuna")
    from vistrain.tuning.run import run_tune

    fake_trainer(monkeypatch, good_lr)
    space = {"train.lr": {"type": "categorical", "choices": [3e-3, 1e-9, 1e-8]}}
    cfg = make_cfg(tmp_path, tmp_path, tune={"space": space, "keep_checkpoints": keep})
    result = run_tune(cfg, n_trials=3)
    study = optuna.load_study(study_name=result.study_name, storage=f"sqlite:///{result.tune_dir / 'study.db'}")
    left = {t.number: (t.state.name, sorted(p.name for p in (Path(t.user_attrs["run_dir"]) / "ckpt").iterdir()))
            for t in study.trials}
    everything = sorted(name.format(k=0) for name in CKPT_FILES)
    expected = {"best": {0: ("COMPLETE", ["best_fold0.pth"]), 1: ("COMPLETE", ["best_fold0.pth"]), 2: ("PRUNED", [])},
                "none": {0: ("COMPLETE", []), 1: ("COMPLETE", []), 2: ("PRUNED", [])},
                "all": {0: ("COMPLETE", everything), 1: ("COMPLETE", everything), 2: ("PRUNED", everything)}}
    assert left == expected[keep]


@pytest.mark.slow
@pytest.mark.sweep
def test_a_six_trial_digits_study_completes_at_least_two_trials(tmp_path: Path) -> None:
    """The issue's set-up (the digits demo), shorter: scikit-learn's 1,797 digits (real scans) as 32 px PNGs,
    resnet10t, one warm-up epoch, 3 epochs per trial, the default space. The baseline learns within its first
    epoch, so every sampled trial used to be pruned at its warm-up epoch, measured against that one trial."""
    optuna = pytest.importorskip("optuna")
    from PIL import Image
    from sklearn.datasets import load_digits

    from vistrain.tuning.run import run_tune

    digits = load_digits()
    keep = np.arange(len(digits.target))
    (tmp_path / "train").mkdir()
    for i in keep:
        pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((32, 32), Image.Resampling.BICUBIC)
        image.save(tmp_path / "train" / f"d{i}.png")
    pd.DataFrame({"ID": [f"d{i}" for i in keep], "target": digits.target[keep]}).to_csv(tmp_path / "train.csv",
                                                                                        index=False)
    raw = tiny_config(tmp_path, project={"name": "digits", "seed": 42}, data={"folds": 5},
                      train={"batch_size": 64, "epochs": 9, "warmup_epochs": 1, "weight_decay": 0.01},
                      output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None})
    result = run_tune(validate(raw), n_trials=6)
    study = optuna.load_study(study_name=result.study_name, storage=f"sqlite:///{result.tune_dir / 'study.db'}")
    states = [t.state.name for t in study.trials]
    print(f"6-trial digits study: {states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned "
          f"({', '.join(f'{t.number}:{t.state.name}:{t.value}' for t in study.trials)})")
    assert states.count("COMPLETE") >= 2, states
    assert all(t.user_attrs["pruned_at"]["epoch"] >= 2 for t in study.trials if t.state.name == "PRUNED")
