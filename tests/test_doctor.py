"""``vistrain doctor`` on this machine, and its warnings with the probes faked."""

from __future__ import annotations

import os
import re

import pytest
import torch

from vistrain.config.loader import load_config
from vistrain.engine import device as dev
from vistrain.engine import doctor
from vistrain.engine.doctor import run_doctor
from vistrain.errors import UserError

NO_GPU = not torch.cuda.is_available()


def test_report_has_every_probe(capsys: pytest.CaptureFixture[str]) -> None:
    info = run_doctor(None)
    for key in ("python", "torch", "cuda", "cudnn", "gpus", "device", "precision", "tf32", "num_workers",
                "cpu_count", "shm_bytes", "warnings"):
        assert key in info, key
    out = capsys.readouterr().out
    assert "precision" in out and "num_workers" in out and info["torch"] in out


def test_reports_the_threads_auto_would_pick(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(dev, "busy_cores", lambda: 0)  # an idle machine (a parallel test may be running)
    cores = len(os.sched_getaffinity(0))
    info = run_doctor(load_config(None, overrides=["train.num_workers=1", "train.device=cpu"]))
    assert info["num_threads"] == max(cores - 1, 1)
    row = rf"^num_threads +{max(cores - 1, 1)} \(auto: {cores} usable cores - 1 loader workers\)$"
    assert re.search(row, capsys.readouterr().out, re.M)
    assert run_doctor(load_config(None, overrides=["train.num_threads=3"]))["num_threads"] == 3


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_without_a_gpu_fp32_and_a_cpu_warning() -> None:
    info = run_doctor(None)
    assert info["precision"] == "fp32" and info["device"] == "cpu" and info["gpus"] == [] and not info["tf32"]
    assert any("training will run on the CPU" in w for w in info["warnings"])


@pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU")
def test_with_a_gpu_reports_it_and_mixed_precision() -> None:
    info = run_doctor(None)
    assert info["gpus"] and info["gpus"][0]["memory_total_MiB"] > 0 and info["precision"] in ("bf16", "fp16")
    assert not any("training will run on the CPU" in w for w in info["warnings"])


def test_config_asking_for_a_missing_gpu_is_a_warning_not_a_crash() -> None:
    if not NO_GPU:
        pytest.skip("this machine has a GPU")
    info = run_doctor(load_config(None, overrides=["train.device=cuda"]))
    assert info["device"] == "cpu" and any(w.startswith("train.device: cuda") for w in info["warnings"])


def test_auto_batch_on_cpu_is_batch_size_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    if not NO_GPU:
        pytest.skip("on a GPU the search runs a real model (test_autobatch covers it)")
    cfg = load_config(None, overrides=["train.batch_size=auto", "train.batch_size_cpu=24", "model.name=test_resnet"])
    info = run_doctor(cfg, auto_batch=True)
    assert info["auto_batch"]["batch_size"] == 24 and "batch_size_cpu" in info["auto_batch"]["why"]
    assert "auto batch size" in capsys.readouterr().out


def test_auto_batch_needs_a_config() -> None:
    with pytest.raises(UserError, match="--auto-batch: needs --config"):
        run_doctor(None, auto_batch=True)


def test_small_shm_and_old_driver_are_warned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "_shm_bytes", lambda: 64 * 2**20)
    monkeypatch.setattr(doctor, "_driver", lambda: {"driver": "470.57", "cuda": "11.4"})
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    info = run_doctor(None)
    assert any(w.startswith("/dev/shm is 64 MiB") for w in info["warnings"])
    assert any(w.startswith("old driver: 470.57 supports CUDA 11.4") for w in info["warnings"])


def test_cli_doctor(capsys: pytest.CaptureFixture[str]) -> None:
    from vistrain.cli import main

    assert main(["doctor"]) == 0
    assert "precision" in capsys.readouterr().out
    assert main(["doctor", "--auto-batch"]) == 2
    assert capsys.readouterr().err.strip() == "error: --auto-batch: needs --config (the model and image size to try)"
