"""Kill-and-resume sweep (issue 12 item 1): SIGKILL a real ``vistrain train`` at random moments and check that
``--resume`` always finishes the run with valid files and the same numbers as an uninterrupted run.

Each trial starts a tiny run (resnet10t, 32 px, CPU, 2 folds x 3 epochs) with real training settings
(``augment.policy: hard``, ``num_workers: 2``, mixup + cutmix, EMA, dropout, ``train.grad_accum_steps: 2``), kills
it at a moment of one phase, then resumes it with ``vistrain train --config C --resume`` (as a user would) until it
succeeds, and checks:

* the resume exits 0 and run.json says success;
* every ``*.json`` of the run parses, every ``metrics.jsonl`` line parses and it holds each (fold, epoch) once;
* every ``ckpt/*.pth`` loads with the safe unpickler and every ``ckpt/*.safetensors`` loads;
* the metrics rows and summary.json's results equal the uninterrupted run's, bit for bit (timings left out).

Phases (the moment is drawn at random inside each, so a sweep covers them all):
``startup`` (a random delay before the first epoch ends), ``mid-epoch`` (a random delay after an epoch's row),
``checkpoint`` (as soon as a checkpoint's temporary file appears), ``metrics-row`` (as soon as a last checkpoint
is replaced, before or while its row is written), ``end-of-run`` (once summary.json, the report or the plots
are being written).

    PYTHONPATH=src python benchmarks/kill_resume.py --kills 15 --seed 0

prints one line per kill and ``kills survived: S/N``; exit 1 when any failed. ``tests/test_kill_resume.py`` runs
a 2-kill version of the same functions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

PHASES = ("startup", "mid-epoch", "checkpoint", "metrics-row", "end-of-run")
TIMING_KEYS = {"time_s", "mem_MiB", "fold_time_s", "total_s", "per_fold_s", "timings", "environment", "img_per_s",
               "data_wait_frac"}
EPOCHS, FOLDS = 3, 2


@dataclass
class Workspace:
    root: Path
    config: Path
    exp: Path

    def runs(self) -> list[Path]:
        return sorted(p.parent for p in self.exp.glob("*/*/run.json"))


@dataclass
class Trial:
    phase: str
    killed_at: str = ""  # what the run had done when it was killed
    killed: bool = False  # False: the run ended before the moment came
    ok: bool = False
    problems: list[str] = field(default_factory=list)
    resumes: int = 0


def write_data(root: Path, per_class: int = 8, seed: int = 0) -> Path:
    """``root/train.csv`` and ``root/train/*.png``: 3 classes of coloured noise."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    lines = ["ID,target"]
    for k in range(3):
        for i in range(per_class):
            base = np.zeros((32, 32, 3)) + [(200, 40, 40), (40, 200, 40), (40, 40, 200)][k]
            pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "train" / f"c{k}_{i}.png")
            lines.append(f"c{k}_{i},{k}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root


def make_workspace(root: Path, data: Path) -> Workspace:
    cfg = {
        "project": {"name": "kill", "seed": 11},
        "data": {"source": "csv", "train_csv": str(data / "train.csv"), "image_dir_train": str(data / "train"),
                 "image_ext": ".png", "folds": FOLDS, "valid_fold": "all"},
        "model": {"name": "resnet10t", "pretrained": False, "drop_rate": 0.2},
        # Real training settings: every source of randomness a resume must reproduce (worker augmentation,
        # shuffling, dropout, mixup / cutmix) and state it must carry (EMA, an accumulation group per update).
        "train": {"img_size": 32, "batch_size": 4, "epochs": EPOCHS, "lr": 3e-3, "warmup_epochs": 0,
                  "early_stopping_patience": 0, "num_workers": 2, "num_threads": 1, "log_interval": 0,
                  "device": "cpu", "amp": "fp32", "ema": True, "ema_decay": 0.9, "grad_accum_steps": 2},
        "augment": {"policy": "hard", "mixup_alpha": 0.4, "cutmix_alpha": 1.0},
        "tracking": {"tensorboard": False},
        "output": {"exp_dir": str(root / "exp"), "logs_dir": None},
    }
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return Workspace(root, config, root / "exp")


def _env() -> dict[str, str]:
    env = dict(os.environ, CI="true", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else src
    return env


def _train(ws: Workspace, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vistrain", "train", "--config", str(ws.config), *extra],
                            cwd=ws.root, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _rows(run: Path) -> int:
    f = run / "metrics.jsonl"
    return f.read_text().count("\n") if f.is_file() else 0


def _newest(ws: Workspace) -> Path | None:
    runs = [p.parent for p in ws.exp.glob("*/*/ckpt")]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def _moment(ws: Workspace, proc: subprocess.Popen, phase: str, rng: random.Random) -> tuple[str, bool]:
    """Wait for a moment of ``phase``; (what the run had done, whether that moment came before the run ended).
    Polls every millisecond."""
    started = time.monotonic()
    total_rows = EPOCHS * FOLDS
    delay = rng.uniform(0.0, 1.0)
    first = _newest(ws)
    done = _rows(first) if first else 0  # a resumed run starts with these rows
    # after this many epochs' rows (mid-epoch, checkpoint, metrics-row): one of those still to come
    target_rows = min(total_rows - 1, done + rng.randrange(1, max(2, total_rows - done)))
    seen_mtime = None
    while True:
        run = _newest(ws)
        rows = _rows(run) if run else 0
        if phase == "startup":
            if time.monotonic() - started >= delay * 12 or rows:
                return f"{time.monotonic() - started:.2f}s after start, {rows} rows", True
        elif phase == "mid-epoch" and run and rows >= target_rows:
            time.sleep(delay * 0.8)
            return f"{delay * 0.8:.2f}s after row {target_rows}", True
        elif phase == "checkpoint" and run and rows >= target_rows - 1:
            tmp = [p.name for p in (run / "ckpt").glob(".*.tmp")]
            if tmp:
                return f"while writing {tmp[0]} ({rows} rows)", True
        elif phase == "metrics-row" and run and rows >= target_rows - 1:
            last = run / "ckpt" / "last_fold0.pth"
            if rows >= FOLDS * EPOCHS // 2:
                last = run / "ckpt" / "last_fold1.pth"
            mtime = last.stat().st_mtime_ns if last.is_file() else None
            if seen_mtime is not None and mtime != seen_mtime:
                return f"right after {last.name} was replaced ({rows} rows)", True
            seen_mtime = mtime if mtime is not None else seen_mtime
        elif phase == "end-of-run" and run and rows >= total_rows:
            files = [n for n in ("summary.json", "report.html") if (run / n).is_file()]
            plots = list((run / "plots").glob("*.png"))
            if files or plots or rng.random() < 0.02:
                return f"at the end ({', '.join(files) or 'no summary yet'}, {len(plots)} plots)", True
        if proc.poll() is not None:  # a run that ends first is not killed (it is still checked)
            return f"never: the run ended first (exit {proc.returncode})", False
        time.sleep(0.001)


