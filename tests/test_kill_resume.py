"""Kills at any moment (issue 12 item 1, issue 19 item 3), the suite's short version of
``benchmarks/kill_resume.py``: one run with real training settings (hard augmentation in 2 persistent DataLoader
workers, mixup + cutmix, EMA, dropout, gradient accumulation 2) SIGKILLed a while after an epoch's row and while a
checkpoint is written, resumed each time, finishes with valid files and the uninterrupted run's metrics bit for
bit. The full sweep (15 kills) is the slow test."""

from __future__ import annotations

import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kill_resume  # noqa: E402


def test_two_kills_with_workers_augmentation_mixup_ema_then_resume_equal_an_uninterrupted_run(tmp_path: Path
                                                                                               ) -> None:
    data = kill_resume.write_data(tmp_path / "data")
    with ThreadPoolExecutor(2) as pool:  # the uninterrupted run goes beside the killed one
        want = pool.submit(kill_resume.reference, tmp_path, data)
        trial = kill_resume.chain(tmp_path / "killed", data, ("mid-epoch", "checkpoint"), random.Random(0),
                                  want.result)
    assert trial.ok, f"killed: {trial.killed_at}; problems: {trial.problems}"
    assert "(not killed)" not in trial.killed_at, trial.killed_at


@pytest.mark.slow
@pytest.mark.sweep  # ~15 x a short run: only with -m slow (or: python benchmarks/kill_resume.py)
def test_kill_sweep_of_15_moments(tmp_path: Path) -> None:
    trials = kill_resume.sweep(15, 0, tmp_path)
    failed = [t for t in trials if not t.ok]
    assert not failed, failed
