"""``vistrain demo`` on a tiny folder laid out as the demo writes it (the digits themselves take minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import class_image, run_cli, tiny_config, write_csv_dataset, write_yaml

from vistrain.config.loader import load_config
from vistrain.data.demo import default_demo_config


def _demo_layout(out: Path) -> list[str]:
    """train.csv + train/, test/ + sample_submission.csv + test_labels.csv, as ``write_digits`` leaves them."""
    write_csv_dataset(out, classes=("0", "1"), per_class=8)
    (out / "test").mkdir()
    rng = np.random.default_rng(3)
    ids, labels = [f"digit_t{i}" for i in range(6)], [str(i % 2) for i in range(6)]
    for image_id, label in zip(ids, labels):
        class_image(int(label), rng).save(out / "test" / f"{image_id}.png")
    pd.DataFrame({"ID": ids, "target": 0}).to_csv(out / "sample_submission.csv", index=False)
    pd.DataFrame({"ID": ids, "target": labels}).to_csv(out / "test_labels.csv", index=False)
    return ids


def test_evaluate_split_test_works_on_the_demo_run(tmp_path: Path) -> None:
    out = tmp_path / "demo_data"
    _demo_layout(out)
    cfg = tiny_config(out, train={"epochs": 1}, output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None})
    for key in ("train_csv", "image_dir_train"):  # the demo fills in the data paths itself
        cfg["data"].pop(key)
    res = run_cli("demo", "--out", str(out), "--config", str(write_yaml(tmp_path / "demo.yaml", cfg)), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    run = next((tmp_path / "exp").glob("*/*/config.yaml")).parent
    ev = run_cli("evaluate", str(run), "--split", "test", cwd=tmp_path)
    assert ev.returncode == 0, ev.stdout + ev.stderr
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert metrics["n"] == 6


def test_the_demo_config_names_the_labelled_test_csv() -> None:
    cfg = load_config(default_demo_config())
    assert cfg.data.test_csv is not None and cfg.data.test_csv.name == "test_labels.csv"
    assert cfg.data.test_csv.parent == cfg.data.image_dir_test.parent
