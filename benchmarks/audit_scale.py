"""How long does ``vistrain audit RUN`` take on 20,000 images, and how much memory does it hold?

    python benchmarks/audit_scale.py [--images 20000] [--work DIR] [--cores 2] [--epochs 1] [--split ratio|kfold]

1. Writes ``--images`` generated 64 px PNGs (a grey gradient and class-coloured boxes, 4 classes; 1% of them exact
   copies of another image) with ``train.csv`` (ID, target, fold) under ``--work`` (reused when present, as is
   the run; delete ``--work`` to start over).
2. Makes the existing run the audit needs (not timed: setup): ``vistrain train`` of a resnet10t at 32 px,
   ``--epochs`` epochs, ``--split ratio`` (default; quick to make on a busy CPU): trained on 10% of the images,
   validated on 45%, tested on 45%, so the audit also predicts the 9,000 test images (its held-out
   probabilities) on top of the features of all 20,000: the slower of the two paths; ``--split kfold``: 2
   folds, every fold trained (``data.valid_fold=all``: out-of-fold logits).
3. Times ``vistrain audit RUN`` in a child process pinned to ``--cores`` cores (``taskset`` when present;
   ``OMP_NUM_THREADS`` = cores) and prints its wall and CPU seconds and peak resident memory (``os.wait4``'s
   ``ru_maxrss`` of that child), the CPU count and the load average (a busy machine inflates wall time; CPU
   seconds say more).

The acceptance bar (issue 13): under 5 minutes on 2 cores, memory bounded (hash and embedding searches in
blocks: no N x N matrix).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

COLOURS = [(225, 35, 35), (35, 190, 60), (45, 65, 230), (235, 215, 30)]
SIZE = 64


def write_images(root: Path, n: int, seed: int = 0) -> None:
    if (root / "train.csv").is_file():
        return
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    lines = ["ID,target,fold"]
    for i in range(n):
        k = i % len(COLOURS)
        name = f"img_{i:05d}"
        if i % 100 == 99:  # an exact copy of an earlier image of the class
            shutil.copyfile(root / "train" / f"img_{i - 4 * int(rng.integers(1, 20)):05d}.png",
                            root / "train" / f"{name}.png")
        else:
            a = rng.uniform(0, 2 * np.pi)
            g = np.cos(a) * xx + np.sin(a) * yy
            arr = np.repeat((60 + 150 * (g - g.min()) / (np.ptp(g) + 1e-9))[..., None], 3, axis=2)
            for _ in range(rng.integers(3, 6)):
                x0, y0 = rng.integers(0, SIZE - 12, size=2)
                w, h = rng.integers(8, 24, size=2)
                arr[y0:y0 + h, x0:x0 + w] = COLOURS[k]
            arr += rng.normal(0, 6, arr.shape)
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / "train" / f"{name}.png")
        lines.append(f"{name},c{k},{(i // 4) % 2}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")  # written last: its presence means complete


def make_run(work: Path, epochs: int, split: str) -> Path:
    done = sorted(work.glob(f"exp/*/audit_scale_{split}-*/summary.json"))
    if done:
        return done[-1].parent
    data = {"folds": 2, "valid_fold": "all"} if split == "kfold" else \
        {"split": "ratio", "train_ratio": 0.1, "val_ratio": 0.45, "test_ratio": 0.45}
    cfg = {"project": {"name": f"audit_scale_{split}", "seed": 0},
           "data": {"source": "csv", "train_csv": str(work / "data" / "train.csv"),
                    "image_dir_train": str(work / "data" / "train"), "image_ext": ".png", **data},
           "model": {"name": "resnet10t", "pretrained": False},
           "train": {"img_size": 32, "batch_size": 128, "epochs": epochs, "lr": 3e-3, "warmup_epochs": 0,
                     "num_workers": 0, "device": "cpu"},
           "augment": {"policy": "none"}, "output": {"exp_dir": str(work / "exp"), "logs_dir": None},
           "tracking": {"tensorboard": False}}
    config = work / f"config_{split}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "vistrain", "train", "--config", str(config)], check=True,
                   stdout=subprocess.DEVNULL)
    return sorted(work.glob(f"exp/*/audit_scale_{split}-*/summary.json"))[-1].parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--work", type=Path, default=Path("/tmp/vistrain_audit_scale"))
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--split", choices=["ratio", "kfold"], default="ratio", help="the existing run's split")
    args = p.parse_args()
    t = time.time()
    write_images(args.work / "data", args.images)
    run = make_run(args.work, args.epochs, args.split)
    print(f"setup: {args.images} images and run {run} ready in {time.time() - t:.0f} s")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.cores), MKL_NUM_THREADS=str(args.cores), CI="true")
    pin = ["taskset", "-c", ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[: args.cores])] \
        if shutil.which("taskset") else []
    t = time.time()
    child = subprocess.Popen([*pin, sys.executable, "-m", "vistrain", "audit", str(run)], env=env)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own CPU time and peak memory
    wall = time.time() - t
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"audit failed with exit code {child.returncode}")
    print(f"audit of {args.images} images: wall {wall:.1f} s, CPU {usage.ru_utime + usage.ru_stime:.1f} s on "
          f"{args.cores} core(s), peak RSS {usage.ru_maxrss / 1024:.0f} MiB | {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
