"""Two machines on one (issue 19 item 6): two ``torchrun`` launchers (``--nnodes=2 --nproc_per_node=1``, a c10d
rendezvous on 127.0.0.1, gloo) train the digits into one run directory; one process with the same global batch
(``2 x train.batch_size``) on the same data ends within a stated tolerance of it.

Each launcher stands for a machine with its own local disk for the decode cache (``data.cache: disk``,
``data.cache_dir`` the same path on both, as a node-local NVMe mount would be): the second launcher runs in its own
mount namespace (``unshare --mount``) where that path is another folder. Where the system does not permit that, both
launchers share the folder (``node_isolation()`` says which).

Why the two runs differ at all: the ranks' shares of an epoch together are exactly the single process's batches
(``RankShare`` deals the same seeded permutation out index by index, and DDP averages the two halves' gradients),
so only BatchNorm differs: each rank normalises with the statistics of its half-batch and evaluates with rank 0's
running statistics; plus the order of floating-point sums. (And the logged ``train_loss``, until it is the mean over
ranks: rank 0's mean over its half of the epoch.) ``--model test_efficientnet_gn`` (GroupNorm) leaves rounding alone.

    PYTHONPATH=src python benchmarks/multinode.py --seeds 5 [--model test_efficientnet_gn]

prints, per seed, each metric of the final epoch of both runs and their difference, then the largest difference;
``tests/test_multinode.py`` runs one seed and asserts the tolerance chosen from this sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

GAP_KEYS = ("train_loss", "valid_loss", "macro_f1", "accuracy")
PER_CLASS = 40  # 400 digits: 320 training images (10 batches of 32 an epoch), 80 for validation
BATCH = 16  # per process on the two nodes; the single process trains with 2 x BATCH
EPOCHS = 4  # enough for a settled model (macro-F1 ~0.95): an untrained one's metrics are noise


@dataclass
class Launch:
    """What the launchers printed and the run directory they wrote."""

    results: list[subprocess.CompletedProcess]
    run: Path

    @property
    def stdout(self) -> str:
        return "".join(r.stdout for r in self.results)

    def describe(self) -> str:
        return "\n".join(f"--- launcher {i} exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
                         for i, r in enumerate(self.results))


def env() -> dict[str, str]:
    """One intra-op thread per process (two 'machines' share this CPU) and this checkout's source first."""
    out = dict(os.environ, CI="true", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    out["PYTHONPATH"] = os.pathsep.join([src, out["PYTHONPATH"]]) if out.get("PYTHONPATH") else src
    return out


def torchrun() -> str | None:
    beside = Path(sys.executable).with_name("torchrun")
    return str(beside) if beside.exists() else shutil.which("torchrun")


def write_data(root: Path, per_class: int = PER_CLASS) -> Path:
    """The demo's digits layout (32 px PNGs, ``write_digits``) with the first ``per_class`` images of each digit in
    train.csv; returns the folder."""
    from vistrain.data.demo import write_digits

    paths = write_digits(root)
    train = pd.read_csv(paths["train_csv"], dtype=str)
    train.groupby("target", group_keys=False).head(per_class).to_csv(paths["train_csv"], index=False)
    return root


def write_config(root: Path, data: Path, seed: int = 7, epochs: int = EPOCHS, model: str = "resnet10t") -> Path:
    """A short CPU run on the digits: resnet10t from scratch, fold 0 of 5, no augmentation, the decode cache on
    ``root/local-disk`` (each node's own, see ``two_nodes``)."""
    cfg = {
        "project": {"name": "nodes", "seed": seed},
        "data": {"source": "csv", "train_csv": str(data / "train.csv"), "image_dir_train": str(data / "train"),
                 "image_ext": ".png", "folds": 5, "valid_fold": 0, "cache": "disk",
                 "cache_dir": str(root / "local-disk")},
        "model": {"name": model, "pretrained": False},
        "train": {"img_size": 32, "batch_size": BATCH, "epochs": epochs, "lr": 3e-3, "warmup_epochs": 0,
                  "early_stopping_patience": 0, "num_workers": 0, "log_interval": 0, "device": "cpu"},
        "augment": {"policy": "none"},
        "tracking": {"tensorboard": False},
        "output": {"exp_dir": str(root / "exp"), "logs_dir": None},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_isolation() -> bool:
    """Whether a process may get its own mount namespace here (root, or user namespaces enabled)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "--propagation", "private", "true"],
                           capture_output=True)
    return probe.returncode == 0


def _on_own_disk(cmd: list[str], local: Path, own: Path) -> list[str]:
    """``cmd`` in a mount namespace where the folder ``local`` is ``own``: another machine's local disk."""
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    return ["unshare", "--mount", "--map-root-user", "--propagation", "private", "sh", "-c", script, "sh",
            str(own), str(local), *cmd]


def _run_dirs(exp: Path) -> list[Path]:
    return sorted(p.parent for p in exp.glob("*/*/run.json"))


def two_nodes(config: Path, *overrides: str, timeout: float = 300) -> Launch:
    """Two torchrun launchers, one process each, joining one c10d rendezvous (same id, node ranks assigned by the
    rendezvous), the second on its own 'local disk' (``root/local-disk-node2``) when ``node_isolation()``."""
    root = config.parent
    local = root / "local-disk"
    own = root / "local-disk-node2"
    local.mkdir(exist_ok=True)
    own.mkdir(exist_ok=True)
    before = set(_run_dirs(root / "exp"))
    launcher = torchrun()
    assert launcher is not None, "torchrun is not installed beside this Python"
    cmd = [launcher, "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{free_port()}", f"--rdzv_id=nodes-{os.getpid()}", "--max-restarts=0",
           "-m", "vistrain", "train", "--config", str(config), *overrides]
    commands = [cmd, _on_own_disk(cmd, local, own) if node_isolation() else cmd]
    outs = [tempfile.TemporaryFile("w+") for _ in commands]
    procs = [subprocess.Popen(c, cwd=root, env=env(), stdout=o, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for c, o in zip(commands, outs)]
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:  # a launcher left waiting for a rendezvous its partner will never join
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    results = []
    for c, p, o in zip(commands, procs, outs):
        o.seek(0)
        results.append(subprocess.CompletedProcess(c, p.returncode, o.read(), ""))
        o.close()
    new = [d for d in _run_dirs(root / "exp") if d not in before]
    return Launch(results, new[0] if len(new) == 1 else Path("<no single run directory>"))


def one_process(config: Path, *overrides: str, timeout: float = 300) -> Launch:
    """``python -m vistrain train`` with twice the batch: the two nodes' global batch in one process."""
    root = config.parent
    before = set(_run_dirs(root / "exp"))
    cmd = [sys.executable, "-m", "vistrain", "train", "--config", str(config), f"train.batch_size={2 * BATCH}",
           *overrides]
    res = subprocess.run(cmd, cwd=root, env=env(), capture_output=True, text=True, timeout=timeout)
    new = [d for d in _run_dirs(root / "exp") if d not in before]
    return Launch([res], new[0] if len(new) == 1 else Path("<no single run directory>"))


def rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def gaps(a: Path, b: Path) -> dict[str, float]:
    """|a - b| of each ``GAP_KEYS`` metric in the final epoch's row."""
    last_a, last_b = rows(a)[-1], rows(b)[-1]
    return {k: abs(last_a[k] - last_b[k]) for k in GAP_KEYS}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="project.seed 0..N-1 (each: one 2-node and one 1-process run)")
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--model", default="resnet10t", help="timm model (test_efficientnet_gn: no BatchNorm)")
    ap.add_argument("--per-class", type=int, default=PER_CLASS, help="training images of each digit")
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        data = write_data(work / "data", args.per_class)
        print(f"node-local disks: {'one per launcher (unshare)' if node_isolation() else 'shared'}")
        worst = dict.fromkeys(GAP_KEYS, 0.0)
        for seed in range(args.seeds):
            config = write_config(work / f"seed{seed}", data, seed, args.epochs, args.model)
            nodes, single = two_nodes(config), one_process(config)
            for launch in (nodes, single):
                if any(r.returncode for r in launch.results):
                    print(launch.describe())
                    return 1
            a, b = rows(nodes.run)[-1], rows(single.run)[-1]
            diff = gaps(nodes.run, single.run)
            print(f"seed {seed}: " + "  ".join(f"{k} {a[k]:.4f} / {b[k]:.4f} (diff {diff[k]:.2e})" for k in GAP_KEYS))
            worst = {k: max(worst[k], diff[k]) for k in GAP_KEYS}
        print("largest difference: " + "  ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
