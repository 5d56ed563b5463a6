"""data.split_classes: a retrieval run whose train / val / test parts hold disjoint classes, validated by the
class-disjoint protocol of published retrieval numbers (CUB, SOP): each validation image queries the other
validation images (leave-one-out), and that figure alone is called recall@K."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import describe, only_run_dir, read_metrics, run_cli, tiny_config, write_folders_dataset, write_yaml
from PIL import Image
from sklearn.neighbors import NearestNeighbors

from vistrain.config import load_config
from vistrain.data.prepare import prepare_data
from vistrain.errors import UserError

CLASSES = tuple(f"c{i}" for i in range(10))


def _config(root: Path, *extra: str):
    return load_config(None, overrides=["task=embedding", "data.source=folders", f"data.image_dir_train={root}",
                                        "data.image_ext=.png", "data.train_ratio=0.6", "data.val_ratio=0.2",
                                        "data.test_ratio=0.2", *extra])


def _classes_per_part(items: pd.DataFrame) -> dict[str, set[str]]:
    return {part: set(items.loc[items["split"] == part, "label"].astype(str)) for part in ("train", "val", "test")}


def test_split_classes_puts_every_class_in_one_part(tmp_path: Path) -> None:
    root = write_folders_dataset(tmp_path / "data", classes=CLASSES, objects=3, views=2, size=16)
    parts = _classes_per_part(prepare_data(_config(root, "data.split_classes=true")).items)
    assert all(parts.values()), parts  # train, val and test each hold classes
    assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"] or parts["val"] & parts["test"]), parts
    assert parts["train"] | parts["val"] | parts["test"] == set(CLASSES)
    assert (len(parts["val"]), len(parts["test"])) == (2, 2)  # 0.2 of the 10 classes each
    # Today's default splits each class's groups, so every class is seen in training (the test can tell them apart).
    shared = _classes_per_part(prepare_data(_config(root)).items)
    assert shared["val"] <= shared["train"] and shared["val"]


def test_split_classes_refuses_a_split_column_that_shares_a_class(tmp_path: Path) -> None:
    rows = []
    for i, (label, split) in enumerate([("a", "train"), ("a", "train"), ("b", "train"), ("b", "train"),
                                        ("c", "val"), ("c", "test"), ("d", "val"), ("d", "val")]):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append({"path": f"{i}.png", "label": label, "split": split})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    cfg = load_config(None, overrides=["task=embedding", "data.source=manifest", f"data.manifest={tmp_path / 'm.csv'}",
                                       "data.split_classes=true"])
    with pytest.raises(UserError) as excinfo:
        prepare_data(cfg)
    msg = str(excinfo.value)
    assert msg.startswith("data.split_classes:") and "c (test, val)" in msg and "'d'" not in msg, msg


def _leave_one_out_recall_at_1(feats: np.ndarray, labels: np.ndarray) -> float:
    """The CUB / SOP protocol computed with scikit-learn: each image with another of its class queries every other
    image by cosine distance; recall@1 = the fraction whose nearest other image has its class."""
    _, idx = NearestNeighbors(n_neighbors=2, metric="cosine", algorithm="brute").fit(feats).kneighbors(feats)
    nearest = np.where(idx[:, 0] == np.arange(len(feats)), idx[:, 1], idx[:, 0])
    counted = np.array([(labels == lab).sum() > 1 for lab in labels])
    return float(np.mean(labels[nearest][counted] == labels[counted]))


def test_a_split_classes_run_validates_on_unseen_classes_leave_one_out(tmp_path: Path) -> None:
    root = write_folders_dataset(tmp_path / "data", classes=CLASSES[:8], objects=3, views=2, size=32)
    cfg = tiny_config(root, train={"epochs": 1}, output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None},
                      tracking={"tensorboard": False})
    cfg["task"] = "embedding"
    cfg["data"] = {"source": "folders", "image_dir_train": str(root), "image_ext": ".png", "split_classes": True,
                   "train_ratio": 0.5, "val_ratio": 0.25, "test_ratio": 0.25}
    cfg["loss"] = {"terms": [{"name": "ce"}]}
    res = run_cli("train", "--config", str(write_yaml(tmp_path / "e.yaml", cfg)), cwd=tmp_path)
    assert res.returncode == 0, describe(res)
    run = only_run_dir(tmp_path / "exp")
    splits = pd.read_csv(run / "splits.csv", dtype={"label": str})
    assert splits.groupby("label")["split"].nunique().max() == 1, "a class in two parts"
    (row,) = read_metrics(run)
    assert [k for k in row if "recall@" in k] == ["recall@1", "recall@5"] and "knn_acc" not in row, row
    assert json.loads((run / "summary.json").read_text())["monitor"] == "recall@1"

    ev = run_cli("evaluate", str(run), "--split", "val", cwd=tmp_path)
    assert ev.returncode == 0, describe(ev)
    metrics = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    from vistrain.engine.inference import embed_paths, load_run

    val = splits[splits["split"] == "val"]
    feats = embed_paths(load_run(run), val["path"].tolist())
    want = _leave_one_out_recall_at_1(feats, val["label"].to_numpy())
    assert metrics["recall@1"] == pytest.approx(want, abs=1e-9)
    assert row["recall@1"] == pytest.approx(want, abs=1e-9)  # training's validation: the same protocol
    assert metrics["n_query"] == len(val) and "knn_recall@1" not in metrics, metrics
