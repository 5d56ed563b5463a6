"""Training throughput through ``vistrain train``'s real data path against the pure training step, in one process.

    python benchmarks/throughput.py [--model resnet10t] [--img-size 32] [--batch 64] [--precision auto]
        [--images 2000] [--image-size 470x360] [--epochs 2] [--variants off,cache] [--compile no|yes|both]
        [--workers auto] [--threads N] [--out throughput.json]

Generates a folder of JPEGs (smooth colour fields with noise, two classes; reused from ``--data`` when given),
then measures:
  ceiling       ``engine.loop.train_one_epoch`` on synthetic batches already on the device: the training step with
                no data path at all (same model, optimiser, precision, channels_last, compile)
  off           ``run_train`` with ``data.cache: off`` and the CPU augmentation (decode every image every epoch)
  cache         ``run_train`` with ``data.cache: auto`` and the CPU augmentation
  cache+device  ``data.cache: auto`` with ``augment.device: cuda`` (GPU only: uint8 batches augmented there)
Each run's figure is the last epoch's ``img_per_s`` from ``metrics.jsonl`` (training images per second, data
included; the one-off cache build is reported separately). Prints a table and writes JSON with every figure, the
ratios to the ceiling, the machine and the command line. The ceiling is measured again after every run and each
run's ratio is to the mean of the ceilings before and after it, so a load that drifts on a shared CPU cancels.

    python benchmarks/throughput.py --sweep [--sweep-workers 0,1,2] [--sweep-threads 1,2] [--repeats 1]
        [--cache memory] [--images 1000] [--img-size 64] [--epochs 3] [--out sweep.json]

``--sweep`` times the CPU core split instead (issue 18's scenario by default: 1,000 JPEGs, resnet10t @ 64 px,
batch 64, 3 epochs, a memory cache): one ``vistrain train`` run per ``train.num_workers`` x ``train.num_threads``
pair, then one with both ``auto``. Each run's figure is its fold's training time (every epoch, validation and
checkpoints included: what a user waits for; the cache is built once before the first run). Prints the table, the
split the automatic settings chose with the reason from train.log, and its gap to the best split; the load
average before and after is in the JSON (timings on a loaded machine say little). ``--repeats N`` times every
split N times, round-robin, and keeps each split's fastest run.

    python benchmarks/throughput.py --generate-only --images N --data DIR

writes the JPEGs into DIR and stops (runs that share the images then skip the generation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from vistrain.config.loader import validate
from vistrain.config.schema import AugmentCfg
from vistrain.engine import device as dev
from vistrain.engine.hooks import monitor_mode
from vistrain.engine.loop import LoopOptions, TrainState, train_one_epoch
from vistrain.engine.optim import build_optimizer, build_scheduler
from vistrain.engine.tasks import ClassificationTask
from vistrain.models.build import build_model, compile_model, is_convolutional

VARIANTS = ("off", "cache", "cache+device")


def _write_image(args: tuple[str, int, int, int]) -> None:
    path, w, h, seed = args
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 215, 3)
    field = base + 40 * np.sin(xx[..., None] / rng.uniform(8, 40) + yy[..., None] / rng.uniform(8, 40) + base / 30)
    field += rng.normal(0, 8, field.shape)
    Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_dataset(folder: Path, n: int, w: int, h: int) -> Path:
    """``folder/train.csv`` and ``folder/train/*.jpg`` (two classes), written in parallel; kept when complete."""
    csv = folder / "train.csv"
    if csv.is_file() and len(csv.read_text().splitlines()) == n + 1:
        return folder
    (folder / "train").mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / "train" / f"img_{i:06d}.jpg"), w, h, i) for i in range(n)]
    with ProcessPoolExecutor(dev.usable_cores()) as pool:
        list(pool.map(_write_image, jobs, chunksize=64))
    csv.write_text("ID,target\n" + "".join(f"img_{i:06d},{'ab'[i % 2]}\n" for i in range(n)))
    return folder


def run_config(args: argparse.Namespace, data: Path, exp: Path, variant: str, compiled: bool) -> dict[str, Any]:
    aug: dict[str, Any] = {"policy": args.policy}
    if "device" in AugmentCfg.model_fields:
        aug["device"] = "cuda" if variant == "cache+device" else "cpu"
    return {
        "project": {"name": f"bench-{variant.replace('+', '-')}{'-compile' if compiled else ''}", "seed": 0},
        "data": {"source": "csv", "train_csv": str(data / "train.csv"), "image_dir_train": str(data / "train"),
                 "folds": 5, "valid_fold": 0, "cache": "off" if variant == "off" else "auto"},
        "model": {"name": args.model, "pretrained": False},
        "train": {"img_size": args.img_size, "batch_size": args.batch, "epochs": args.epochs, "warmup_epochs": 0,
                  "early_stopping_patience": 0, "num_workers": args.workers, "num_threads": args.threads,
                  "log_interval": 0, "device": args.device, "amp": args.precision, "compile": compiled,
                  "eval_every_n_epochs": args.epochs},  # validation once, at the end: not in img_per_s anyway
        "augment": aug,
        "tracking": {"tensorboard": False},
        "output": {"exp_dir": str(exp), "logs_dir": None, "snapshots": False},
    }


def ceiling(args: argparse.Namespace, cfg: Any, compiled: bool, steps: int) -> float:
    """Images per second of the loop's own training step on synthetic batches already on the device."""
    t = cfg.train
    device = dev.pick_device(t.device)
    precision = dev.pick_precision(t.amp, device)
    dev.configure_backends(device)
    model = build_model("classification", cfg.model, 2, pretrained=False).to(device)
    channels_last = t.channels_last is True or (t.channels_last == "auto" and device.type == "cuda"
                                                 and is_convolutional(args.model))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, t)
    state = TrainState(model, optimizer, build_scheduler(optimizer, t, steps, monitor_mode(t.monitor)),
                       torch.amp.GradScaler(device.type, enabled=precision.use_scaler), seed=0)
    if compiled:
        compile_model(model, t.compile)
    h, w = (t.img_size, t.img_size) if isinstance(t.img_size, int) else t.img_size
    batch = (torch.randn(t.batch_size, 3, h, w, device=device), torch.randint(0, 2, (t.batch_size,), device=device),
             None)
    task = ClassificationTask(torch.nn.CrossEntropyLoss(), None)
    opts = LoopOptions(device=device, precision=precision, channels_last=channels_last, log_interval=0)
    train_one_epoch(state, task, [batch] * 3, opts)  # warm-up (and compile)
    best = 0.0
    for _ in range(2):
        best = max(best, train_one_epoch(state, task, [batch] * steps, opts)["img_per_s"])
    return best


def measure_run(args: argparse.Namespace, raw: dict[str, Any]) -> dict[str, Any]:
    from vistrain.engine.training import run_train

    started = time.time()
    result = run_train(validate(raw))
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    log = (result.run_dir / "train.log").read_text()
    built = re.search(r"cache \w+ built: .* in ([0-9.]+) s", log)
    return {"img_per_s": rows[-1]["img_per_s"], "data_wait_frac": rows[-1]["data_wait_frac"],
            "train_s": rows[-1]["fold_time_s"],
            "img_per_s_by_epoch": [r["img_per_s"] for r in rows], "cache_build_s": float(built.group(1)) if built
            else None, "wall_s": round(time.time() - started, 1), "run_dir": str(result.run_dir)}


def sweep_grid(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(workers, threads) pairs to time: the lists given, else workers 0, 1, 2 and half the cores, threads 1, half
    the cores and every core (on 2 cores: 0/1/2 workers x 1/2 threads)."""
    cores = dev.usable_cores()
    workers = _ints(args.sweep_workers) if args.sweep_workers else sorted({0, 1, 2, cores // 2})
    threads = _ints(args.sweep_threads) if args.sweep_threads else sorted({1, max(1, cores // 2), cores})
    return [(w, t) for w in workers for t in threads]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def sweep(args: argparse.Namespace, data: Path, exp: Path) -> dict[str, Any]:
    """Every split of ``sweep_grid`` and the automatic one, ``args.repeats`` times round-robin; each split's
    fastest fold time."""
    splits: list[tuple[int | str, int | str]] = [*sweep_grid(args), ("auto", "auto")]
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeats):
        for workers, threads in splits:
            raw = run_config(args, data, exp, "cache", False)
            raw["data"]["cache"] = args.cache
            raw["train"]["device"] = "cpu"  # the split of CPU cores; a GPU run has its own rule
            raw["train"].update(num_workers=workers, num_threads=threads)
            if workers == "auto":
                dev.busy_cores.cache_clear()  # measured when the run starts, as a fresh process would
            figures = measure_run(args, raw)
            chosen = yaml.safe_load((Path(figures["run_dir"]) / "config.yaml").read_text())["train"]
            log = (Path(figures["run_dir"]) / "train.log").read_text()
            why = {k: _logged_reason(log, k) for k in ("num_workers", "num_threads")}
            runs.setdefault("auto" if workers == "auto" else f"{workers}x{threads}", []).append(
                {**figures, "workers": chosen["num_workers"], "threads": chosen["num_threads"], "why": why})
    best_of = {name: min(rs, key=lambda r: r["train_s"]) for name, rs in runs.items()}
    rows = [{"split": name, **r, "train_s_each": [x["train_s"] for x in runs[name]]} for name, r in best_of.items()]
    grid = [r for r in rows if r["split"] != "auto"]
    best = min(grid, key=lambda r: r["train_s"])
    auto = best_of["auto"]
    same = next((r for r in grid if (r["workers"], r["threads"]) == (auto["workers"], auto["threads"])), None)
    gap = auto["train_s"] / best["train_s"] - 1
    return {"rows": rows, "best": best["split"], "auto": {
        "workers": auto["workers"], "threads": auto["threads"], "why": auto["why"], "train_s": auto["train_s"],
        "gap_to_best": round(gap, 4), "within_5pct": gap <= 0.05,
        "grid_run_of_that_split_gap": None if same is None else round(same["train_s"] / best["train_s"] - 1, 4)}}


def _logged_reason(log: str, key: str) -> str:
    """The reason train.log gives for ``train.<key>`` (``[CFG] train.num_workers=0 (why)``)."""
    found = re.search(rf"\[CFG\] train\.{key}=\d+ \((.*)\)", log)
    return found[1] if found else ""


def print_sweep(result: dict[str, Any], load: tuple[float, float]) -> None:
    print(f"\n{'workers x threads':<18} {'fold s':>8} {'img/s':>8} {'wait':>6}  each run (fold s)")
    best = next(r for r in result["rows"] if r["split"] == result["best"])
    for r in result["rows"]:
        name = f"auto ({r['workers']}x{r['threads']})" if r["split"] == "auto" else r["split"]
        mark = "  <- best" if r is best else ""
        print(f"{name:<18} {r['train_s']:>8.1f} {r['img_per_s']:>8.1f} {r['data_wait_frac']:>6.2f}  "
              f"{', '.join(f'{x:.1f}' for x in r['train_s_each'])}{mark}")
    a = result["auto"]
    print(f"automatic settings chose {a['workers']} worker(s) x {a['threads']} thread(s): "
          f"workers: {a['why']['num_workers']}; threads: {a['why']['num_threads']}")
    print(f"gap to the best split ({result['best']}): {a['gap_to_best']:+.1%} "
          f"({'within' if a['within_5pct'] else 'NOT within'} 5%)"
          + ("" if a["grid_run_of_that_split_gap"] is None else
             f"; the grid's own run of {a['workers']}x{a['threads']}: {a['grid_run_of_that_split_gap']:+.1%}"))
    print(f"load average (1 min) before {load[0]:.2f}, after {load[1]:.2f} on {os.cpu_count()} cores")


def main_sweep(args: argparse.Namespace, w: int, h: int) -> None:
    if dev.env_threads() is not None:
        print(f"note: OMP_NUM_THREADS={dev.env_threads()} is set: the automatic settings take it as the thread count",
              file=sys.stderr)
    crowded = dev.oversubscription(dev.usable_cores(), 0)
    if crowded:
        print(f"warning: {crowded}", file=sys.stderr)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["VISTRAIN_CACHE_DIR"] = str(Path(tmp) / "cache")
        started = time.time()
        data = make_dataset(args.data or Path(tmp) / "data", args.images, w, h)
        generated_s = round(time.time() - started, 1)
        result = sweep(args, data, Path(tmp) / "exp")
    load = (load_before, os.getloadavg()[0])
    report = {"command": " ".join([sys.executable, *sys.argv]), "machine": machine(),
              "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "generated_s": generated_s, "omp_num_threads": dev.env_threads()},
              "load_avg_1m_before_after": load, **result}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nsweep: model={args.model} img={args.img_size} batch={args.batch} images={args.images} "
          f"({args.image_size}) epochs={args.epochs} data.cache={args.cache} policy={args.policy}; "
          f"{dev.usable_cores()} usable cores")
    print_sweep(result, load)
    print(f"-> {args.out}")


def machine() -> dict[str, Any]:
    import timm

    import vistrain

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu_count": os.cpu_count(), "usable_cores": dev.usable_cores(), "gpu": gpu, "torch": torch.__version__,
            "timm": timm.__version__, "vistrain": vistrain.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "load_avg_1m": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet10t")
    ap.add_argument("--img-size", type=int, default=None, help="default 32 (--sweep: 64)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--precision", default="auto", help="train.amp: auto, bf16, fp16, fp32")
    ap.add_argument("--images", type=int, default=None, help="default 2000 (--sweep: 1000)")
    ap.add_argument("--image-size", default="470x360", help="generated JPEGs, WxH")
    ap.add_argument("--epochs", type=int, default=None,
                    help="per run; the last epoch's img_per_s is reported; default 2 (--sweep: 3)")
    ap.add_argument("--policy", default="light", help="augment.policy of every run")
    ap.add_argument("--variants", default="off,cache",
                    help=f"comma list of {', '.join(VARIANTS)}; empty: the ceiling alone")
    ap.add_argument("--compile", choices=("no", "yes", "both"), default="no")
    ap.add_argument("--workers", default="auto", help="train.num_workers")
    ap.add_argument("--threads", default=None, help="train.num_threads (default: usable cores - workers, >= 1)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data", type=Path, default=None, help="folder for the generated images (kept); default temp")
    ap.add_argument("--out", type=Path, default=Path("throughput.json"))
    ap.add_argument("--generate-only", action="store_true", help="write the JPEGs into --data and stop")
    ap.add_argument("--sweep", action="store_true", help="time train.num_workers x train.num_threads on the CPU")
    ap.add_argument("--sweep-workers", default=None, help="--sweep: comma list (default 0,1,2 and half the cores)")
    ap.add_argument("--sweep-threads", default=None, help="--sweep: comma list (default 1, half and all the cores)")
    ap.add_argument("--repeats", type=int, default=1, help="--sweep: runs of each split (the fastest counts)")
    ap.add_argument("--cache", default="memory", choices=("memory", "disk", "off"), help="--sweep: data.cache")
    args = ap.parse_args()
    for key, ratios_default, sweep_default in (("img_size", 32, 64), ("images", 2000, 1000), ("epochs", 2, 3)):
        if getattr(args, key) is None:
            setattr(args, key, sweep_default if args.sweep else ratios_default)
    w, h = (int(x) for x in args.image_size.lower().split("x"))
    os.environ.setdefault("CI", "true")  # plain log lines, no progress bars
    if args.generate_only:
        if args.data is None:
            ap.error("--generate-only: needs --data DIR (where the images stay)")
        started = time.time()
        make_dataset(args.data, args.images, w, h)
        print(f"{args.images} JPEGs of {args.image_size} in {args.data} ({time.time() - started:.1f} s)")
        return
    if args.sweep:
        main_sweep(args, w, h)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    device = dev.pick_device(args.device)
    if "cache+device" in variants and device.type != "cuda":
        print("cache+device: augment.device: cuda needs a GPU; skipped on this machine", file=sys.stderr)
        variants.remove("cache+device")
    workers = dev.auto_workers(args.workers if args.workers == "auto" else int(args.workers), device)
    args.workers = workers
    args.threads = int(args.threads) if args.threads else max(1, dev.usable_cores() - workers)
    dev.set_num_threads(args.threads)
    compiles = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["VISTRAIN_CACHE_DIR"] = str(Path(tmp) / "cache")
        started = time.time()
        data = make_dataset(args.data or Path(tmp) / "data", args.images, w, h)
        generated_s = round(time.time() - started, 1)
        train_images = args.images - args.images // 5
        steps = max(1, train_images // args.batch)
        results: list[dict[str, Any]] = []
        for compiled in compiles:
            raw = run_config(args, data, Path(tmp) / "exp", "cache", compiled)
            tops = [ceiling(args, validate(raw), compiled, steps)]
            results.append({"name": "ceiling", "compile": compiled, "img_per_s": round(tops[0], 1)})
            for variant in variants:
                figures = measure_run(args, run_config(args, data, Path(tmp) / "exp", variant, compiled))
                # the ceiling again right after each run: on a shared machine the load drifts between runs, and a
                # ratio to the neighbouring ceiling (the mean of the one before and after) is what stays comparable
                tops.append(ceiling(args, validate(raw), compiled, steps))
                top = (tops[-2] + tops[-1]) / 2
                results.append({"name": variant, "compile": compiled, **figures, "ceiling_img_per_s": round(top, 1),
                                "ratio_to_ceiling": round(figures["img_per_s"] / top, 3)})
            results[-1 - len(variants)]["img_per_s_each"] = [round(x, 1) for x in tops]
    by = {(r["name"], r["compile"]): r.get("ratio_to_ceiling") for r in results}
    # cache vs off as the ratio of their ratios to the neighbouring ceilings (load drift cancels)
    ratios = {f"cache/off{' (compile)' if c else ''}": round(by[("cache", c)] / by[("off", c)], 3)
              for c in compiles if ("cache", c) in by and ("off", c) in by}
    report = {"command": " ".join([sys.executable, *sys.argv]), "machine": machine(),
              "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "device": str(device), "train_images_per_epoch": train_images,
                           "generated_s": generated_s},
              "results": results, "ratios": ratios}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nmodel={args.model} img={args.img_size} batch={args.batch} precision={args.precision} device={device} "
          f"workers={workers} threads={args.threads} images={args.images} ({args.image_size})")
    print(f"{'path':<16} {'compile':>7} {'img/s':>9} {'ratio':>7} {'wait':>6} {'cache build s':>14}")
    for r in results:
        ratio = r.get("ratio_to_ceiling", 1.0)
        wait = r.get("data_wait_frac")
        build = r.get("cache_build_s")
        print(f"{r['name']:<16} {str(r['compile']):>7} {r['img_per_s']:>9.1f} {ratio:>7.2f} "
              f"{'' if wait is None else f'{wait:.2f}':>6} {'' if build is None else f'{build:.1f}':>14}")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
