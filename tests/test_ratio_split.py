"""data.split: ratio for a classifier, end to end with two sources mixed 0.3:0.7 and a class map (the seed 003 set-up
in miniature): one model on split=train, validated on split=val, scored on split=test into eval/test/ at the end."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pytest
from conftest import Started, describe, only_run_dir, run_cli, write_csv_dataset, write_folders_dataset, write_yaml

from vistrain.data.splits import classification_split
from vistrain.errors import UserError

pytestmark = pytest.mark.slow
CLASS_ORDER = ["c", "a", "b"]
METADATA = {"a": {"display_name": "Aspirin", "training_weight": 1.0},
            "b": {"display_name": "Brufen", "training_weight": 2.0},
            "c": {"display_name": "Codeine", "training_weight": 1.5}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ratio")
    write_folders_dataset(root / "studio", classes=("a", "b", "c"), objects=10, views=2, size=24)
    write_folders_dataset(root / "real", classes=("a", "b", "c"), objects=2, views=2, size=24, seed=3)
    (root / "class_map.json").write_text(json.dumps({
        "class_to_idx": {c: i for i, c in enumerate(CLASS_ORDER)}, "metadata": METADATA}))
    cfg = {
        "project": {"name": "pills", "seed": 3},
        "data": {"sources": [{"name": "studio", "source": "folders", "image_dir_train": "studio", "ratio": 0.3},
                             {"name": "real", "source": "folders", "image_dir_train": "real", "ratio": 0.7}],
                 "class_map": "class_map.json", "split": "ratio", "train_ratio": 0.8, "val_ratio": 0.1,
                 "test_ratio": 0.1, "min_images_per_class": 10},
        "model": {"name": "resnet10t"},
        "train": {"img_size": 32, "batch_size": 8, "epochs": 1, "lr": 3e-3, "warmup_epochs": 0, "num_workers": 0,
                  "log_interval": 0, "device": "cpu", "class_weights": "from_class_map"},
        "sampler": {"name": "weighted"}, "augment": {"policy": "none"},
        "output": {"exp_dir": "exp", "logs_dir": None},
    }
    config = write_yaml(root / "config.yaml", cfg)
    train = run_cli("train", "--config", str(config), cwd=root)
    assert train.returncode == 0, describe(train)
    run = only_run_dir(root / "exp")
    first_test = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    later = {"evaluate": Started("evaluate", str(run), "--split", "test", cwd=root),
             "oof": Started("evaluate", str(run), "--split", "oof", cwd=root),
             "predict": Started("predict", str(run), "--input", str(root / "real" / "a"), "--output",
                                str(root / "pred.csv"), cwd=root)}
    out = {name: s.wait() for name, s in later.items()}
    out["calibrate"] = run_cli("calibrate", str(run), cwd=root)  # after evaluate: a temperature changes its numbers
    return {"root": root, "run": run, "train": train, "first_test": first_test, **out}


def splits(trained: dict) -> pd.DataFrame:
    return pd.read_csv(trained["run"] / "splits.csv", dtype=str, keep_default_na=False)


def test_the_log_reports_domains_split_and_sampler(trained):
    log = (trained["run"] / "train.log").read_text()
    assert "[DATA] domains: real=12 (ratio 0.7), studio=60 (ratio 0.3)" in log
    assert "[DATA] split=ratio (data.train_ratio/val_ratio/test_ratio 0.8/0.1/0.1, grouped, stratified)" in log
    assert "data.folds and data.valid_fold are not used" in log
    assert "[DATA] sampler: each epoch draws studio 30% / real 70% of the training images and the classes drawn " \
           "equally often (sampler.name: weighted)" in log
    assert "[DONE] test split: n=" in log


def test_splits_csv_holds_domain_and_a_grouped_train_val_test_split(trained):
    table = splits(trained)
    assert set(table["split"]) == {"train", "val", "test"}
    assert table.groupby("group")["split"].nunique().max() == 1  # no object on two sides
    assert (table.loc[table["split"] == "val", "fold"] == "0").all()
    assert (table.loc[table["split"] != "val", "fold"] == "-1").all()  # trains in no fold's validation
    assert table["domain"].value_counts().to_dict() == {"studio": 60, "real": 12}
    for split in ("val", "test"):  # stratified: every class in val and test
        assert set(table.loc[table["split"] == split, "label"]) == {"a", "b", "c"}


def test_the_model_trains_on_split_train_only(trained):
    log = (trained["run"] / "train.log").read_text()
    table = splits(trained)
    n_train, n_val = (table["split"] == "train").sum(), (table["split"] == "val").sum()
    assert f"train={n_train} valid={n_val}" in log


def test_class_map_json_keeps_the_maps_order_and_metadata(trained):
    class_map = json.loads((trained["run"] / "class_map.json").read_text())
    assert class_map["class_to_idx"] == {c: i for i, c in enumerate(CLASS_ORDER)}
    assert class_map["idx_to_class"] == {str(i): c for i, c in enumerate(CLASS_ORDER)}
    assert class_map["metadata"] == {c: METADATA[c] for c in CLASS_ORDER}


def test_the_run_directory_has_the_manifest(trained):
    m = json.loads((trained["run"] / "manifest.json").read_text())
    table = splits(trained)
    assert m["classes"] == CLASS_ORDER and m["num_classes"] == 3
    assert {k: v["num_images"] for k, v in m["splits"].items()} == table["split"].value_counts().to_dict()
    assert {k: (v["num_images"], v["ratio"]) for k, v in m["domains"].items()} == {"real": (12, 0.7),
                                                                                   "studio": (60, 0.3)}


def test_the_test_split_is_scored_at_the_end_of_training(trained):
    table = splits(trained)
    test = table[table["split"] == "test"]
    m = trained["first_test"]
    assert m["n"] == len(test) and m["split"] == "test"
    cm = pd.read_csv(trained["run"] / "eval" / "test" / "confusion_matrix.csv", index_col="true")
    assert cm.index.astype(str).tolist() == CLASS_ORDER
    assert cm.sum(axis=1).tolist() == [int((test["label"] == c).sum()) for c in CLASS_ORDER]
    assert m["top1"] == pytest.approx(np.trace(cm.to_numpy()) / len(test))
    summary = json.loads((trained["run"] / "summary.json").read_text())
    assert summary["test"]["n"] == len(test) and summary["test"]["top1"] == m["top1"]
    assert "oof" not in summary and summary["split"]["type"] == "ratio"
    assert summary["split"]["oof"].startswith("none: a ratio split trains one model")
    assert (summary["split"]["train"], summary["split"]["val"], summary["split"]["test"]) == tuple(
        int((table["split"] == s).sum()) for s in ("train", "val", "test"))


def test_evaluate_split_test_later_gives_the_same_numbers(trained):
    r: subprocess.CompletedProcess = trained["evaluate"]
    assert r.returncode == 0, describe(r)
    again = json.loads((trained["run"] / "eval" / "test" / "metrics.json").read_text())
    for key in ("n", "top1", "top5", "macro_f1", "nll"):
        assert again[key] == pytest.approx(trained["first_test"][key], abs=1e-6)


def test_other_commands_work_on_a_ratio_split_run(trained):
    cal: subprocess.CompletedProcess = trained["calibrate"]
    assert cal.returncode == 0, describe(cal)
    result = json.loads((trained["run"] / "calibration.json").read_text())
    assert result["source"] == "validation fold(s) [0]" and result["n"] == (splits(trained)["split"] == "val").sum()
    # one model's validation rows: cross-fitted over parts of them; the single model is its own ensemble
    assert result["cross_fit"]["by"] == "5 interleaved parts of the rows"
    assert result["calibration"]["in_sample"] is False
    assert result["ensemble"]["fitted_on"] == result["source"] and result["ensemble"]["fitted"] == result["applied"]
    pred: subprocess.CompletedProcess = trained["predict"]
    assert pred.returncode == 0, describe(pred)
    assert len(pd.read_csv(trained["root"] / "pred.csv")) == 4
    oof: subprocess.CompletedProcess = trained["oof"]
    assert oof.returncode == 2 and "has a ratio split: one model, no out-of-fold logits" in oof.stderr


# ------------------------------------------------------------------------------------------ split column

def test_a_split_column_in_the_data_is_taken_as_is(tmp_path):
    from vistrain.config.loader import load_config
    from vistrain.data.prepare import prepare_data

    given = ["train", "train", "val", "test"] * 3
    ds = write_csv_dataset(tmp_path, classes=("x", "y", "z"), per_class=4, size=8, extra_columns={"split": given})
    cfg = load_config(write_yaml(tmp_path / "c.yaml", {"data": {
        "train_csv": str(ds.train_csv), "image_dir_train": str(ds.image_dir), "image_ext": ".png", "split": "ratio"}}))
    data = prepare_data(cfg)
    assert data.items["split"].tolist() == given and data.split_given
    train, val = data.fold_indices(0)
    assert train.tolist() == [i for i, s in enumerate(given) if s == "train"]
    assert val.tolist() == [i for i, s in enumerate(given) if s == "val"]


@pytest.mark.parametrize(("values", "needle"), [
    (["train", "val", "dev"], "item i2 has split 'dev'; valid: train, val, test"),
    (["train", "test", "test"], "the data's split column has no 'val' rows"),
])
def test_a_bad_split_column_is_a_user_error(values, needle):
    items = pd.DataFrame({"id": ["i0", "i1", "i2"], "label": ["a", "a", "b"], "group": ["i0", "i1", "i2"],
                          "split": values})
    with pytest.raises(UserError) as err:
        classification_split(items, 0.8, 0.1, 0.1, seed=0)
    assert str(err.value).startswith("data.split: ") and needle in str(err.value)


def test_a_ratio_split_without_validation_images_names_val_ratio():
    items = pd.DataFrame({"id": list("abcd"), "label": list("xyzw"), "group": list("abcd")})
    with pytest.raises(UserError, match=r"^data.val_ratio: 0.1 of the 4 groups left no validation images"):
        classification_split(items, 0.8, 0.1, 0.1, seed=0)


def test_config_with_a_ratio_split_trains_one_fold_and_reads_the_ratios(tmp_path):
    from vistrain.config.loader import load_config

    cfg = load_config(write_yaml(tmp_path / "c.yaml", {"data": {"split": "ratio", "valid_fold": "all"}}))
    assert cfg.folds_to_train() == [0]
    unread = cfg.keys_not_read()
    assert "data.folds" in unread and "data.valid_fold" in unread and "data.train_ratio" not in unread


def test_the_class_distribution_plot_counts_split_train_and_val(trained):
    from vistrain.viz.plots import fold_class_counts

    table = splits(trained)
    names, folds, train, valid = fold_class_counts(trained["run"] / "splits.csv", CLASS_ORDER)
    assert names == CLASS_ORDER and folds == [0]
    for part, counts in (("train", train), ("val", valid)):
        expected = [int(((table["split"] == part) & (table["label"] == c)).sum()) for c in CLASS_ORDER]
        assert counts[0].tolist() == expected
