"""Two runs at once (issue 12 item 9): runs started in the same second in one ``output.exp_dir`` get distinct
run directories; ``--resume`` of a run that a live process is training is refused with exit 2 (``RUN/.lock`` with
its PID); a dead process's lock is taken over, said in the log."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import Started, describe, run_dirs, tiny_config, write_csv_dataset, write_yaml
from test_run_outcome import main_captured

from vistrain.config import load_config
from vistrain.errors import UserError
from vistrain.tracking import rundir

FIXED = datetime(2026, 1, 2, 3, 4, 5)


class _Frozen(datetime):
    @classmethod
    def now(cls, tz=None):  # noqa: ANN001, ANN206
        return FIXED


def test_runs_started_in_the_same_second_get_distinct_directories(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """8 threads create a run with the same clock second and the same random part: 8 directories, each with its
    own run.json and lock."""
    data = write_csv_dataset(tmp_path / "data", per_class=2, size=8)
    raw = tiny_config(data.root, output={"exp_dir": str(tmp_path / "exp")})
    cfg = load_config(write_yaml(tmp_path / "c.yaml", raw))
    monkeypatch.setattr(rundir, "datetime", _Frozen)
    monkeypatch.setattr(rundir.secrets, "token_hex", lambda n: "abcdef")
    barrier = threading.Barrier(8)
    runs: list[rundir.RunDir] = []

    def start() -> None:
        barrier.wait()
        runs.append(rundir.new_run(cfg))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    paths = sorted(r.path for r in runs)
    assert len(set(paths)) == 8, paths
    assert paths[0].name == "tiny-030405-abcdef" and {p.name for p in paths[1:]} == \
        {f"tiny-030405-abcdef-{n}" for n in range(2, 9)}
    for run in runs:
        assert json.loads((run / "run.json").read_text())["run_id"] == run.path.name
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
        rundir.release_lock(run)
        assert not (run / ".lock").exists()


def test_run_dir_creation_in_two_processes_never_shares_a_directory(tmp_path: Path) -> None:
    """Two processes racing for the same names (20 each): every directory has one owner."""
    code = ("import sys; from pathlib import Path; from vistrain.tracking.rundir import make_run_dir;"
            "print('\\n'.join(str(make_run_dir(Path(sys.argv[1]), 'same')) for _ in range(20)))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    made = [line for p in procs for line in p.communicate(timeout=120)[0].split()]
    assert all(p.returncode == 0 for p in procs)
    assert len(made) == 40 and len(set(made)) == 40


def test_a_dead_processes_lock_is_taken_over_and_logged(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run = rundir.RunDir(tmp_path)
    (tmp_path / ".lock").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "x"}))
    rundir.acquire_lock(run)
    assert run.locked and json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert run.notes == [f"[LOCK] {tmp_path / '.lock'}: stale lock of PID {gone.pid} (no longer running) taken over"]


def test_a_lock_of_another_host_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "x"}))
    with pytest.raises(UserError, match="locked by PID 1 on host elsewhere.example .*delete the lock file"):
        rundir.acquire_lock(rundir.RunDir(tmp_path))


def test_resume_of_a_run_a_live_process_trains_is_exit_2(tmp_path: Path) -> None:
    data = write_csv_dataset(tmp_path / "data", per_class=6, size=32)
    exp = tmp_path / "exp"
    config = write_yaml(tmp_path / "c.yaml", tiny_config(
        data.root, output={"exp_dir": str(exp), "logs_dir": None}, tracking={"tensorboard": False},
        train={"epochs": 500}))
    live = Started("train", "--config", str(config), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not (run_dirs(exp) and (run_dirs(exp)[0] / "config.yaml").is_file()):
            assert live.running(), describe(live.wait())
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.1)
        (run,) = run_dirs(exp)
        lock_before = (run / ".lock").read_text()
        for argv in (["--resume", str(run)], ["--config", str(config), "--resume"]):
            r = main_captured("train", *argv)
            assert r.returncode == 2, describe(r)
            assert f"is being trained by PID {live.proc.pid} on {socket.gethostname()}" in r.stderr, describe(r)
            assert str(run / ".lock") in r.stderr
        assert live.running(), "the live run must go on"
        assert (run / ".lock").read_text() == lock_before, "the refused resume must leave the lock alone"
        assert len(run_dirs(exp)) == 1
    finally:
        live.kill()
