"""End to end: ``python -m vistrain train`` on generated images, then everything in the run directory.

Three commands run at once (one CSV run with every fold, one ``folders`` run, one ``split``), so their
start-up costs overlap; every test below reads their results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import (
    CsvDataset,
    Started,
    describe,
    last_line,
    only_run_dir,
    read_metrics,
    run_dirs,
    tiny_config,
    write_csv_dataset,
    write_folders_dataset,
    write_yaml,
)

from vistrain.config import config_to_dict, load_config

pytestmark = pytest.mark.slow

OVERRIDES = ["data.valid_fold=all", "data.folds=2", "train.epochs=2"]
TAGS = ["[BOOT]", "[CFG]", "[PATH]", "[DATA]", "[MODEL]", "[EPOCH]", "NEW_BEST", "[DONE]"]
METRIC_KEYS = {"fold", "epoch", "train_loss", "valid_loss", "macro_f1", "lr", "time_s", "mem_MiB"}


@dataclass
class Runs:
    root: Path
    data: CsvDataset
    config_path: Path
    workdir: Path
    train: object  # CompletedProcess of the CSV run
    folders: object  # CompletedProcess of the folders run
    split: object  # CompletedProcess of `vistrain split`
    split_csv: Path
    folders_root: Path

    @property
    def exp_dir(self) -> Path:
        return self.root / "exp"

    @property
    def run_dir(self) -> Path:
        assert self.train.returncode == 0, describe(self.train)
        return only_run_dir(self.exp_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """The YAML names data and outputs relative to its own folder; the commands run from another folder."""
    root = tmp_path_factory.mktemp("e2e")
    data = write_csv_dataset(root / "data", classes=("0", "1", "2"), per_class=12)
    cfg = tiny_config(data.root)
    cfg["data"].update(train_csv="../data/train.csv", image_dir_train="../data/train")
    cfg["output"] = {"exp_dir": "../exp", "logs_dir": "../logs"}
    config_path = write_yaml(root / "configs" / "tiny.yaml", cfg)

    folders_root = write_folders_dataset(root / "folders", classes=("cat", "dog"), objects=6, views=2)
    fcfg = tiny_config(data.root)
    fcfg["data"] = {"source": "folders", "image_dir_train": str(folders_root), "folds": 2, "valid_fold": 0}
    fcfg["output"] = {"exp_dir": str(root / "exp_folders"), "logs_dir": str(root / "logs_folders")}
    fcfg["train"]["epochs"] = 1
    folders_config = write_yaml(root / "configs" / "folders.yaml", fcfg)

    workdir = root / "work"
    split_csv = workdir / "out" / "splits.csv"
    train = Started("train", "--config", str(config_path), *OVERRIDES, cwd=workdir)
    folders = Started("train", "--config", str(folders_config), cwd=workdir)
    split = Started("split", "--config", str(config_path), "--output", "out/splits.csv", *OVERRIDES, cwd=workdir)
    return Runs(root, data, config_path, workdir, train.wait(), folders.wait(), split.wait(), split_csv,
                folders_root)


# ------------------------------------------------------------------------------------------- the CSV run

def test_train_succeeds_and_says_so_last(runs):
    r = runs.train
    assert r.returncode == 0, describe(r)
    assert last_line(r.stdout) == "[EXIT] TRAINING SUCCESS code=0", describe(r)
    assert "Traceback" not in r.stdout + r.stderr


def test_one_run_directory_under_exp_dir_day_folder(runs):
    run_dir = runs.run_dir  # exactly one, under exp_dir/YYYYMMDD/
    assert run_dir.name.startswith("tiny"), "the run id starts with project.name"
    done = [ln for ln in runs.train.stdout.splitlines() if ln.startswith("[DONE] run directory: ")]
    assert len(done) == 1 and Path(done[0].split(": ", 1)[1]).resolve() == run_dir.resolve(), describe(runs.train)
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "success"
    assert not (runs.workdir / "experiments").exists(), "output.exp_dir from the YAML must be used, not ./experiments"


def test_config_yaml_reloads_to_the_same_settings(runs):
    saved = load_config(runs.run_dir / "config.yaml")
    used = load_config(runs.config_path, overrides=OVERRIDES)
    # Settings chosen for the machine are recorded as resolved values: fp32, the worker and thread counts on a CPU.
    assert saved.train.amp == "fp32" and used.train.amp == "auto"
    assert saved.train.num_workers == used.train.num_workers == 0
    assert saved.train.num_threads == 1 and used.train.num_threads == "auto"  # auto honours cli_env's OMP_NUM_THREADS
    assert saved.train.channels_last is False and used.train.channels_last == "auto"  # NHWC only on CUDA
    assert saved.augment.device == "cpu" and used.augment.device == "auto"
    saved_dict, used_dict = config_to_dict(saved), config_to_dict(used)
    for section, key in (("train", "amp"), ("train", "num_threads"), ("train", "channels_last"), ("augment", "device")):
        saved_dict[section].pop(key), used_dict[section].pop(key)
    assert saved_dict == used_dict
    assert saved.data.train_csv == runs.data.train_csv.resolve()
    assert saved.data.valid_fold == "all" and saved.train.epochs == 2


def test_train_log_has_every_tag(runs):
    log = (runs.run_dir / "train.log").read_text()
    missing = [t for t in TAGS if t not in log]
    assert not missing, f"train.log lacks {missing}"
    copies = list((runs.root / "logs").glob(f"run_*_{runs.run_dir.name}.log"))
    assert len(copies) == 1, "output.logs_dir must hold one copy of train.log"
    assert all(t in copies[0].read_text() for t in TAGS)


def test_cfg_lines_show_the_classifier_keys_and_config_yaml_keeps_all(runs):
    log = (runs.run_dir / "train.log").read_text()
    cfg_lines = "\n".join(ln for ln in log.splitlines() if "[CFG]" in ln)
    for unread in ("[CFG] loss:", "'last_stride'", "'arcface_s'", "'neck'", "'query_folder'", "'knn_k'",
                   "'rerank'", "'freeze_backbone_epochs'", "'p': 16", "'train_ratio'"):
        assert unread not in cfg_lines, f"{unread} is not read by a classifier: [CFG] leaves it out"
    for read in ("'label_smoothing'", "'failure_threshold'", "'mixup_alpha'", "'valid_fold'", "'name': 'random'"):
        assert read in cfg_lines
    saved = yaml.safe_load((runs.run_dir / "config.yaml").read_text())
    assert "terms" in saved["loss"] and "last_stride" in saved["model"] and "knn_k" in saved["eval"]


def test_metrics_jsonl_one_row_per_fold_and_epoch(runs):
    rows = read_metrics(runs.run_dir)
    assert sorted((r["fold"], r["epoch"]) for r in rows) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for r in rows:
        assert METRIC_KEYS <= set(r), f"missing {METRIC_KEYS - set(r)} in {r}"
        assert 0.0 <= r["macro_f1"] <= 1.0
        assert np.isfinite(r["train_loss"]) and np.isfinite(r["valid_loss"])
        assert r["lr"] > 0 and r["time_s"] >= 0


def test_summary_has_per_fold_best_and_mean_std(runs):
    summary = json.loads((runs.run_dir / "summary.json").read_text())
    rows = read_metrics(runs.run_dir)
    folds = {f["fold"]: f for f in summary["folds"]}
    assert sorted(folds) == [0, 1]
    for k, f in folds.items():
        fold_rows = [r for r in rows if r["fold"] == k]
        best_value = max(r["macro_f1"] for r in fold_rows)
        first_best = min(r["epoch"] for r in fold_rows if r["macro_f1"] == best_value)
        assert f["best"]["macro_f1"] == pytest.approx(best_value)
        assert f["best_epoch"] == first_best
        best_row = next(r for r in fold_rows if r["epoch"] == first_best)
        assert f["best"]["valid_loss"] == pytest.approx(best_row["valid_loss"])
    values = [folds[k]["best"]["macro_f1"] for k in (0, 1)]
    assert summary["mean"]["macro_f1"] == pytest.approx(np.mean(values))
    assert summary["std"]["macro_f1"] == pytest.approx(np.std(values, ddof=1))
    assert "oof" in summary and 0.0 <= summary["oof"]["macro_f1"] <= 1.0


def test_splits_csv_and_class_map(runs):
    splits = pd.read_csv(runs.run_dir / "splits.csv", dtype=str, keep_default_na=False)
    assert {"id", "path", "label", "fold"} <= set(splits.columns)
    assert sorted(splits["id"]) == sorted(runs.data.ids)
    assert set(splits["fold"]) == {"0", "1"}
    assert (pd.crosstab(splits["label"], splits["fold"]) == 6).all().all()  # 12 per class, stratified in 2
    class_map = json.loads((runs.run_dir / "class_map.json").read_text())
    assert class_map["class_to_idx"] == {"0": 0, "1": 1, "2": 2}
    assert {str(k): str(v) for k, v in class_map["idx_to_class"].items()} == {"0": "0", "1": "1", "2": "2"}


def test_checkpoints_per_fold(runs):
    import torch

    summary = json.loads((runs.run_dir / "summary.json").read_text())
    for f in summary["folds"]:
        k = f["fold"]
        best = runs.run_dir / "ckpt" / f"best_fold{k}.pth"
        last = runs.run_dir / "ckpt" / f"last_fold{k}.pth"
        assert best.is_file() and last.is_file()
        b = torch.load(best, map_location="cpu", weights_only=False)
        assert b["epoch"] == f["best_epoch"]
        assert "model" in b
        lst = torch.load(last, map_location="cpu", weights_only=False)
        assert lst["epoch"] == 2 and lst.get("finished") is True


def test_oof_files(runs):
    oof = runs.run_dir / "oof"
    splits = pd.read_csv(runs.run_dir / "splits.csv", dtype=str, keep_default_na=False)
    logits = np.load(oof / "oof_logits.npy")
    targets = np.load(oof / "oof_targets.npy")
    ids = pd.read_csv(oof / "oof_ids.csv", dtype=str, keep_default_na=False)
    n = len(runs.data.ids)
    assert logits.shape == (n, 3) and np.isfinite(logits).all()
    assert targets.shape == (n,)
    assert ids["id"].tolist() == splits["id"].tolist(), "OOF rows are in splits.csv order"
    class_map = json.loads((runs.run_dir / "class_map.json").read_text())["class_to_idx"]
    assert targets.tolist() == [class_map[label] for label in splits["label"]]
    assert ids["fold"].tolist() == splits["fold"].tolist()
    assert (logits.std(axis=1) > 0).all(), "every item must have real logits, not zeros"


def test_oof_logits_are_the_best_checkpoints_predictions(runs):
    """Each item's OOF logits are what its fold's best checkpoint predicts for it (order and preprocessing)."""
    import torch

    from vistrain.data.images import load_rgb
    from vistrain.data.preprocess import Preprocessor
    from vistrain.models.build import build_classifier

    splits = pd.read_csv(runs.run_dir / "splits.csv", dtype=str, keep_default_na=False)
    logits = np.load(runs.run_dir / "oof" / "oof_logits.npy")
    for k in (0, 1):
        ckpt = torch.load(runs.run_dir / "ckpt" / f"best_fold{k}.pth", map_location="cpu", weights_only=False)
        model = build_classifier("resnet10t", 3)
        model.load_state_dict(ckpt["model"])
        model.eval()
        pre = Preprocessor.from_dict(ckpt["preprocess"])
        rows = np.flatnonzero(splits["fold"].to_numpy() == str(k))
        batch = torch.stack([pre.process(np.asarray(load_rgb(splits["path"].iloc[i]))) for i in rows])
        with torch.no_grad():
            expected = model(batch).numpy()
        np.testing.assert_allclose(logits[rows], expected, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------- split command

def test_split_command_writes_the_train_assignment(runs):
    r = runs.split
    assert r.returncode == 0, describe(r)
    assert runs.split_csv.is_file(), describe(r)
    written = pd.read_csv(runs.split_csv, dtype=str, keep_default_na=False)
    trained = pd.read_csv(runs.run_dir / "splits.csv", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(written, trained)
    assert not run_dirs(runs.root / "exp")[1:], "split must not create a run directory"


# ---------------------------------------------------------------------------------------- folders source

def test_folders_source_end_to_end(runs):
    r = runs.folders
    assert r.returncode == 0, describe(r)
    assert last_line(r.stdout) == "[EXIT] TRAINING SUCCESS code=0"
    run_dir = only_run_dir(runs.root / "exp_folders")
    splits = pd.read_csv(run_dir / "splits.csv", dtype=str, keep_default_na=False)
    assert len(splits) == 2 * 6 * 2
    assert (splits.groupby("group")["fold"].nunique() == 1).all(), "an object's views must share a fold"
    assert set(splits["group"]) == {f"{c}/obj{j}" for c in ("cat", "dog") for j in range(6)}
    class_map = json.loads((run_dir / "class_map.json").read_text())
    assert class_map["class_to_idx"] == {"cat": 0, "dog": 1}
    assert [(m["fold"], m["epoch"]) for m in read_metrics(run_dir)] == [(0, 1)]
    assert (run_dir / "ckpt" / "best_fold0.pth").is_file()
    assert not (run_dir / "ckpt" / "best_fold1.pth").exists(), "only data.valid_fold=0 was asked for"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [0]
    assert "oof" not in summary, "out-of-fold results need every fold"
