"""How do ``vistrain audit --config`` and ``vistrain audit RUN`` grow with the data: wall and CPU seconds, peak memory.

    python benchmarks/audit_scale.py [--images 20000 40000] [--modes config run] [--work DIR] [--cores 2]

1. Writes ``max(--images)`` generated 64 px PNGs under ``--work`` (reused when present): 10 classes, each one
   pattern (a gradient and a few coloured boxes, drawn once per class) plus pixel noise, so that every image of a
   class looks like every other (the data set of issue 18 that flooded the old pair rule); every 100th image is
   an exact copy of an earlier one of its class. A size N audits the first N rows (``data/train_N.csv``).
2. ``config``: times ``vistrain audit --config`` (a resnet10t at 32 px, random init: the backbone's features for
   the outliers; near duplicates by pixels).
   ``run``: first makes the run the audit reads (not timed: setup; reused when present), as cheap as a run can
   be: a ratio split that trains one epoch on 2% of the images and validates on 2%, so the audit predicts the
   other 96% as its held-out test probabilities and embeds every image with the trained model (the heavier of
   the two paths); then times ``vistrain audit RUN``.
3. Each audit runs in a child process pinned to ``--cores`` cores (``taskset`` when present; ``OMP_NUM_THREADS``
   = cores); printed per size and mode: wall and CPU seconds, peak resident memory (``os.wait4``'s ``ru_maxrss``
   of that child), the duplicate groups found, and the load average before and after (a busy machine inflates
   wall time; CPU seconds say more). ``--json F`` also writes the rows.

The acceptance bar (issue 18): 20,000 and 40,000 images, both modes, within 2 GB peak, time growing near-linearly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

SIZE = 64
CLASSES = 10
NOISE = 12.0  # grey levels of pixel noise (std) on each class's pattern


def class_patterns(seed: int = 0) -> np.ndarray:
    """[CLASSES, SIZE, SIZE, 3] float: a grey gradient at a class's own angle with 3-5 boxes of a class colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = np.empty((CLASSES, SIZE, SIZE, 3))
    for k in range(CLASSES):
        a = rng.uniform(0, 2 * np.pi)
        g = np.cos(a) * xx + np.sin(a) * yy
        out[k] = (60 + 150 * (g - g.min()) / (np.ptp(g) + 1e-9))[..., None]
        colour = rng.integers(20, 236, size=3)
        for _ in range(rng.integers(3, 6)):
            x0, y0 = rng.integers(0, SIZE - 12, size=2)
            w, h = rng.integers(8, 24, size=2)
            out[k, y0:y0 + h, x0:x0 + w] = colour
    return out


def write_images(root: Path, n: int, seed: int = 0) -> None:
    if (root / "train.csv").is_file() and len((root / "train.csv").read_text().splitlines()) > n:
        return
    rng = np.random.default_rng(seed)
    patterns = class_patterns(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    lines = ["ID,target"]
    for i in range(n):
        k = i % CLASSES
        name = f"img_{i:05d}"
        if i % 100 == 99:  # an exact copy of an earlier image of the class
            shutil.copyfile(root / "train" / f"img_{i - CLASSES * int(rng.integers(1, 9)):05d}.png",
                            root / "train" / f"{name}.png")
        else:
            arr = patterns[k] + rng.normal(0, NOISE, patterns[k].shape)
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / "train" / f"{name}.png",
                                                                        compress_level=1)
        lines.append(f"{name},c{k}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")  # written last: its presence means complete


def config_for(work: Path, n: int, mode: str) -> Path:
    """The config of size ``n``: the first n rows of train.csv."""
    rows = (work / "data" / "train.csv").read_text().splitlines()
    csv = work / "data" / f"train_{n}.csv"
    if not csv.is_file():
        csv.write_text("\n".join(rows[: n + 1]) + "\n")
    data = {"split": "ratio", "train_ratio": 0.02, "val_ratio": 0.02, "test_ratio": 0.96} if mode == "run" else {}
    cfg = {"project": {"name": f"audit_scale_{n}", "seed": 0},
           "data": {"source": "csv", "train_csv": str(csv), "image_dir_train": str(work / "data" / "train"),
                    "image_ext": ".png", "cache": "off", **data},
           "model": {"name": "resnet10t", "pretrained": False},
           "train": {"img_size": 32, "batch_size": 128, "epochs": 1, "lr": 3e-3, "warmup_epochs": 0,
                     "num_workers": 0, "device": "cpu"},
           "augment": {"policy": "none"}, "output": {"exp_dir": str(work / "exp"), "logs_dir": None},
           "tracking": {"tensorboard": False}}
    config = work / f"config_{mode}_{n}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config


def make_run(work: Path, n: int) -> Path:
    done = sorted(work.glob(f"exp/*/audit_scale_{n}-*/summary.json"))
    if done:
        return done[-1].parent
    subprocess.run([sys.executable, "-m", "vistrain", "train", "--config", str(config_for(work, n, "run"))],
                   check=True, stdout=subprocess.DEVNULL)
    return sorted(work.glob(f"exp/*/audit_scale_{n}-*/summary.json"))[-1].parent


def timed_audit(args: list[str], cores: int) -> dict:
    """Run ``vistrain audit ARGS`` pinned to ``cores`` cores: wall, CPU and peak memory of that child."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cores), MKL_NUM_THREADS=str(cores), CI="true")
    pin = ["taskset", "-c", ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:cores])] \
        if shutil.which("taskset") else []
    load_before = os.getloadavg()[0]
    t = time.time()
    child = subprocess.Popen([*pin, sys.executable, "-m", "vistrain", "audit", *args], env=env,
                             stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own CPU time and peak memory
    wall = time.time() - t
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"audit {' '.join(args)} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, nargs="+", default=[20000, 40000])
    p.add_argument("--modes", nargs="+", choices=["config", "run"], default=["config", "run"])
    p.add_argument("--work", type=Path, default=Path("/tmp/vistrain_audit_scale"))
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = p.parse_args()
    t = time.time()
    write_images(args.work / "data", max(args.images))
    print(f"data: {max(args.images)} images ready in {time.time() - t:.0f} s | {os.cpu_count()} CPUs", flush=True)
    rows = []
    for n in args.images:
        for mode in args.modes:
            out = args.work / f"audit_{mode}_{n}"
            if mode == "run":
                t = time.time()
                run = make_run(args.work, n)
                print(f"setup: run {run} ready in {time.time() - t:.0f} s", flush=True)
                row = timed_audit([str(run), "--output", str(out)], args.cores)
            else:
                row = timed_audit(["--config", str(config_for(args.work, n, "config")), "--output", str(out)],
                                  args.cores)
            dups = json.loads((out / "audit.json").read_text())["duplicates"]
            row = {"images": n, "mode": mode, **row, "dup_groups": dups["groups"], "near": dups["near"],
                   "exact": dups["exact"]}
            rows.append(row)
            print(" | ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
