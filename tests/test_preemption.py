"""Preemption (issue 19 item 4): SIGTERM (Kubernetes, Docker, systemd) and SIGUSR1 (SLURM's ``--signal``) during
training stop it after the current optimiser step with the last checkpoint of the partial epoch, the
``[EXIT] TRAINING INTERRUPTED code=143`` line (or ``train.requeue_exit_code``) and run.json status ``interrupted``;
``--resume`` goes on in the middle of that epoch and ends bit for bit where an uninterrupted run ends, with real
training settings (hard augmentation in 2 DataLoader workers, mixup + cutmix, EMA, dropout, accumulation 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import cli_command, cli_env, describe, last_line, only_run_dir, read_metrics, tiny_config, write_yaml
from conftest import write_csv_dataset as write_data

from vistrain.config import load_config
from vistrain.engine.hooks import FoldRun, Hook
from vistrain.engine.loop import Step
from vistrain.engine.training import run_train
from vistrain.errors import Preempted

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from kill_resume import comparable  # noqa: E402 - the kill sweep's definition of "the same numbers"

# 12 training images in batches of 2: 6 batches per epoch, an optimiser update after every second one.
SETTINGS = {
    "model": {"drop_rate": 0.2},
    "train": {"batch_size": 2, "epochs": 2, "num_workers": 2, "num_threads": 1, "amp": "fp32", "ema": True,
              "ema_decay": 0.9, "grad_accum_steps": 2},
    "augment": {"policy": "hard", "mixup_alpha": 0.4, "cutmix_alpha": 1.0},
    "tracking": {"tensorboard": False},
}


def config(data: Path, exp: Path, path: Path, **train: Any) -> Path:
    raw = tiny_config(data, **{k: dict(v) for k, v in SETTINGS.items()})
    raw["train"].update(train)
    raw["output"] = {"exp_dir": str(exp), "logs_dir": None}
    return write_yaml(path, raw)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("preempt") / "data", per_class=8, size=32).root


@pytest.fixture(scope="module")
def uninterrupted(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("reference")
    result = run_train(load_config(config(data, root / "exp", root / "cfg.yaml")))
    return comparable(result.run_dir)


class SignalAt(Hook):
    """Sends ``sig`` to this process after batch ``step`` of epoch ``epoch`` (1-based): in the middle of an
    accumulation group, as a scheduler's signal comes at any moment."""

    name = "signal_at"

    def __init__(self, sig: signal.Signals, epoch: int, step: int):
        self.sig, self.epoch, self.step = sig, epoch, step

    def after_step(self, fold: FoldRun, step: Step) -> None:
        if fold.state.epoch + 1 == self.epoch and step.index == self.step:
            os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize(("sig", "requeue", "code"), [(signal.SIGTERM, None, 143), (signal.SIGUSR1, 0, 0)],
                         ids=["SIGTERM", "SIGUSR1-requeue-0"])
def test_a_signal_mid_epoch_checkpoints_the_step_and_resume_ends_bit_equal(
        data: Path, uninterrupted: dict[str, Any], tmp_path: Path, sig: signal.Signals, requeue: int | None,
        code: int) -> None:
    cfg = load_config(config(data, tmp_path / "exp", tmp_path / "cfg.yaml", requeue_exit_code=requeue))
    with pytest.raises(Preempted) as stopped:
        run_train(cfg, hooks=[SignalAt(sig, epoch=2, step=3)])
    assert stopped.value.exit_code == code
    run = only_run_dir(tmp_path / "exp")
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "interrupted" and status["exit_code"] == code, status
    log = (run / "train.log").read_text()
    # Batch 3 is the first of an accumulation group: the step finishes with batch 4, the group's update.
    assert f"[STOP] stopped by {sig.name} after fold 0 epoch 2 step 4;" in log, log[-2000:]
    assert last_line(log).endswith(f"[EXIT] TRAINING INTERRUPTED code={code}"), log[-2000:]
    last = torch.load(run / "ckpt" / "last_fold0.pth", weights_only=True)
    assert (last["epoch"], last["step"], last["finished"]) == (1, 4, False)
    assert [r["epoch"] for r in read_metrics(run)] == [1], "no row for the unfinished epoch"

    run_train(cfg, resume=True)
    log = (run / "train.log").read_text()
    assert "[RESUME] fold=0 in epoch 2 of 2 after its step 4" in log
    assert json.loads((run / "run.json").read_text())["status"] == "success"
    assert comparable(run) == uninterrupted


