"""``vistrain runs``: one row per run directory under an experiments folder, read from run.json, summary.json and
eval/test/metrics.json alone (no torch), fast on 1,000 runs; unreadable directories listed, never dropped; sorting
in the metric's direction; csv / json that pandas and json read; ``--prune`` deleting old runs' weight files while
keeping the best, the young, the running and each study's best trial.

The generated run directories copy the file layout of a real tiny run trained once here (every file, cut short,
and run.json / summary.json with the fields that run wrote), so nothing in them is invented."""

from __future__ import annotations

import io
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import cli_env, run_cli, tiny_config, write_csv_dataset, write_yaml

import vistrain

MONITOR = "macro_f1"
WEIGHT_BYTES = 64 * 1024  # each generated weight file (a real resnet10t one is 20-60 MB)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real tiny run (2 folds x 1 epoch, evaluated on a test CSV), and the runs table as a hook saw it while
    fold 1 trained."""
    from vistrain.engine.hooks import Reporter

    root = tmp_path_factory.mktemp("runs")
    data = write_csv_dataset(root / "data", per_class=8)
    test = write_csv_dataset(root / "test", per_class=4, seed=1)
    exp = root / "exp"
    cfg = write_yaml(root / "cfg.yaml", tiny_config(
        data.root, data={"valid_fold": "all", "test_csv": str(test.train_csv), "image_dir_test": str(test.image_dir)},
        train={"epochs": 1}, output={"exp_dir": str(exp), "logs_dir": None}))
    during: list[pd.DataFrame] = []

    def look(row: dict[str, Any]) -> None:
        if row["fold"] == 1 and not during:
            during.append(vistrain.runs(exp))

    run = vistrain.train(cfg, hooks=[Reporter(look)], progress=False)
    run.evaluate("test")
    return {"root": root, "exp": exp, "cfg": cfg, "run": run.path, "during": during[0]}


# ------------------------------------------------------------------------------------- generated runs

READ = (Path("eval/test/metrics.json"),)  # kept whole: vistrain runs reads it


class Template:
    """A real run's files: each generated run writes them all, cut to 256 bytes (weight files: WEIGHT_BYTES; those
    vistrain runs reads: whole), with run.json and summary.json changed as asked."""

    def __init__(self, run_dir: Path):
        self.files = {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
        self.run = json.loads(self.files.pop(Path("run.json")))
        self.summary = json.loads(self.files.pop(Path("summary.json")))

    def make(self, exp: Path, run_id: str, started: datetime, status: str = "success",
             values: list[float] | None = None, config_hash: str | None = None, test: bool = True,
             parent: Path | None = None, losses: list[float] | None = None) -> Path:
        """``exp/YYYYMMDD/run_id`` (or ``parent/run_id``): ``values`` are the folds' monitor values (None: no
        summary.json, as a run that ended before it); ``losses`` their valid_loss."""
        path = (parent or exp / f"{started:%Y%m%d}") / run_id
        for rel, data in self.files.items():
            if rel.parts[0] == "eval" and not test:
                continue
            out = path / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(b"w" * WEIGHT_BYTES if rel.parts[0] == "ckpt" else data if rel in READ else data[:256])
        info = {**self.run, "run_id": run_id, "status": status, "started": started.isoformat(timespec="seconds"),
                "updated": (started + timedelta(minutes=5)).isoformat(timespec="seconds")}
        if config_hash is not None:
            info["config_hash"] = config_hash
        (path / "run.json").write_text(json.dumps(info, indent=2))
        if values is not None:
            (path / "summary.json").write_text(json.dumps(self.summary_of(run_id, values, losses), indent=2))
        return path

    def summary_of(self, run_id: str, values: list[float], losses: list[float] | None) -> dict[str, Any]:
        summary = json.loads(json.dumps(self.summary))
        summary["run_id"] = run_id
        assert len(values) == len(summary["folds"])
        for k, fold in enumerate(summary["folds"]):
            fold["best"][MONITOR] = values[k]
            if losses is not None:
                fold["best"]["valid_loss"] = losses[k]
        for name in summary["mean"]:  # as engine.summary.summarise computes them
            v = np.array([f["best"][name] for f in summary["folds"]], dtype=np.float64)
            summary["mean"][name] = float(v.mean())
            summary["std"][name] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        return summary


@pytest.fixture(scope="module")
def template(trained: dict[str, Any]) -> Template:
    return Template(trained["run"])


def runs_csv(*args: str, cwd: Path) -> pd.DataFrame:
    res = run_cli("runs", *args, "--format", "csv", cwd=cwd)
    assert res.returncode == 0, res.stderr
    return pd.read_csv(io.StringIO(res.stdout), dtype={"config_hash": str})


def du_bytes(path: Path) -> int:
    """``du``'s answer for a folder, in bytes (allocated blocks, folders included)."""
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def one_line_error(res: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, (res.returncode, res.stderr)
    return lines[0]


# ------------------------------------------------------------------------------------------ the table

def test_a_thousand_runs_are_listed_in_under_two_seconds(template: Template, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    start = datetime(2026, 1, 1, 9)
    rng = np.random.default_rng(0)
    for i in range(1000):
        status = ("success", "success", "success", "error", "interrupted")[i % 5]
        values = rng.uniform(0.5, 1, 2).tolist() if status == "success" else None
        template.make(exp, f"tiny-{i:06d}-{i:06x}", start + timedelta(hours=7 * i), status, values, test=i % 3 == 0)
    res = run_cli("runs", str(exp), cwd=tmp_path)  # once to warm the file cache, as a user's second look
    assert res.returncode == 0, res.stderr
    walls, cpus = [], []
    for _ in range(3):  # the fastest of three: the machine's other processes only ever add time
        t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        res = run_cli("runs", str(exp), cwd=tmp_path)
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        walls.append(time.perf_counter() - t0)
        cpus.append(c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime)
        assert res.returncode == 0, res.stderr
    wall = min(walls)
    print(f"\nvistrain runs on 1000 run directories: {wall:.2f} s wall (runs: "
          f"{', '.join(f'{w:.2f} s wall / {c:.2f} s CPU' for w, c in zip(walls, cpus))}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores)")
    lines = res.stdout.splitlines()
    assert len(lines) == 1001 and lines[0].split()[:2] == ["date", "run"]
    assert sum(" success " in ln for ln in lines) == 600
    assert wall < 2.0, f"{wall:.2f} s for 1000 runs"


def test_listing_and_pruning_import_no_torch(template: Template, trained: dict[str, Any], tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    template.make(exp, "tiny-090000-aaaaaa", datetime(2026, 1, 1, 9), values=[0.8, 0.9])
    for args in (["runs", str(exp)], ["runs", str(exp), "--config", str(trained["cfg"])],
                 ["runs", str(exp), "--prune", "--keep-best", "0", "--older-than", "1d", "--dry-run"]):
        res = subprocess.run([sys.executable, "-X", "importtime", "-m", "vistrain", *args], cwd=tmp_path,
                             env=cli_env(), capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        imported = [ln.rsplit("|", 1)[-1].strip() for ln in res.stderr.splitlines() if ln.startswith("import time:")]
        assert len(imported) > 100, "python -X importtime listed nothing"
        assert not [m for m in imported if m.split(".")[0] in ("torch", "timm")], args


def test_a_trained_runs_row_is_its_summary(trained: dict[str, Any], tmp_path: Path) -> None:
    run = trained["run"]
    summary = json.loads((run / "summary.json").read_text())
    test = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    folds = np.array([f["best"][MONITOR] for f in summary["folds"]])
    row = vistrain.runs(trained["exp"]).set_index("run_id").loc[run.name]
    assert (row["status"], row["folds_done"], row["folds_planned"], row["kind"]) == ("success", 2, 2, "run")
    assert (row["metric"], row["task"]) == (MONITOR, "classification")
    assert row["mean"] == summary["mean"][MONITOR] == pytest.approx(folds.mean(), abs=1e-12)
    assert row["std"] == summary["std"][MONITOR] == pytest.approx(folds.std(ddof=1), abs=1e-12)
    assert row["test"] == test[MONITOR] and [row["test_low"], row["test_high"]] == test["intervals"][MONITOR]
    assert row["config_hash"] == json.loads((run / "run.json").read_text())["config_hash"]
    assert row["duration_s"] == summary["timings"]["total_s"]
    assert row["size_bytes"] == du_bytes(run)
    # valid_loss differs between the folds whatever the scores: its mean and spread are numpy's too
    losses = np.array([f["best"]["valid_loss"] for f in summary["folds"]])
    by_loss = vistrain.runs(trained["exp"], sort="valid_loss").set_index("run_id").loc[run.name]
    assert by_loss["metric"] == "valid_loss" and by_loss["std"] > 0
    assert (by_loss["mean"], by_loss["std"]) == pytest.approx((losses.mean(), losses.std(ddof=1)), abs=1e-12)
    # the command's table line says the same
    res = run_cli("runs", str(trained["exp"]), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if run.name in ln)
    assert f"{row['mean']:.4f} ± {row['std']:.4f}" in line and " 2/2 " in line and " success " in line
    assert f"{test[MONITOR]:.4f} [{test['intervals'][MONITOR][0]:.4f}, {test['intervals'][MONITOR][1]:.4f}]" in line


def test_a_run_in_progress_shows_running_and_the_folds_it_finished(trained: dict[str, Any]) -> None:
    row = trained["during"].set_index("run_id").loc[trained["run"].name]
    assert (row["status"], row["folds_done"], row["folds_planned"]) == ("running", 1, 2)
    assert pd.isna(row["mean"])  # no summary.json before the last fold


def test_sort_orders_by_the_metric_in_its_direction(template: Template, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    start = datetime(2026, 3, 1, 9)
    scores = {"a": [0.6, 0.7], "b": [0.9, 0.95], "c": None, "d": [0.2, 0.3]}
    losses = {"a": [0.5, 0.6], "b": [0.9, 0.8], "d": [0.1, 0.2]}
    for i, (name, values) in enumerate(scores.items()):
        template.make(exp, f"{name}-0900{i:02d}-abcdef", start + timedelta(days=i), "success" if values else "error",
                      values, losses=losses.get(name))
    by_date = runs_csv(str(exp), cwd=tmp_path)
    assert [r[0] for r in by_date["run_id"]] == ["a", "b", "c", "d"]  # no --sort: oldest first
    by_f1 = runs_csv(str(exp), "--sort", "macro_f1", cwd=tmp_path)
    assert [r[0] for r in by_f1["run_id"]] == ["b", "a", "d", "c"]  # higher is better; no value last
    assert by_f1["mean"].tolist()[:3] == pytest.approx([0.925, 0.65, 0.25])
    by_loss = runs_csv(str(exp), "--sort", "valid_loss", cwd=tmp_path)
    assert [r[0] for r in by_loss["run_id"]] == ["d", "a", "b", "c"]  # lower is better; no value last
    assert (by_loss["metric"] == "valid_loss").all()
    res = run_cli("runs", str(exp), "--sort", "valid_loss", cwd=tmp_path)
    assert [ln.split()[2][0] for ln in res.stdout.splitlines()[1:]] == ["d", "a", "b", "c"]


def test_a_one_fold_run_shows_no_spread(template: Template, tmp_path: Path) -> None:
    """One fold has no standard deviation: summary.json writes 0.0 there, and "0.9966 ± 0.0000" would claim a
    measured spread of zero. The table shows the value alone; csv and json leave std empty."""
    exp = tmp_path / "exp"
    run = template.make(exp, "one-090000-abcdef", datetime(2026, 3, 1, 9), values=[0.8, 0.9])
    summary = json.loads((run / "summary.json").read_text())
    summary["folds"] = summary["folds"][:1]
    summary["mean"] = {k: summary["folds"][0]["best"][k] for k in summary["mean"]}
    summary["std"] = dict.fromkeys(summary["std"], 0.0)
    (run / "summary.json").write_text(json.dumps(summary))
    table = runs_csv(str(exp), cwd=tmp_path)
    assert table["mean"].tolist() == [pytest.approx(0.8)] and table["std"].isna().all()
    res = run_cli("runs", str(exp), cwd=tmp_path)
    assert "0.8000" in res.stdout and "±" not in res.stdout, res.stdout


def test_csv_and_json_outputs_parse_as_the_api_table(template: Template, trained: dict[str, Any],
                                                    tmp_path: Path) -> None:
    exp = trained["exp"]
    want = vistrain.runs(exp)
    got_csv = runs_csv(str(exp), cwd=tmp_path)
    assert list(got_csv.columns) == list(want.columns)
    assert got_csv["run_id"].tolist() == want["run_id"].tolist()
    assert got_csv["mean"].tolist() == pytest.approx(want["mean"].tolist())
    res = run_cli("runs", str(exp), "--format", "json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert isinstance(rows, list) and [r["run_id"] for r in rows] == want["run_id"].tolist()
    assert rows[0]["folds_done"] == 2 and rows[0]["mean"] == pytest.approx(want["mean"].iloc[0])
    assert rows[0]["path"] == str(trained["run"])


def test_broken_run_directories_are_rows_marked_unreadable(template: Template, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    day = exp / "20260301"
    good = template.make(exp, "good-090000-aaaaaa", datetime(2026, 3, 1, 9), values=[0.5, 0.6])
    bad_json = template.make(exp, "badjson-090100-bbbbbb", datetime(2026, 3, 1, 9, 1), values=[0.5, 0.6])
    (bad_json / "run.json").write_text('{"run_id": "badjson-0901')  # killed while writing (no atomic write)
    (day / "norun-090200-cccccc" / "ckpt").mkdir(parents=True)  # killed before run.json
    bad_summary = template.make(exp, "badsum-090300-dddddd", datetime(2026, 3, 1, 9, 3), values=[0.5, 0.6])
    (bad_summary / "summary.json").write_text("[1, 2")
    killed = template.make(exp, "killed-090400-eeeeee", datetime(2026, 3, 1, 9, 4), "running")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (killed / ".lock").write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(),
                                              "started": "2026-03-01T09:04:00"}))  # its process has ended
    table = runs_csv(str(exp), cwd=tmp_path).set_index("run_id")
    assert table.loc[killed.name, "status"] == "killed"
    assert table.loc[good.name, "status"] == "success"
    assert table.loc["badjson-090100-bbbbbb", "status"].startswith("unreadable: run.json: ")
    assert table.loc["norun-090200-cccccc", "status"] == "unreadable: no run.json"
    assert table.loc["badsum-090300-dddddd", "status"].startswith("unreadable: summary.json: ")
    res = run_cli("runs", str(exp), cwd=tmp_path)
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 6


def test_config_lists_the_runs_of_that_config_and_its_studies(template: Template, trained: dict[str, Any],
                                                             tmp_path: Path) -> None:
    from vistrain.tracking.rundir import config_hash

    exp = trained["exp"]
    own = config_hash(vistrain.load_config(trained["cfg"]))
    assert own == json.loads((trained["run"] / "run.json").read_text())["config_hash"]
    other = template.make(exp, "tiny-100000-eeeeee", datetime(2026, 3, 1, 10), values=[0.5, 0.6],
                          config_hash="0123456789abcdef")
    try:
        table = vistrain.runs(config=trained["cfg"])  # the config's output.exp_dir
        assert table["run_id"].tolist() == [trained["run"].name]
        got = runs_csv("--config", str(trained["cfg"]), cwd=tmp_path)
        assert got["run_id"].tolist() == [trained["run"].name]
    finally:
        import shutil

        shutil.rmtree(other)


# ------------------------------------------------------------------------------------------- studies

def make_study(template: Template, exp: Path, name: str, started: datetime, config_hash: str,
               values: dict[int, float], best: int) -> Path:
    """A tune directory as tuning/run.py lays it out: tune.json (its fields from _write_status) and one ordinary
    run directory per trial under trials/YYYYMMDD/."""
    tune_dir = exp / f"{started:%Y%m%d}" / f"{name}_tune"
    for n, value in values.items():
        template.make(exp, f"tiny-trial{n}-{started:%H%M}{n:02d}-{n:06x}", started, values=[value, value],
                      parent=tune_dir / "trials" / f"{started:%Y%m%d}", config_hash=f"{n:016x}", test=False)
    (tune_dir / "tune.json").write_text(json.dumps({
        "status": "success", "updated": started.isoformat(timespec="seconds"), "study_name": "tiny",
        "storage": f"sqlite:///{tune_dir}/study.db", "shared": False, "config_hash": config_hash,
        "n_trials": len(values), "done_before": 0, "monitor": MONITOR, "direction": "maximize",
        "trials": {"COMPLETE": len(values)}, "command": ["vistrain", "tune"], "error": None, "exit_code": None,
        "best": {"trial": best, "value": values[best], "params": {"train.lr": 0.001}},
        "started": started.isoformat(timespec="seconds")}))
    return tune_dir


def test_trials_are_listed_with_their_study(template: Template, trained: dict[str, Any], tmp_path: Path) -> None:
    from vistrain.tracking.rundir import config_hash

    exp = tmp_path / "exp"
    own = config_hash(vistrain.load_config(trained["cfg"]))
    tune_dir = make_study(template, exp, "tiny-080000-ffffff", datetime(2026, 2, 1, 8), own,
                          {0: 0.5, 1: 0.7, 2: 0.6}, best=1)
    make_study(template, exp, "tiny-090000-ffffff", datetime(2026, 2, 1, 9), "feedfacefeedface", {0: 0.5}, best=0)
    table = vistrain.runs(exp)
    assert (table["kind"] == "trial").all() and len(table) == 4
    mine = table[table["study"] == tune_dir.name].set_index("trial")
    assert mine["study_best"].to_dict() == {0: False, 1: True, 2: False}
    # --config F: a study of F's config lists its trials (their own hashes differ by the sampled values)
    assert vistrain.runs(exp, config=trained["cfg"])["study"].tolist() == [tune_dir.name] * 3


# ------------------------------------------------------------------------------------------- pruning

def weights(run: Path) -> list[Path]:
    return sorted(p for p in (run / "ckpt").iterdir() if p.suffix in (".pth", ".safetensors"))


def test_prune_dry_run_lists_then_prune_frees_what_it_listed(template: Template, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    now = datetime.now().replace(microsecond=0)
    old = now - timedelta(days=60)
    best1 = template.make(exp, "tiny-090000-000001", old, values=[0.9, 0.9])
    best2 = template.make(exp, "tiny-090100-000002", old + timedelta(minutes=1), values=[0.8, 0.8])
    worse = template.make(exp, "tiny-090200-000003", old + timedelta(minutes=2), values=[0.7, 0.7])
    worst = template.make(exp, "tiny-090300-000004", old + timedelta(minutes=3), values=[0.6, 0.6])
    failed = template.make(exp, "tiny-090400-000005", old + timedelta(minutes=4), "error")
    young = template.make(exp, "tiny-090500-000006", now - timedelta(days=2), values=[0.1, 0.1])
    running = template.make(exp, "tiny-090600-000007", old + timedelta(minutes=6), "running", values=[0.05, 0.05])
    (running / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                               "started": old.isoformat()}))  # this process: alive
    other = template.make(exp, "other-090700-000008", old, values=[0.1, 0.1])  # another project: its own best
    study = make_study(template, exp, "tiny-080000-ffffff", old, "feedfacefeedface",
                       {0: 0.5, 1: 0.7, 2: 0.6, 3: 0.65}, best=0)
    trials = {int(re.search(r"trial(\d+)", p.name).group(1)): p for p in (study / "trials").glob("*/*")}
    expect = [worse, worst, failed, trials[2]]  # the study keeps trials 1, 3 (its 2 best) and 0 (tune.json's best)
    before = {p: weights(p) for p in expect}
    assert all(before.values())
    sizes = {p: du_bytes(p / "ckpt") - os.stat(p / "ckpt").st_blocks * 512 for p in expect}

    args = ("runs", str(exp), "--prune", "--keep-best", "2", "--older-than", "30d")
    dry = run_cli(*args, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    listed = [ln for ln in dry.stdout.splitlines() if ln.startswith("would free")]
    assert sorted(Path(ln.split()[-1]) for ln in listed) == sorted(expect)
    assert all(weights(p) == files for p, files in before.items()), "--dry-run deleted something"
    total = dry.stdout.splitlines()[-1]
    assert total.startswith(f"total: would free {sum(sizes.values()) / 2**20:.1f} MB in 4 run(s)"), total

    real = run_cli(*args, cwd=tmp_path)
    assert real.returncode == 0, real.stderr
    freed = [ln for ln in real.stdout.splitlines() if ln.startswith("freed")]
    assert sorted(Path(ln.split()[-1]) for ln in freed) == sorted(expect)
    for p in expect:
        assert weights(p) == [] and (p / "summary.json").is_file() == (p != failed)
        assert json.loads((p / "run.json").read_text())["weights_deleted"]["bytes"] == sizes[p]
    for kept in (best1, best2, young, running, other, trials[0], trials[1], trials[3]):
        assert weights(kept), kept
    table = vistrain.runs(exp).set_index("run_id")
    assert table.loc[worse.name, "status"] == "success" and table.loc[worse.name, "weights_deleted"]
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0 and not [ln for ln in again.stdout.splitlines() if ln.startswith("freed ")]


def test_prune_api_is_a_dry_run_by_default(template: Template, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    old = template.make(exp, "tiny-090000-000001", datetime.now() - timedelta(weeks=3), values=[0.5, 0.5])
    plan = vistrain.prune_runs(exp, keep_best=0, older_than="2w")
    assert [p.path for p in plan.pruned] == [old] and plan.dry_run and weights(old)
    assert plan.freed == sum(p.bytes for p in plan.pruned) > 0
    assert vistrain.prune_runs(exp, keep_best=0, older_than="4w").pruned == []
    done = vistrain.prune_runs(exp, keep_best=0, older_than="12h", dry_run=False)
    assert [p.path for p in done.pruned] == [old] and not weights(old)


# ------------------------------------------------------------------------------------------- mistakes

@pytest.mark.parametrize(("args", "says"), [
    (["--sort", "macro_f2"], ["--sort", "'macro_f2'", "macro_f1", "valid_loss"]),
    (["--prune", "--keep-best", "2", "--older-than", "30x"], ["--older-than", "'30x'", "12h", "30d", "2w"]),
    (["--prune", "--older-than", "30d"], ["--prune", "--keep-best"]),
    (["--prune", "--keep-best", "2"], ["--prune", "--older-than"]),
    (["--keep-best", "2"], ["--keep-best", "--prune"]),
    (["--dry-run"], ["--dry-run", "--prune"]),
    (["--prune", "--keep-best", "2", "--older-than", "1d", "--format", "csv"], ["--format", "--prune"]),
    (["--mode", "fast"], ["--mode", "--config"]),
    (["--format", "xml"], ["--format", "xml"]),
    (["--prune", "--keep-best", "-1", "--older-than", "1d"], ["--keep-best", "-1"]),
])
def test_user_mistakes_exit_2_with_one_line(template: Template, tmp_path: Path, args: list[str],
                                            says: list[str]) -> None:
    exp = tmp_path / "exp"
    template.make(exp, "tiny-090000-000001", datetime(2026, 3, 1, 9), values=[0.5, 0.6])
    line = one_line_error(run_cli("runs", str(exp), *args, cwd=tmp_path))
    assert all(s in line for s in says), line


def test_a_missing_folder_exits_2_with_one_line(tmp_path: Path) -> None:
    line = one_line_error(run_cli("runs", str(tmp_path / "nowhere"), cwd=tmp_path))
    assert "DIR" in line and "nowhere" in line


@pytest.mark.slow
def test_a_real_studys_trials_are_listed_and_its_best_kept(tmp_path: Path) -> None:
    """A real tune study (2 trials of 1 epoch): its trials are rows of kind trial under the study, --config F lists
    them, and pruning everything old keeps the trial tune.json names best."""
    pytest.importorskip("optuna")
    data = write_csv_dataset(tmp_path / "data", per_class=6)
    exp = tmp_path / "exp"
    cfg = write_yaml(tmp_path / "cfg.yaml", tiny_config(
        data.root, output={"exp_dir": str(exp), "logs_dir": None}, tracking={"tensorboard": False},
        tune={"epochs": 1, "pruner": "none", "space": {"train.lr": {"type": "categorical", "choices": [3e-3, 1e-2]}}}))
    study = vistrain.tune(cfg, n_trials=2)
    table = vistrain.runs(exp)
    assert sorted(table["trial"].tolist()) == [0, 1] and (table["kind"] == "trial").all()
    assert (table["study"] == study.tune_dir.name).all() and (table["status"] == "success").all()
    best = table.set_index("trial")["study_best"].to_dict()
    assert best == {n: n == study.best_trial for n in (0, 1)}
    assert len(vistrain.runs(config=cfg)) == 2
    plan = vistrain.prune_runs(exp, keep_best=0, older_than="0h", dry_run=False)
    pruned = {Path(p.path).name for p in plan.pruned}
    kept = table[table["trial"] == study.best_trial]["run_id"].iloc[0]
    assert kept not in pruned and len(pruned) == 1 and plan.kept == {"best of their study": 1}
    assert weights(Path(table[table["run_id"] == kept]["path"].iloc[0]))
