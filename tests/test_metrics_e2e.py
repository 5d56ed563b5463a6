"""What a training run logs per epoch: macro F1 over every class and top-5 for a classifier; knn_recall@K (the
closed-set recall: validation images against the training images of their classes) for the K of eval.recall_ks in
a retrieval run (metrics.jsonl, the [EPOCH] line, evaluate's metrics.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import (
    describe,
    only_run_dir,
    read_metrics,
    run_cli,
    tiny_config,
    write_csv_dataset,
    write_folders_dataset,
    write_yaml,
)
from sklearn.metrics import f1_score, top_k_accuracy_score


def test_classifier_epoch_row_has_macro_f1_over_all_classes_and_top5(tmp_path: Path) -> None:
    data = write_csv_dataset(tmp_path / "data", classes=("a", "b", "c", "d", "e", "f"), per_class=4, size=32)
    cfg = tiny_config(data.root, train={"epochs": 1}, output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None},
                      tracking={"tensorboard": False})
    res = run_cli("train", "--config", str(write_yaml(tmp_path / "c.yaml", cfg)), cwd=tmp_path)
    assert res.returncode == 0, describe(res)
    run = only_run_dir(tmp_path / "exp")
    (row,) = read_metrics(run)
    # The reference: the fold's saved validation logits (its best, here only, epoch), scored by scikit-learn.
    splits = pd.read_csv(run / "splits.csv", dtype={"label": str})
    class_to_idx = json.loads((run / "class_map.json").read_text())["class_to_idx"]
    targets = splits.loc[splits["fold"] == 0, "label"].map(class_to_idx).to_numpy()
    logits = np.load(run / "oof" / "fold0_valid_logits.npy").astype(np.float64)
    pred = logits.argmax(axis=1)
    assert row["macro_f1"] == f1_score(targets, pred, labels=range(6), average="macro", zero_division=0)
    assert row["top5"] == top_k_accuracy_score(targets, logits, k=5, labels=range(6))
    epoch_line = next(ln for ln in (run / "train.log").read_text().splitlines() if "[EPOCH] fold=0 epoch=1/1" in ln)
    assert f"top5={row['top5']:.4f}" in epoch_line, epoch_line


def test_retrieval_run_reports_knn_recall_at_each_k_of_eval_recall_ks(tmp_path: Path) -> None:
    root = write_folders_dataset(tmp_path / "folders", classes=("cat", "dog", "owl"), objects=6, views=2, size=32)
    cfg = tiny_config(root)
    cfg["task"] = "embedding"
    cfg["data"] = {"source": "folders", "image_dir_train": str(root)}
    cfg["loss"] = {"terms": [{"name": "ce"}]}
    cfg["train"].update(epochs=1, monitor="knn_recall@3")
    cfg["eval"] = {"recall_ks": [3, 1]}
    cfg["output"] = {"exp_dir": str(tmp_path / "exp"), "logs_dir": None}
    cfg["tracking"] = {"tensorboard": False}
    res = run_cli("train", "--config", str(write_yaml(tmp_path / "e.yaml", cfg)), cwd=tmp_path)
    assert res.returncode == 0, describe(res)
    run = only_run_dir(tmp_path / "exp")
    (row,) = read_metrics(run)
    assert [k for k in row if "recall@" in k] == ["knn_recall@1", "knn_recall@3"], row
    assert row["knn_recall@1"] <= row["knn_recall@3"]
    assert json.loads((run / "summary.json").read_text())["monitor"] == "knn_recall@3"
    epoch_line = next(ln for ln in (run / "train.log").read_text().splitlines() if "[EPOCH] fold=0" in ln)
    assert "knn_recall@1=" in epoch_line and " recall@1=" not in epoch_line, epoch_line
    ev = run_cli("evaluate", str(run), "--split", "val", cwd=tmp_path)
    assert ev.returncode == 0, describe(ev)
    metrics = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    assert [k for k in metrics if "recall@" in k] == ["knn_recall@1", "knn_recall@3"], metrics
