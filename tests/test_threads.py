"""``train.num_threads``: one CPU thread count for torch, OpenMP/BLAS, OpenCV and onnxruntime, chosen so the
compute threads and the DataLoader workers do not fight over the same cores."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cli_command, cli_env, describe, only_run_dir, tiny_config, write_csv_dataset, write_yaml
from threadpoolctl import threadpool_info, threadpool_limits

from vistrain.config import config_to_dict, load_config
from vistrain.engine import device as dev
from vistrain.errors import ConfigError


@pytest.fixture
def restore_threads():
    """The test process's thread settings as they were before the test."""
    before = torch.get_num_threads()
    saved = threadpool_limits(limits=None)  # records the pools' limits, changes nothing
    cv2 = _cv2()
    cv2_before = cv2.getNumThreads() if cv2 else None
    yield
    saved.restore_original_limits()
    torch.set_num_threads(before)
    if cv2:
        cv2.setNumThreads(cv2_before)


def _cv2():
    try:
        import cv2
    except ImportError:
        return None
    return cv2


@pytest.mark.parametrize("cores, workers, expected", [(8, 3, 5), (2, 1, 1), (2, 4, 1), (1, 0, 1), (16, 0, 16)])
def test_auto_is_the_usable_cores_left_after_the_loader_workers(monkeypatch, cores, workers, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(100, 100 + cores)))
    monkeypatch.setattr(dev, "busy_cores", lambda: 0)  # an idle machine
    n, why = dev.resolve_num_threads("auto", workers)
    assert n == expected
    assert why == f"auto: {cores} usable cores - {workers} loader workers"


@pytest.mark.parametrize("cores, workers, busy, expected", [(2, 0, 1, 1), (8, 2, 3, 3), (2, 1, 2, 1)])
def test_auto_leaves_out_the_cores_other_processes_keep_busy(monkeypatch, cores, workers, busy, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(dev, "busy_cores", lambda: busy)
    n, why = dev.resolve_num_threads("auto", workers)
    assert n == expected
    assert why == f"auto: {cores} usable cores - {workers} loader workers - {busy} kept busy by other processes"


def test_busy_cores_sees_a_process_spinning_on_one_of_our_cores():
    """Measured, not mocked: a busy loop pinned to one of this process's cores counts as a busy core."""
    core = min(os.sched_getaffinity(0))
    spin = f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"
    spinner = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.5)  # let it start spinning
        assert dev.busy_cores.__wrapped__(window_s=0.5) >= 1
    finally:
        spinner.kill()
        spinner.wait()


def test_auto_honours_omp_num_threads_and_a_number_is_kept(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert dev.resolve_num_threads("auto", 1) == (3, "auto: OMP_NUM_THREADS=3")
    assert dev.resolve_num_threads(6, 1) == (6, "set in the config")


def test_apply_sets_torch_and_the_blas_pools(restore_threads):
    assert dev.apply_num_threads(1, 0) == 1
    assert torch.get_num_threads() == 1
    pools = threadpool_info()
    assert pools and all(p["num_threads"] == 1 for p in pools), pools
    cv2 = pytest.importorskip("cv2")
    assert cv2.getNumThreads() == 1


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_num_threads_below_one_is_a_config_error_naming_the_key(value):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=[f"train.num_threads={value}"])
    assert excinfo.value.problems and all(p.startswith("train.num_threads:") for p in excinfo.value.problems)
    assert load_config(None, overrides=["train.num_threads=2"]).train.num_threads == 2
    assert load_config(None).train.num_threads == "auto"


def fake_run(root: Path, num_threads: int) -> Path:
    """A run directory as ``load_run`` sees it (config, class map, a checkpoint file), without training."""
    cfg = load_config(None, overrides=[f"train.num_threads={num_threads}", "train.num_workers=0"])
    write_yaml(root / "config.yaml", config_to_dict(cfg))
    (root / "class_map.json").write_text('{"idx_to_class": {"0": "a", "1": "b"}}')
    (root / "ckpt").mkdir()
    (root / "ckpt" / "best_fold0.pth").write_bytes(b"")
    return root


def test_loading_a_run_applies_its_threads_capped_at_this_machines_cores(tmp_path, monkeypatch, restore_threads):
    from vistrain.engine.inference import load_run

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    load_run(fake_run(tmp_path / "one", 1))
    assert torch.get_num_threads() == 1
    load_run(fake_run(tmp_path / "many", 512))  # recorded on a bigger machine: not more threads than cores here
    assert torch.get_num_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # this command's environment wins over the recorded count
    load_run(tmp_path / "many")
    assert torch.get_num_threads() == 1


def test_train_without_omp_env_resolves_logs_and_records_the_threads(tmp_path):
    """With one loader worker, auto leaves one core fewer than torch's own default (every core)."""
    data = write_csv_dataset(tmp_path / "data", per_class=4)
    cfg = tiny_config(data.root, train={"epochs": 1, "num_workers": 1},
                      output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None}, tracking={"tensorboard": False})
    env = {k: v for k, v in cli_env().items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    res = subprocess.run(cli_command("train", "--config", str(write_yaml(tmp_path / "cfg.yaml", cfg))),
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, describe(res)
    cores = len(os.sched_getaffinity(0))
    run = only_run_dir(tmp_path / "exp")
    log = (run / "train.log").read_text()
    # Other processes (a parallel test worker) may keep cores busy: the line then says how many it left out.
    found = re.search(rf"\[CFG\] train.num_threads=(\d+) \(auto: {cores} usable cores - 1 loader workers"
                      r"(?: - (\d+) kept busy by other processes)?\)", log)
    assert found, log
    expected = max(cores - 1 - int(found[2] or 0), 1)
    assert int(found[1]) == expected
    assert f"device=cpu ({expected} threads)" in log, "the [BOOT] line shows the threads training runs with"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["num_threads"] == expected