def _log_with(exp: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> Path:
    """The run's train.log once it holds ``text``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for log in exp.glob("*/*/train.log"):
            if text in log.read_text():
                return log
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {text!r} was logged"
        time.sleep(0.01)
    raise AssertionError(f"{text!r} not logged under {exp} after {timeout} s")


def _train(cfg: Path, cwd: Path, *flags: str) -> subprocess.Popen:
    # A session of its own: the signal goes to the whole process group, DataLoader workers included, as SLURM
    # signals every process of a job step.
    return subprocess.Popen(cli_command("train", "--config", str(cfg), *flags), cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_sigterm_to_the_cli_exits_143_with_the_exit_line_and_resume_finishes_bit_equal(
        data: Path, uninterrupted: dict[str, Any], tmp_path: Path) -> None:
    cfg = config(data, tmp_path / "exp", tmp_path / "cfg.yaml", log_interval=1)
    proc = _train(cfg, tmp_path)
    log_file = _log_with(tmp_path / "exp", "[TRAIN] fold 0 epoch=1 step=1/6", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert proc.returncode == 143, describe(result)
    assert last_line(out) == "[EXIT] TRAINING INTERRUPTED code=143", describe(result)
    assert last_line(err).startswith("stopped by SIGTERM after fold 0 epoch"), describe(result)
    assert "Traceback" not in err and "error:" not in err, describe(result)
    run = log_file.parent
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    assert last_line(log_file.read_text()).endswith("[EXIT] TRAINING INTERRUPTED code=143")

    proc = _train(cfg, tmp_path, "--resume")
    out, err = proc.communicate(timeout=300)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert proc.returncode == 0, describe(result)
    assert comparable(run) == uninterrupted


def _rank_pid(launcher: int, rank: int, timeout: float = 120) -> int:
    """The PID of torchrun's worker process of ``rank`` (its environment says RANK=...)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{launcher}/task").iterdir():
            for pid in (task / "children").read_text().split():
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in env:
                    return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} process under torchrun {launcher}")


@pytest.mark.dist
@pytest.mark.slow
def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    """SIGTERM reaches rank 1 only: the ranks agree (an all-reduced flag) and both stop, none waits forever in a
    collective; rank 0, which got no signal, writes the checkpoint and says why it stopped; resume finishes."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this Python")
    # 24 training images per rank in batches of 2: 12 updates an epoch, the ranks agree to stop at update 10
    root = write_data(tmp_path / "data", per_class=32, size=32).root
    raw = tiny_config(root, train={"batch_size": 2, "epochs": 2, "num_threads": 1, "log_interval": 1},
                      output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None}, tracking={"tensorboard": False})
    cfg = write_yaml(tmp_path / "cfg.yaml", raw)

    def launch(*flags: str) -> subprocess.Popen:
        return subprocess.Popen([str(torchrun), "--nproc_per_node=2", "--master_port=29767", "-m", "vistrain",
                                 "train", "--config", str(cfg), *flags], cwd=tmp_path, env=cli_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    proc = launch()
    log = _log_with(tmp_path / "exp", "[TRAIN] fold 0 epoch=1 step=1/", proc)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    run = log.parent
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "interrupted" and status["exit_code"] == 143, (status, out[-3000:], err[-3000:])
    text = log.read_text()
    assert "[STOP] stopped by a preemption signal on another process after fold 0 epoch 1 step 10" in text, \
        text[-3000:]
    assert last_line(text).endswith("[EXIT] TRAINING INTERRUPTED code=143")
    assert "stopped by SIGTERM after fold 0 epoch 1 step 10" in err, err[-3000:]  # rank 1's own line
    proc = launch("--resume")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert [(r["fold"], r["epoch"]) for r in read_metrics(run)] == [(0, 1), (0, 2)]
    # The interrupted epoch's train_loss is the job's mean over both ranks' images, as without the signal: the
    # checkpoint holds the loss sums of every rank, and only rank 0 goes on from them (BatchNorm's running
    # statistics are rank 0's after the resume, so validation may differ a little; training does not use them).
    reference = write_yaml(tmp_path / "ref.yaml", {**raw, "output": {"exp_dir": str(tmp_path / "ref"),
                                                                      "logs_dir": None}})
    proc = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_port=29768", "-m", "vistrain", "train",
                           "--config", str(reference)], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = [r["train_loss"] for r in read_metrics(only_run_dir(tmp_path / "ref"))]
    assert [r["train_loss"] for r in read_metrics(run)] == pytest.approx(expected, rel=1e-6, abs=1e-7)
