"""``train.num_threads``: one CPU thread count for torch, OpenMP/BLAS, OpenCV and onnxruntime, chosen so the
compute threads and the DataLoader workers do not fight over the same cores."""

from __future__ import annotations

import json
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


def _cores(monkeypatch, cores: int, busy: int = 0) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(dev, "busy_cores", lambda: busy)


@pytest.mark.parametrize("cores, cached, workers, threads", [
    (2, True, 0, 2),  # the issue: 1 worker + 1 thread took 33 s, 0 workers + 2 threads 22 s
    (1, True, 0, 1), (4, True, 0, 4), (16, True, 2, 14), (64, True, 4, 60),
    (2, False, 1, 1), (8, False, 4, 4),  # decoding every epoch: the workers keep their share
])
def test_auto_split_on_the_cpu_knows_the_cache(monkeypatch, cores, cached, workers, threads):
    """With the decode-once cache the loader only augments: below 8 cores every core computes and the training
    process loads between steps; without the cache half the cores decode."""
    _cores(monkeypatch, cores)
    cpu = torch.device("cpu")
    assert dev.auto_workers("auto", cpu, cached) == workers
    assert dev.resolve_num_threads("auto", workers)[0] == threads
    why = dev.workers_reason("auto", cpu, cached)
    assert ("the cache holds decoded pixels" in why) == cached and f"{cores} usable cores" in why
    assert dev.auto_workers(3, cpu, cached) == 3 and dev.workers_reason(3, cpu, cached) == "set in the config"


def test_auto_split_leaves_out_busy_cores_with_the_cache(monkeypatch):
    _cores(monkeypatch, 2, busy=1)
    workers = dev.auto_workers("auto", torch.device("cpu"), cached=True)
    assert (workers, dev.resolve_num_threads("auto", workers)[0]) == (0, 1)


@pytest.mark.parametrize("load, cores, warned", [(9.0, 2, True), (3.1, 2, True), (2.9, 2, False), (0.2, 16, False)])
def test_oversubscription_warns_when_the_load_is_well_above_the_cores(monkeypatch, load, cores, warned):
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    message = dev.oversubscription(2, 0)
    if not warned:
        assert message is None
        return
    assert message is not None and f"load average {load:.1f} on {cores} cores" in message
    assert "2 compute thread(s) and 0 loader worker(s)" in message


def test_oversubscription_is_silent_where_the_load_cannot_be_read(monkeypatch):
    def unreadable():
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", unreadable)
    assert dev.oversubscription(2, 0) is None


def test_training_logs_the_split_and_the_oversubscription_warning(monkeypatch, caplog):
    """What a CPU run records: workers and threads with the reason, and a warning under load."""
    from vistrain.engine.run_setup import Machine, resolve_auto

    _cores(monkeypatch, 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (10.0, 8.0, 6.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    cfg = load_config(None, overrides=["train.device=cpu"])
    cpu = torch.device("cpu")
    with caplog.at_level("INFO", logger="vistrain.engine.run_setup"):
        resolved = resolve_auto(cfg, Machine(cpu, dev.pick_precision("auto", cpu)), 2, cached=True)
    assert (resolved.train.num_workers, resolved.train.num_threads) == (0, 2)
    text = caplog.text
    assert "[CFG] train.num_workers=0 (auto: the cache holds decoded pixels" in text
    assert "[CFG] train.num_threads=2 (auto: 2 usable cores - 0 loader workers)" in text
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "oversubscribed" in r.getMessage()]
    assert warned and "load average 10.0 on 2 cores" in warned[0].getMessage()


def test_train_with_the_defaults_computes_on_every_free_core(tmp_path):
    """The default ``data.cache: auto`` caches, so on a machine of under 8 cores the automatic split is 0 workers and
    every core not kept busy by other processes computing (it was 1 worker + the cores left)."""
    cores = len(os.sched_getaffinity(0))
    if cores >= 8:
        pytest.skip("a machine of 8 cores or more gives the cached loader a worker")
    data = write_csv_dataset(tmp_path / "data", per_class=4)
    cfg = tiny_config(data.root, train={"epochs": 1}, output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None},
                      tracking={"tensorboard": False})
    cfg["train"].pop("num_workers", None)
    cfg["train"].pop("num_threads", None)
    env = {k: v for k, v in cli_env().items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    res = subprocess.run(cli_command("train", "--config", str(write_yaml(tmp_path / "cfg.yaml", cfg))),
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, describe(res)
    run = only_run_dir(tmp_path / "exp")
    log = (run / "train.log").read_text()
    assert "[CFG] train.num_workers=0 (auto: the cache holds decoded pixels" in log, log
    found = re.search(rf"\[CFG\] train.num_threads=(\d+) \(auto: {cores} usable cores - 0 loader workers"
                      r"(?: - (\d+) kept busy by other processes)?\)", log)
    assert found, log
    assert int(found[1]) == max(cores - int(found[2] or 0), 1)
    recorded = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert (recorded["num_workers"], recorded["num_threads"]) == (0, int(found[1]))


@pytest.mark.slow
@pytest.mark.sweep
def test_throughput_sweep_times_each_split_and_the_automatic_one(tmp_path):
    """``benchmarks/throughput.py --sweep`` at toy sizes: a row per split, the automatic choice with its reason and
    its gap to the best split, in the JSON and the printed table."""
    out = tmp_path / "sweep.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
    res = subprocess.run([sys.executable, str(script), "--sweep", "--images", "24", "--image-size", "64x48",
                          "--img-size", "32", "--epochs", "1", "--batch", "8", "--sweep-workers", "0,1",
                          "--sweep-threads", "1", "--out", str(out)], cwd=tmp_path, env=cli_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, describe(res)
    report = json.loads(out.read_text())
    assert [r["split"] for r in report["rows"]] == ["0x1", "1x1", "auto"]
    assert all(r["train_s"] > 0 for r in report["rows"])
    auto = report["auto"]
    assert auto["threads"] == 1  # cli_env sets OMP_NUM_THREADS=1, which auto takes
    assert auto["workers"] == (0 if len(os.sched_getaffinity(0)) < 8 else 1)
    best = min(r["train_s"] for r in report["rows"] if r["split"] != "auto")
    assert auto["gap_to_best"] == pytest.approx(auto["train_s"] / best - 1, abs=1e-3)
    assert "the cache holds decoded pixels" in auto["why"]["num_workers"]
    assert "automatic settings chose" in res.stdout and "gap to the best split" in res.stdout
    assert len(report["load_avg_1m_before_after"]) == 2
