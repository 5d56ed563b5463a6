"""Shared Optuna studies: workers in separate processes on one storage (SQLite, and a real PostgreSQL server
when its binaries are here) reach exactly ``n_trials`` ended trials in total, and a worker killed mid-trial
leaves its trial failed (heartbeat) while the study goes on without it."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import cli_env, tiny_config, write_yaml
from postgres import postgres_server, unavailable

optuna = pytest.importorskip("optuna")

LR_SPACE = {"train.lr": {"type": "categorical", "choices": ["1e-9", 3e-3, 1e-3, 3e-4]}}

# A worker process with a fake trainer ($EPOCH_S seconds per epoch), so the workers' trials overlap and write to
# the database at once; lr 1e-9 scores low, so the pruner has work too. The fake stands in for the whole train
# module and the hooks package (its Reporter is the report function itself), so a worker never imports torch or timm.
WORKER = textwrap.dedent("""
    import os, sys, time, types
    from pathlib import Path
    from vistrain.config.loader import load_config

    def run_train(cfg, folds=None, hooks=(), **kwargs):
        (report,) = hooks
        for epoch in range(1, cfg.train.epochs + 1):
            time.sleep(float(os.environ.get("EPOCH_S", "0.3")))
            report({"fold": folds[0], "epoch": epoch, "macro_f1": 0.1 if cfg.train.lr < 1e-6 else 0.5 + epoch / 10})
        return types.SimpleNamespace(run_dir=Path(cfg.output.exp_dir), summary={"mean": {"macro_f1": 0.7}})

    sys.modules["vistrain.engine.training"] = types.SimpleNamespace(run_train=run_train)
    sys.modules["vistrain.engine.hooks"] = types.SimpleNamespace(Reporter=lambda report: report)
    from vistrain.tuning import run as tune
    tune.write_plots = lambda study, out: {}
    tune.run_tune(load_config(sys.argv[1]), n_trials=int(sys.argv[3]), storage=sys.argv[2], study_name="shared")
""")


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with postgres_server() as url:
        yield url


def _config(tmp_path: Path) -> Path:
    raw = tiny_config(tmp_path, output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None})
    raw["tune"] = {"epochs": 2, "space": LR_SPACE, "heartbeat_s": 1}
    return write_yaml(tmp_path / "tune.yaml", raw)


def _worker(config: Path, url: str, n_trials: int, cwd: Path, epoch_s: float = 0.3) -> subprocess.Popen:
    env = {**cli_env(), "OMP_NUM_THREADS": "1", "EPOCH_S": str(epoch_s)}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(config), url, str(n_trials)], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _ended(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """What counts towards n_trials: completed, pruned, failed by the training (not surplus, not lost)."""
    from optuna.trial import TrialState

    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and "fail_reason" in t.user_attrs)]


def test_two_workers_reach_exactly_n_trials_in_total(storage: str, tmp_path: Path) -> None:
    config = _config(tmp_path)
    workers = [_worker(config, storage, 5, tmp_path) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    for w, out in zip(workers, outputs):
        assert w.returncode == 0, out[-3000:]
    study = optuna.load_study(study_name="shared", storage=storage)
    ended = _ended(study)
    assert len(ended) == 5, [(t.number, t.state.name, t.user_attrs) for t in study.trials]
    assert len({t.number for t in ended}) == 5  # none counted twice
    # Anything else in the study is a trial refused at the race for the last slot, never run.
    assert all(t.user_attrs.get("surplus") for t in study.trials if t not in ended)
    assert all("[TUNE] trial" in out for out in outputs), "both workers ran trials"
    assert len(list((tmp_path / "exp").glob("*/*_tune"))) == 2  # one tune directory per worker


def test_a_killed_worker_leaves_its_trial_failed_and_the_study_goes_on(storage: str, tmp_path: Path) -> None:
    config = _config(tmp_path)
    slow = _worker(config, storage, 3, tmp_path, epoch_s=60)  # its first trial never ends by itself
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the slow worker's trial is running in the database
            try:
                study = optuna.load_study(study_name="shared", storage=storage)
                if any(t.state.name == "RUNNING" for t in study.trials):
                    break
            except KeyError:  # the study is not created yet
                pass
            assert slow.poll() is None, slow.communicate()[0][-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("the first worker never started a trial")
    finally:
        slow.send_signal(signal.SIGKILL)
        slow.wait(timeout=30)
    survivor = _worker(config, storage, 3, tmp_path)
    out = survivor.communicate(timeout=300)[0]
    assert survivor.returncode == 0, out[-3000:]
    study = optuna.load_study(study_name="shared", storage=storage)
    killed = study.trials[0]
    assert killed.state.name == "FAIL" and "fail_reason" not in killed.user_attrs  # failed by the heartbeat
    assert len(_ended(study)) == 3, [(t.number, t.state.name) for t in study.trials]
    assert "RUNNING" not in {t.state.name for t in study.trials}