def _kill_at(ws: Workspace, proc: subprocess.Popen, phase: str, rng: random.Random) -> tuple[str, bool]:
    """(when it was killed, whether it was)."""
    what, came = _moment(ws, proc, phase, rng)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return what, True
    return what, False

def comparable(run: Path) -> dict[str, Any]:
    """The numbers a rerun must reproduce: metrics rows and summary results, timings left out."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run / "summary.json").read_text())

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in TIMING_KEYS and k != "run_id"}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return {"rows": strip(rows), "summary": strip(summary)}


def check_run(run: Path) -> list[str]:
    """Problems of a finished run's files (empty when all is well)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from safetensors.torch import load_file

    from vistrain.engine.checkpoint import load_checkpoint
    from vistrain.errors import UserError

    problems = []
    info = json.loads((run / "run.json").read_text())
    if info.get("status") != "success":
        problems.append(f"run.json status {info.get('status')}")
    for f in run.rglob("*.json"):
        try:
            json.loads(f.read_text())
        except ValueError as err:
            problems.append(f"{f.name}: {err}")
    try:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    except ValueError as err:
        return [*problems, f"metrics.jsonl: {err}"]
    keys = [(r["fold"], r["epoch"]) for r in rows]
    want = [(k, e) for k in range(FOLDS) for e in range(1, EPOCHS + 1)]
    if keys != want:
        problems.append(f"metrics.jsonl rows {keys}, want {want}")
    for f in (run / "ckpt").glob("*.pth"):
        try:
            load_checkpoint(f)
        except UserError as err:
            problems.append(str(err))
    for f in (run / "ckpt").glob("*.safetensors"):
        try:
            load_file(str(f))
        except Exception as err:  # noqa: BLE001 - any failure to read is a finding
            problems.append(f"{f.name}: {err}")
    return problems


