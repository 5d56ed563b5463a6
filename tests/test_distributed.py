"""Several processes (torchrun, gloo on the CPU): one run directory written by rank 0, one metrics row per
fold and epoch, checkpoints without DDP's ``module.`` prefix; each rank's share of an epoch is its own."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_env, tiny_config, write_csv_dataset, write_yaml
from torch.utils.data import RandomSampler

from vistrain.engine.distributed import RankShare


def test_rank_shares_are_disjoint_equal_and_cover_the_draw() -> None:
    shares = []
    for rank in range(3):
        g = torch.Generator().manual_seed(7)  # every rank seeds alike, as the loop does each epoch
        shares.append(list(RankShare(RandomSampler(range(20), generator=g), rank, 3)))
    assert [len(s) for s in shares] == [6, 6, 6]
    flat = [i for s in shares for i in s]
    assert len(set(flat)) == 18  # disjoint; the remainder of 20 / 3 is dropped


@pytest.mark.dist
@pytest.mark.slow
def test_torchrun_two_processes_share_one_run(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun not installed beside this Python")
    data = write_csv_dataset(tmp_path / "data", per_class=8)
    cfg = tiny_config(data.root, data={"valid_fold": "all"}, train={"batch_size": 4},
                      output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None})
    config = write_yaml(tmp_path / "cfg.yaml", cfg)
    cmd = [str(torchrun if torchrun.exists() else shutil.which("torchrun")), "--nproc_per_node=2",
           "--master_port=29731", "-m", "vistrain", "train", "--config", str(config)]
    res = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("[EXIT] TRAINING SUCCESS code=0") == 1  # rank 0 speaks for the run
    assert res.stdout.count("[DONE] run directory:") == 1
    (run,) = [p.parent for p in (tmp_path / "exp").glob("*/*/config.yaml")]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["fold"], r["epoch"]) for r in rows] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["environment"]["processes"] == 2 and "oof" in summary
    state = torch.load(run / "ckpt" / "best_fold0.pth", map_location="cpu", weights_only=False)["model"]
    assert not any(k.startswith("module.") for k in state)
    log = (run / "train.log").read_text()
    assert "processes=2" in log
    assert log.count("[EXIT]") == 1 and log.rstrip().endswith("[EXIT] TRAINING SUCCESS code=0")  # rank 0 only
