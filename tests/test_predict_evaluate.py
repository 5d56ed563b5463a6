"""evaluate / predict / calibrate / report / full-pipeline on one tiny trained run (2 folds, 2 epochs, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import class_image, run_cli, tiny_config, write_csv_dataset, write_yaml

EVAL_FILES = ["metrics.json", "per_class.csv", "confusion_matrix.csv", "confusion_matrix.png", "failures.csv",
              "top_losses.csv"]


def _test_folder(root: Path, n_per_class: int = 3, classes: int = 3) -> tuple[Path, list[str], list[str]]:
    """``root/test/<id>.png`` with known labels; IDs deliberately not in sorted order of their labels."""
    rng = np.random.default_rng(5)
    folder = root / "test"
    folder.mkdir(parents=True, exist_ok=True)
    ids, labels = [], []
    for i in range(n_per_class):
        for k in range(classes):
            image_id = f"t{(i * 7 + k * 3) % 100:02d}_{k}"
            class_image(k, rng).save(folder / f"{image_id}.png")
            ids.append(image_id)
            labels.append(str(k))
    return folder, ids, labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("predict")
    domains = ["studio" if i % 3 else "real" for i in range(30)]
    data = write_csv_dataset(root / "data", per_class=10, extra_columns={"domain": domains})
    test_dir, ids, labels = _test_folder(root / "data")
    order = list(reversed(ids))  # the sample's order differs from the folder's sorted order
    pd.DataFrame({"ID": order, "target": 0}).to_csv(root / "data" / "sample_submission.csv", index=False)
    pd.DataFrame({"ID": ids, "target": labels}).to_csv(root / "data" / "test_labels.csv", index=False)
    cfg = tiny_config(data.root, data={"valid_fold": "all", "image_dir_test": str(test_dir),
                                       "sample_csv": str(root / "data" / "sample_submission.csv"),
                                       "test_csv": str(root / "data" / "test_labels.csv")},
                      train={"epochs": 3}, output={"exp_dir": str(root / "exp"), "logs_dir": None})
    config = write_yaml(root / "cfg.yaml", cfg)
    res = run_cli("train", "--config", str(config), "--use-calibration", "--mode", "full-pipeline", cwd=root)
    assert res.stdout.strip().splitlines()[-1] == "[EXIT] TRAINING SUCCESS code=0", res.stdout + res.stderr
    run_dir = next((root / "exp").glob("*/*/config.yaml")).parent
    return {"root": root, "run": run_dir, "ids": ids, "labels": labels, "order": order, "test_dir": test_dir}


def test_full_pipeline_writes_submission_in_sample_order(trained: dict) -> None:
    sub = pd.read_csv(trained["run"] / "submission.csv", dtype=str)
    assert sub.columns.tolist() == ["ID", "target"]
    assert sub["ID"].tolist() == trained["order"]
    truth = dict(zip(trained["ids"], trained["labels"]))
    accuracy = np.mean([truth[i] == t for i, t in zip(sub["ID"], sub["target"])])
    assert accuracy >= 0.8  # colours and stripes are easy; 3 epochs from scratch are enough


def test_calibration_file_and_plot(trained: dict) -> None:
    calib = json.loads((trained["run"] / "calibration.json").read_text())
    assert {"temperature", "nll_before", "nll_after", "ece_before", "ece_after"} <= set(calib)
    assert calib["temperature"] > 0
    assert calib["ece_after"] <= calib["ece_before"] + 1e-12
    assert calib["source"] == "oof"
    assert (trained["run"] / "calibration_reliability.png").stat().st_size > 1000


def test_evaluate_oof_writes_every_file(trained: dict) -> None:
    res = run_cli("evaluate", str(trained["run"]), "--split", "oof", cwd=trained["root"])
    assert res.returncode == 0, res.stderr
    out = trained["run"] / "eval" / "oof"
    for name in EVAL_FILES:
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("top1", "top5", "macro_f1", "weighted_f1", "balanced_accuracy", "nll", "ece"):
        assert 0 <= metrics[key] <= (10 if key == "nll" else 1), key
    per_class = pd.read_csv(out / "per_class.csv")
    assert {"class", "precision", "recall", "f1", "support", "accuracy"} <= set(per_class.columns)
    assert per_class["support"].sum() == 30
    oof = np.load(trained["run"] / "oof" / "oof_logits.npy")
    assert metrics["top1"] == pytest.approx(
        float((oof.argmax(1) == np.load(trained["run"] / "oof" / "oof_targets.npy")).mean()))
    assert "macro_f1" in res.stdout  # the short table
    # the item table had a domain column: one block per domain, counts adding up
    assert set(metrics["per_domain"]) == {"real", "studio"}
    assert metrics["per_domain"]["real"]["n"] + metrics["per_domain"]["studio"]["n"] == 30


def test_evaluate_val_and_test_splits(trained: dict) -> None:
    for split in ("val", "test"):
        res = run_cli("evaluate", str(trained["run"]), "--split", split, cwd=trained["root"])
        assert res.returncode == 0, res.stderr
        metrics = json.loads((trained["run"] / "eval" / split / "metrics.json").read_text())
        assert metrics["n"] == (30 if split == "val" else 9)


def test_predict_follows_the_sample_order_with_probabilities(trained: dict) -> None:
    out = trained["root"] / "sub.csv"
    res = run_cli("predict", str(trained["run"]), "--input", str(trained["test_dir"]), "--sample",
                  str(trained["root"] / "data" / "sample_submission.csv"), "--output", str(out), "--tta", "--probs",
                  "--folds", "0,1", cwd=trained["root"])
    assert res.returncode == 0, res.stderr
    sub = pd.read_csv(out, dtype={"ID": str})
    assert sub["ID"].tolist() == trained["order"]
    probs = sub[[f"prob_{k}" for k in range(3)]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (sub["target"].astype(str) == [str(int(i)) for i in probs.argmax(axis=1)]).all()


def test_predict_a_folder_without_sample_lists_every_image(trained: dict) -> None:
    res = run_cli("predict", str(trained["run"]), "--input", str(trained["test_dir"]), cwd=trained["root"])
    assert res.returncode == 0, res.stderr
    sub = pd.read_csv(trained["run"] / "predictions.csv", dtype=str)
    assert sorted(sub["ID"]) == sorted(f"{i}.png" for i in trained["ids"])


def test_predict_missing_image_names_the_id(trained: dict, tmp_path: Path) -> None:
    sample = tmp_path / "sample.csv"
    pd.DataFrame({"ID": [trained["ids"][0], "no_such_image"], "target": 0}).to_csv(sample, index=False)
    res = run_cli("predict", str(trained["run"]), "--input", str(trained["test_dir"]), "--sample", str(sample),
                  cwd=trained["root"])
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no_such_image" in lines[0], res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_predict_unknown_fold_is_a_user_error(trained: dict) -> None:
    res = run_cli("predict", str(trained["run"]), "--input", str(trained["test_dir"]), "--folds", "5",
                  cwd=trained["root"])
    assert res.returncode == 2 and "--folds" in res.stderr


def test_report_is_self_contained(trained: dict) -> None:
    res = run_cli("report", str(trained["run"]), cwd=trained["root"])
    assert res.returncode == 0, res.stderr
    html = (trained["run"] / "report.html").read_text()
    assert html.count("<img") >= 3 and 'src="http' not in html
    assert "calibration" in html.lower()


def test_training_plots_and_tensorboard_written(trained: dict) -> None:
    plots = {p.name for p in (trained["run"] / "plots").glob("*.png")}
    assert {"fold0_curves.png", "fold1_curves.png", "class_distribution.png", "oof_confusion_matrix.png"} <= plots
    assert list((trained["run"] / "tensorboard").glob("events.out.tfevents.*"))
