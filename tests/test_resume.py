"""Resume: a run killed with SIGKILL continues in the same run directory, losing and repeating no epoch."""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import (
    Started,
    describe,
    last_line,
    read_metrics,
    run_cli,
    run_dirs,
    tiny_config,
    write_csv_dataset,
    write_yaml,
)

pytestmark = pytest.mark.slow

EPOCHS = 4
OVERRIDES = [f"train.epochs={EPOCHS}", "data.valid_fold=0", "data.folds=2"]


def setup_run(root: Path) -> tuple[Path, Path, Path]:
    """(config, exp_dir, workdir) for a 4-epoch single-fold run on 48 generated images."""
    data = write_csv_dataset(root / "data", classes=("a", "b", "c"), per_class=16)
    exp_dir = root / "exp"
    cfg = tiny_config(data.root, output={"exp_dir": str(exp_dir), "logs_dir": str(root / "logs")})
    config = write_yaml(root / "resume.yaml", cfg)
    workdir = root / "work"
    workdir.mkdir()
    return config, exp_dir, workdir


def wait_for(started: Started, ready, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if not started.running():
            pytest.fail(f"the run ended before {what}, so it could not be killed there\n{describe(started.wait())}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{describe(started.kill())}")
        time.sleep(0.05)


def kill_after_first_epoch(config: Path, exp_dir: Path, workdir: Path) -> tuple[Path, list[dict]]:
    """Start a run, SIGKILL it once metrics.jsonl holds a row; return its directory and rows by then."""
    started = Started("train", "--config", str(config), *OVERRIDES, cwd=workdir)

    def has_epoch() -> bool:
        dirs = run_dirs(exp_dir)
        return bool(dirs) and len(read_metrics(dirs[-1], complete_only=True)) >= 1

    wait_for(started, has_epoch, "the first epoch was written")
    killed = started.kill()
    assert killed.returncode != 0
    (run_dir,) = run_dirs(exp_dir)
    rows = read_metrics(run_dir, complete_only=True)
    assert 1 <= len(rows) < EPOCHS, f"killed too late to test anything: {len(rows)} epochs done"
    assert json.loads((run_dir / "run.json").read_text())["status"] != "success"
    return run_dir, rows


def assert_finished_once_per_epoch(run_dir: Path, rows_before: list[dict], result) -> None:
    assert result.returncode == 0, describe(result)
    assert last_line(result.stdout) == "[EXIT] TRAINING SUCCESS code=0", describe(result)
    rows = read_metrics(run_dir)
    assert [(r["fold"], r["epoch"]) for r in rows] == [(0, e) for e in range(1, EPOCHS + 1)], \
        f"metrics.jsonl must hold each epoch exactly once, in order: {[(r['fold'], r['epoch']) for r in rows]}"
    for before, after in zip(rows_before, rows):
        assert before == after, "epochs finished before the kill must keep their recorded metrics"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "success"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["folds"][0]["epochs_run"] == EPOCHS
    log = (run_dir / "train.log").read_text()
    assert "[RESUME]" in log
    assert sum(line.count("[BOOT]") for line in log.splitlines()) == 2, "train.log keeps the first attempt too"


@dataclass
class Flow:
    run_dir: Path  # the run that was killed
    rows_before: list[dict]  # its metrics rows at the kill
    result: subprocess.CompletedProcess | None = None  # the resuming command
    dirs_after: list[Path] = field(default_factory=list)  # run directories once it finished
    fresh_dirs: list[Path] = field(default_factory=list)  # run directories after the --fresh run started
    metrics_bytes_before: bytes = b""
    metrics_bytes_after_fresh: bytes = b""


def auto_resume_flow(root: Path) -> Flow:
    """kill -> ``train --config C OVERRIDES --resume``."""
    config, exp_dir, workdir = setup_run(root)
    flow = Flow(*kill_after_first_epoch(config, exp_dir, workdir))
    flow.result = run_cli("train", "--config", str(config), *OVERRIDES, "--resume", cwd=workdir)
    flow.dirs_after = run_dirs(exp_dir)
    return flow


def fresh_then_run_dir_flow(root: Path) -> Flow:
    """kill -> ``train ... --resume --fresh`` (killed once it has its directory) -> ``train --resume RUN_DIR``."""
    config, exp_dir, workdir = setup_run(root)
    flow = Flow(*kill_after_first_epoch(config, exp_dir, workdir))
    flow.metrics_bytes_before = (flow.run_dir / "metrics.jsonl").read_bytes()
    fresh = Started("train", "--config", str(config), *OVERRIDES, "--resume", "--fresh", cwd=workdir)
    wait_for(fresh, lambda: len(run_dirs(exp_dir)) > 1, "the --fresh run created its directory")
    fresh.kill()
    flow.fresh_dirs = run_dirs(exp_dir)
    flow.metrics_bytes_after_fresh = (flow.run_dir / "metrics.jsonl").read_bytes()
    flow.result = run_cli("train", "--resume", str(flow.run_dir), cwd=workdir)  # no --config needed
    flow.dirs_after = run_dirs(exp_dir)
    return flow


@pytest.fixture(scope="module")
def flows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Flow]:
    """Both flows at once (each is a chain of single-threaded processes; together they use both cores)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        auto = pool.submit(auto_resume_flow, tmp_path_factory.mktemp("resume_auto"))
        run_dir = pool.submit(fresh_then_run_dir_flow, tmp_path_factory.mktemp("resume_run_dir"))
        return {"auto": auto.result(), "run_dir": run_dir.result()}


def test_resume_continues_the_killed_run_in_the_same_directory(flows):
    flow = flows["auto"]
    assert flow.dirs_after == [flow.run_dir], "--resume must continue the killed run, not start another"
    assert_finished_once_per_epoch(flow.run_dir, flow.rows_before, flow.result)


def test_fresh_starts_a_new_directory_and_leaves_the_unfinished_run_alone(flows):
    flow = flows["run_dir"]
    assert len(flow.fresh_dirs) == 2 and flow.run_dir in flow.fresh_dirs, flow.fresh_dirs
    assert flow.metrics_bytes_after_fresh == flow.metrics_bytes_before, "--fresh must not touch the old run"


def test_resume_run_dir_continues_that_run(flows):
    flow = flows["run_dir"]
    assert flow.dirs_after == flow.fresh_dirs, "--resume RUN_DIR must not create a run directory"
    assert_finished_once_per_epoch(flow.run_dir, flow.rows_before, flow.result)


def test_ctrl_c_marks_the_run_interrupted_and_resume_picks_it_up(tmp_path: Path) -> None:
    """A run stopped with Ctrl-C says "interrupted" in run.json (not "error"); ``--resume`` continues it."""
    from vistrain.config import load_config
    from vistrain.engine.hooks import Reporter
    from vistrain.engine.training import run_train

    config, exp_dir, _ = setup_run(tmp_path)
    cfg = load_config(config, overrides=[f"train.epochs={EPOCHS}", "data.valid_fold=0", "data.folds=2"])

    def stop(row: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, hooks=[Reporter(stop)])
    (run_dir,) = run_dirs(exp_dir)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "interrupted", info
    assert run_train(cfg, resume=True).run_dir == run_dir
    assert [r["epoch"] for r in read_metrics(run_dir)] == list(range(1, EPOCHS + 1))
    # TensorBoard shows what metrics.jsonl holds: one event file, each epoch once.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [e.step for e in acc.Scalars("fold0/valid_loss")] == list(range(1, EPOCHS + 1))