def reference(root: Path, data: Path) -> dict[str, Any]:
    """The uninterrupted run's numbers."""
    ws = make_workspace(root / "reference", data)
    proc = _train(ws)
    _, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"the reference run failed: {err[-2000:]}")
    (run,) = ws.runs()
    return comparable(run)


def run_trial(root: Path, data: Path, phase: str, rng: random.Random, want: dict[str, Any],
              max_resumes: int = 3) -> Trial:
    """One kill at a moment of ``phase``, then ``--resume`` until the run succeeds; the checks above."""
    trial = Trial(phase)
    ws = make_workspace(root, data)
    trial.killed_at, trial.killed = _kill_at(ws, _train(ws), phase, rng)
    while True:
        runs = ws.runs()
        done = [r for r in runs if json.loads((r / "run.json").read_text()).get("status") == "success"]
        if done:
            break
        if trial.resumes >= max_resumes:
            trial.problems.append(f"not finished after {trial.resumes} resumes")
            return trial
        proc = _train(ws, "--resume")
        trial.resumes += 1
        _, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            trial.problems.append(f"resume {trial.resumes} exit {proc.returncode}: {err.strip()[-400:]}")
    run = done[-1]
    trial.problems += check_run(run)
    got = comparable(run)
    for part in ("rows", "summary"):
        if got[part] != want[part]:
            trial.problems.append(f"{part} differ from the uninterrupted run")
    trial.ok = trial.killed and not trial.problems
    return trial


def chain(root: Path, data: Path, phases: tuple[str, ...], rng: random.Random,
          want: dict[str, Any] | Callable[[], dict[str, Any]]) -> Trial:
    """One run killed once per phase in turn (each kill hits the resume of the previous one), then resumed to the
    end and checked: the suite's short version. ``want`` may be a callable (the reference run, computed beside)."""
    trial = Trial("+".join(phases))
    ws = make_workspace(root, data)
    moments = []
    for phase in phases:
        what, killed = _kill_at(ws, _train(ws, "--resume"), phase, rng)
        moments.append(f"{phase}: {what}" + ("" if killed else " (not killed)"))
    trial.killed_at, trial.killed = "; ".join(moments), True
    proc = _train(ws, "--resume")
    _, err = proc.communicate(timeout=900)
    trial.resumes = 1
    if proc.returncode != 0:
        trial.problems.append(f"final resume exit {proc.returncode}: {err.strip()[-400:]}")
        return trial
    (run,) = [r for r in ws.runs() if json.loads((r / "run.json").read_text()).get("status") == "success"]
    trial.problems += check_run(run)
    got, want = comparable(run), want() if callable(want) else want
    trial.problems += [f"{part} differ from the uninterrupted run" for part in ("rows", "summary")
                       if got[part] != want[part]]
    trial.ok = not trial.problems
    return trial


def sweep(kills: int, seed: int, root: Path, phases: tuple[str, ...] = PHASES) -> list[Trial]:
    rng = random.Random(seed)
    data = write_data(root / "data")
    want = reference(root, data)
    trials = []
    for i in range(kills):
        phase = phases[i % len(phases)]
        trial = run_trial(root / f"trial{i:02d}", data, phase, rng, want)
        trials.append(trial)
        print(f"kill {i + 1:2d}/{kills} {phase:11s} {'OK ' if trial.ok else 'FAIL'} killed {trial.killed_at}; "
              f"resumes={trial.resumes}" + (f" | {'; '.join(trial.problems)}" if trial.problems else ""),
              flush=True)
    return trials


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    args = parser.parse_args()
    started = time.time()
    if args.keep:
        trials = sweep(args.kills, args.seed, Path(args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="kill_resume_") as tmp:
            trials = sweep(args.kills, args.seed, Path(tmp))
    ok = sum(t.ok for t in trials)
    missed = sum(not t.killed for t in trials)
    by_phase = {p: f"{sum(t.ok for t in trials if t.phase == p)}/{sum(t.phase == p for t in trials)}" for p in PHASES}
    print(f"kills survived: {ok}/{len(trials)} | by phase: {by_phase} | runs that ended before their moment: "
          f"{missed} | {time.time() - started:.0f} s")
    return 0 if ok == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
