"""Divergence (issue 12 item 3): a NaN training loss, injected at epoch 2, stops the run with the loop's message,
run.json status "diverged", the last good epoch's checkpoint and the best model kept; ``--resume RUN train.lr=...``
continues from that epoch with the lower learning rate and finishes. A resume with the lower lr that is stopped
again, then continued by a plain ``--resume RUN``, keeps the lower lr (issue 19 item 2: the effective config)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch
from conftest import describe, read_metrics, run_dirs, tiny_config, write_csv_dataset, write_yaml
from test_run_outcome import main_captured

from vistrain.engine.tasks import ClassificationTask
from vistrain.tracking.rundir import RunDir

EPOCHS = 3
BATCHES_PER_EPOCH = 2  # 36 images, 2 folds: 18 training images in batches of 8, the last one dropped
NEW_LR = 1e-3


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("diverge")
    data = write_csv_dataset(root / "data", per_class=12, size=32)
    cfg = tiny_config(data.root, train={"epochs": EPOCHS, "lr": 3e-3}, tracking={"tensorboard": False},
                      output={"exp_dir": str(root / "exp"), "logs_dir": None})
    config = write_yaml(root / "cfg.yaml", cfg)
    real = ClassificationTask.training_loss
    calls = {"n": 0}

    def nan_in_epoch_2(self, model, images, targets):  # noqa: ANN001, ANN202
        calls["n"] += 1
        loss, parts = real(self, model, images, targets)
        return (loss * float("nan") if calls["n"] == BATCHES_PER_EPOCH + 1 else loss), parts

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ClassificationTask, "training_loss", nan_in_epoch_2)
        diverged = main_captured("train", "--config", str(config))
    (run,) = run_dirs(root / "exp")
    out = {"run": run, "diverged": diverged, "status": json.loads((run / "run.json").read_text()),
           "rows": read_metrics(run), "log": (run / "train.log").read_text(),
           "best_bytes": (run / "ckpt" / "best_fold0.pth").read_bytes(),
           "last": torch.load(run / "ckpt" / "last_fold0.pth", weights_only=True)}
    out["copy"] = root / "exp2" / run.parent.name / run.name  # the diverged run, for the double resume below
    shutil.copytree(run, out["copy"])
    out["resumed"] = main_captured("train", "--resume", str(run), f"train.lr={NEW_LR}")
    return out


@pytest.fixture(scope="module")
def double_resume(flow: dict) -> dict:
    """The diverged run resumed with the lower lr and stopped (Ctrl-C) once epoch 2 is written, then continued by a
    plain ``--resume RUN``."""
    run = flow["copy"]
    real = RunDir.append_metrics

    def stop_after_writing(self: RunDir, row: dict) -> None:
        real(self, row)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RunDir, "append_metrics", stop_after_writing)
        stopped = main_captured("train", "--resume", str(run), f"train.lr={NEW_LR}")
    return {"run": run, "stopped": stopped, "rows_stopped": read_metrics(run),
            "plain": main_captured("train", "--resume", str(run)), "log": (run / "train.log").read_text()}


def test_nan_loss_stops_with_todays_message_and_status_diverged(flow: dict) -> None:
    r: subprocess.CompletedProcess = flow["diverged"]
    assert r.returncode == 1, describe(r)
    # the loss is read every log_interval (issue 11), so the message names the step range it covers
    assert re.search(r"training loss is nan at fold 0 epoch 2 steps? 1(-\d+)?; lower train.lr", r.stderr), describe(r)
    assert flow["status"]["status"] == "diverged" and "training loss is nan" in flow["status"]["error"]
    assert "[EXIT] TRAINING DIVERGED" in flow["log"].splitlines()[-1]
    assert f"vistrain train --resume {flow['run']} train.lr=" in flow["log"]


def test_divergence_keeps_the_last_good_epoch_and_the_best_model(flow: dict) -> None:
    assert [r["epoch"] for r in flow["rows"]] == [1]
    assert flow["last"]["epoch"] == 1 and not flow["last"]["finished"]
    assert all(torch.isfinite(v).all() for v in flow["last"]["model"].values() if v.is_floating_point())
    assert torch.load(flow["run"] / "ckpt" / "best_fold0.pth", weights_only=True)["epoch"] == 1


def test_resume_with_a_lower_lr_continues_from_the_last_good_epoch(flow: dict) -> None:
    r = flow["resumed"]
    assert r.returncode == 0, describe(r)
    run = flow["run"]
    rows = read_metrics(run)
    assert [x["epoch"] for x in rows] == list(range(1, EPOCHS + 1))
    assert rows[0] == flow["rows"][0], "the epoch before the divergence is kept as it was"
    # Without scaling, the optimiser state of the 3e-3 run would carry on: epoch 2's rate would be above 1e-3.
    assert 0 < rows[1]["lr"] <= NEW_LR, rows[1]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "success"
    assert info["resume_overrides"] == [{"train.lr": [3e-3, NEW_LR]}]
    log = (run / "train.log").read_text()
    assert "[RESUME] fold=0 from epoch 1 of 3" in log
    assert "[RESUME] fold=0 train.lr 0.003 -> 0.001" in log
    assert "[RESUME] config changed since the run started: train.lr: 0.003 -> 0.001" in log


def test_a_plain_resume_after_a_resume_with_a_lower_lr_keeps_the_lower_lr(flow: dict, double_resume: dict) -> None:
    """Issue 19 item 2: the second resume trains with config.yaml + the first resume's train.lr, so the optimiser
    stays on the lower lr's schedule (it was scaled back up to config.yaml's lr) and the run ends with the rows of
    the resume that was never stopped."""
    assert double_resume["stopped"].returncode != 0, describe(double_resume["stopped"])
    assert [r["epoch"] for r in double_resume["rows_stopped"]] == [1, 2]
    r = double_resume["plain"]
    assert r.returncode == 0, describe(r)
    run = double_resume["run"]
    timing = ("time_s", "img_per_s", "data_wait_frac", "mem_MiB", "fold_time_s")
    rows = [{k: v for k, v in x.items() if k not in timing} for x in read_metrics(run)]
    want = [{k: v for k, v in x.items() if k not in timing} for x in read_metrics(flow["run"])]
    last = torch.load(run / "ckpt" / "last_fold0.pth", weights_only=True)
    # the schedule's peak: scaled to NEW_LR by the first resume, and not back to 3e-3 by the plain one
    assert {g["initial_lr"] for g in last["optimizer"]["param_groups"]} == {NEW_LR}, last["optimizer"]["param_groups"]
    assert last["config"]["train"]["lr"] == NEW_LR and last["finished"]
    assert "train.lr 0.003 -> 0.001" not in double_resume["log"].split("[EXIT]")[-1], "the plain resume scaled the lr"
    assert rows == want, "the stopped and resumed run must end with the rows of the resume that was never stopped"
    info = json.loads((run / "run.json").read_text())
    assert info["resume_overrides"] == [{"train.lr": [3e-3, NEW_LR]}], "a plain resume changes nothing"
    assert info["effective_overrides"] == {"train.lr": NEW_LR}
    assert "[RESUME] earlier resumes' changes kept (run.json resume_overrides): train.lr=0.001" in double_resume["log"]
