"""evaluate / predict / calibrate / report / full-pipeline on one tiny trained run (2 folds, 2 epochs, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from conftest import class_image, run_cli, tiny_config, write_csv_dataset, write_yaml
from sklearn.metrics import log_loss

from vistrain.data.preprocess import Preprocessor

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
    # the after-figures and the keep / revert decision come from rows the temperature never saw
    assert calib["calibration"] == {"fitted_on": "oof", "evaluated_on": "oof, cross-fitted by fold", "in_sample": False}
    assert sorted(calib["cross_fit"]["temperatures"]) == ["0", "1"] and calib["cross_fit"]["by"] == "fold"
    # two folds averaged are softer than either model: no labelled images outside both folds, so no ensemble T
    assert calib["ensemble"]["temperature"] is None and calib["ensemble"]["fitted"] is False
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
        assert metrics["calibration"]["in_sample"] is False and metrics["calibration"]["evaluated_on"] == split
    # the test split is the 2-fold ensemble: not at one model's temperature
    assert metrics["calibration"]["temperature"] is None and metrics["calibration"]["fitted_on"] is None


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


# ------------------------------------------------------------------------------- evaluation-time overrides

def test_evaluate_takes_evaluation_overrides_and_records_them(trained: dict, tmp_path: Path) -> None:
    """data.test_csv given on the command line (relative to the working directory, before or after the flags)
    replaces the run's; the effective values land in metrics.json."""
    subset = tmp_path / "few.csv"
    pd.DataFrame({"ID": trained["ids"][:4], "target": trained["labels"][:4]}).to_csv(subset, index=False)
    for args in (["--split", "test", "data.test_csv=few.csv", "eval.batch_size=3"],
                 ["data.test_csv=few.csv", "--split", "test", "eval.batch_size=3"]):
        res = run_cli("evaluate", str(trained["run"]), *args, cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        metrics = json.loads((trained["run"] / "eval" / "test" / "metrics.json").read_text())
        assert metrics["n"] == 4
        assert metrics["overrides"] == {"data.test_csv": str(subset.resolve()), "eval.batch_size": 3}
    plain = run_cli("evaluate", str(trained["run"]), "--split", "test", cwd=trained["root"])
    assert plain.returncode == 0, plain.stderr
    metrics = json.loads((trained["run"] / "eval" / "test" / "metrics.json").read_text())
    assert metrics["n"] == 9 and metrics["overrides"] == {}  # the run's own config.yaml is unchanged


@pytest.mark.parametrize("override", ["train.lr=0.1", "model.name=resnet18"])
def test_evaluate_refuses_a_training_key(trained: dict, override: str) -> None:
    res = run_cli("evaluate", str(trained["run"]), "--split", "val", override, cwd=trained["root"])
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    key = override.split("=")[0]
    assert lines[0].startswith(f"error: {key}:"), lines
    assert "eval." in lines[0] and "data.test_csv" in lines[0]  # what is allowed


def test_evaluate_names_every_training_key_it_refuses(trained: dict) -> None:
    res = run_cli("evaluate", str(trained["run"]), "train.epochs=3", "eval.batch_size=4", "model.name=x",
                  "augment.hflip=0", cwd=trained["root"])
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, lines
    assert lines[0].startswith("error: train.epochs, model.name, augment.hflip: cannot be changed by evaluate; "
                               "valid keys: eval.*"), lines


def test_evaluate_override_is_validated_like_a_training_one(trained: dict) -> None:
    res = run_cli("evaluate", str(trained["run"]), "--split", "val", "eval.batch_size=0", "eval.tta=[spin]",
                  cwd=trained["root"])
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()  # every problem, one line each, as for train
    assert lines[0].startswith("error: eval.") and len(lines) == 2, lines
    assert any(ln.removeprefix("error: ").startswith("eval.batch_size: ") and "greater than 0" in ln
               for ln in lines), lines
    assert any(ln.removeprefix("error: ").startswith("eval.tta") and "'hflip'" in ln and "spin" in ln
               for ln in lines), lines
    assert "Traceback" not in res.stderr


def test_predict_takes_overrides_and_logs_them(trained: dict, tmp_path: Path) -> None:
    ids = tmp_path / "ids.csv"
    pd.DataFrame({"ID": trained["ids"][:3]}).to_csv(ids, index=False)
    out = tmp_path / "p.csv"
    res = run_cli("predict", str(trained["run"]), "--input", str(ids), "--output", str(out), "--tta",
                  f"data.image_dir_test={trained['test_dir']}", "eval.tta=[hflip, vflip]", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert pd.read_csv(out, dtype=str)["ID"].tolist() == trained["ids"][:3]
    assert "eval.tta=['hflip', 'vflip']" in res.stdout and "data.image_dir_test=" in res.stdout
    bad = run_cli("predict", str(trained["run"]), "--input", str(ids), "train.epochs=3", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: train.epochs:"), bad.stderr


def test_predict_tta_warns_when_the_run_never_trained_on_flips(trained: dict) -> None:
    res = run_cli("predict", str(trained["run"]), "--input", str(trained["test_dir"]), "--tta",
                  "eval.tta=[hflip, vflip]", cwd=trained["root"])  # the run trained with augment.policy: none
    assert res.returncode == 0, res.stderr
    warns = [ln for ln in res.stdout.splitlines() if "[WARN]" in ln]
    assert any("never saw mirrored images during training; TTA may lower accuracy" in ln for ln in warns), warns
    assert any("upside-down" in ln and "vflip" in ln for ln in warns), warns
    quiet = run_cli("predict", str(trained["run"]), "--input", str(trained["test_dir"]), cwd=trained["root"])
    assert "[WARN]" not in quiet.stdout


@pytest.mark.parametrize("augment,views,expected", [
    ({"policy": "none"}, ["hflip", "vflip"], ["hflip", "vflip"]),
    ({"policy": "light", "hflip": 0.0}, ["hflip"], ["hflip"]),
    ({"policy": "light"}, ["hflip", "vflip"], ["vflip"]),  # default hflip 0.5, vflip 0
    ({"policy": "hard", "hflip": 0.5, "vflip": 0.5}, ["hflip", "vflip"], []),
])
def test_tta_views_the_training_never_saw(augment: dict, views: list[str], expected: list[str]) -> None:
    from vistrain.config.loader import validate
    from vistrain.engine.prediction import untrained_views

    assert untrained_views(validate({"augment": augment}), views) == expected


# ------------------------------------------------------------------------------------------- evaluate TTA

def _reference_probs(run: Path, paths: list[str], folds: list[int], views: list[str], temperature: float = 1.0
                     ) -> np.ndarray:
    """Mean over folds and views (the plain image, then each of ``views``) of softmax(logits / T), computed here
    from the checkpoints with timm and torch, not through vistrain's inference code: what TTA must give."""
    flip_dims = {"hflip": [-1], "vflip": [-2]}
    probs = []
    for fold in folds:
        ckpt = torch.load(run / "ckpt" / f"best_fold{fold}.pth", weights_only=True)
        model = timm.create_model("resnet10t", num_classes=3)
        model.load_state_dict(ckpt["model"])
        model.eval()
        pre = Preprocessor.from_dict(ckpt["preprocess"])
        x = torch.stack([pre.normalize(pre.load(p)) for p in paths])
        with torch.no_grad():
            for view in [None, *views]:
                logits = model(x if view is None else torch.flip(x, flip_dims[view]))
                probs.append(torch.softmax(logits.double() / temperature, dim=1).numpy())
    return np.mean(probs, axis=0)


def _eval_probs(run: Path, split: str) -> tuple[pd.DataFrame, np.ndarray]:
    pred = pd.read_csv(run / "eval" / split / "predictions.csv", dtype={"id": str})
    return pred, pred[[f"prob_{c}" for c in range(3)]].to_numpy()


def test_evaluate_applies_eval_tta_as_the_average_of_the_views(trained: dict) -> None:
    """The test split (fold ensemble): each eval.tta setting gives other numbers, each the mean of the views'
    probabilities over both folds (at T = 1: the 2-fold ensemble has no fitted temperature)."""
    from vistrain.engine.evaluation import run_evaluate

    run = trained["run"]
    nll = {}
    for views in ([], ["hflip"], ["vflip"], ["hflip", "vflip"]):
        metrics = run_evaluate(run, "test", overrides=[f"eval.tta=[{', '.join(views)}]"], echo=False)
        pred, probs = _eval_probs(run, "test")
        np.testing.assert_allclose(probs, _reference_probs(run, pred["path"].tolist(), [0, 1], views), atol=1e-5)
        assert metrics["tta"] == views
        nll[tuple(views)] = metrics["nll"]
    assert len(set(nll.values())) == 4, nll


def test_evaluate_val_tta_scores_each_fold_on_its_own_validation_images(trained: dict) -> None:
    from vistrain.engine.evaluation import run_evaluate

    run = trained["run"]
    plain = run_evaluate(run, "val", echo=False)
    metrics = run_evaluate(run, "val", overrides=["eval.tta=[hflip, vflip]"], echo=False)
    assert metrics["nll"] != plain["nll"]
    pred, probs = _eval_probs(run, "val")
    splits = pd.read_csv(run / "splits.csv")
    for fold in (0, 1):
        rows = pred["path"].isin(splits.loc[splits["fold"] == fold, "path"]).to_numpy()
        assert rows.sum() == 15
        # fold k's validation images at the temperature fitted on the other fold's OOF rows (T = 1 if reverted)
        cal = json.loads((run / "calibration.json").read_text())
        t = cal["cross_fit"]["temperatures"][str(fold)] if cal["applied"] else 1.0
        want = _reference_probs(run, pred["path"][rows].tolist(), [fold], ["hflip", "vflip"], t)
        np.testing.assert_allclose(probs[rows], want, atol=1e-5)
    assert plain["tta"] == [] and metrics["tta"] == ["hflip", "vflip"]


def test_evaluate_tta_true_flag_warnings_and_errors(trained: dict) -> None:
    """eval.tta=true means [hflip] (as --tta does), with predict's warning for a run trained without flips;
    false means none; a wrong value is one line listing the valid views; oof has stored logits only."""
    run, root = trained["run"], trained["root"]
    res = run_cli("evaluate", str(run), "--split", "test", "eval.tta=true", cwd=root)
    assert res.returncode == 0, res.stdout + res.stderr
    on = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert on["tta"] == ["hflip"] and on["overrides"] == {"eval.tta": ["hflip"]}
    assert any("[WARN]" in ln and "hflip" in ln and "never saw mirrored images during training" in ln
               for ln in res.stdout.splitlines()), res.stdout
    res = run_cli("evaluate", str(run), "--split", "test", "--tta", cwd=root)
    assert res.returncode == 0, res.stdout + res.stderr
    flag = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert flag["tta"] == ["hflip"] and flag["nll"] == on["nll"]
    res = run_cli("evaluate", str(run), "--split", "test", "eval.tta=off", cwd=root)
    assert res.returncode == 0, res.stdout + res.stderr
    off = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert off["tta"] == [] and off["nll"] != on["nll"] and "[WARN]" not in res.stdout
    for value in ("sideways", "[hflip, spin]"):
        bad = run_cli("evaluate", str(run), "--split", "test", f"eval.tta={value}", cwd=root)
        assert bad.returncode == 2, bad.stdout + bad.stderr
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: eval.tta"), lines
        assert "hflip" in lines[0] and "vflip" in lines[0] and "true" in lines[0], lines
    oof = run_cli("evaluate", str(run), "--split", "oof", "eval.tta=[hflip]", cwd=root)
    assert oof.returncode == 2 and "--split val" in oof.stderr, oof.stdout + oof.stderr


# ------------------------------------------------------------------------------------------- predict IDs

def test_predict_a_folder_writes_the_ids_a_sample_would(trained: dict) -> None:
    """The training CSV's IDs have no extension, so a folder's images are written without theirs: the same
    IDs as with --sample (whose IDs are written exactly as given)."""
    res = run_cli("predict", str(trained["run"]), "--input", str(trained["test_dir"]), cwd=trained["root"])
    assert res.returncode == 0, res.stderr
    sub = pd.read_csv(trained["run"] / "predictions.csv", dtype=str)
    assert sorted(sub["ID"]) == sorted(trained["ids"])
    sample = pd.read_csv(trained["root"] / "data" / "sample_submission.csv", dtype=str)
    assert set(sub["ID"]) == set(sample["ID"])


def _fake_run(tmp_path: Path, train_ids: list[str]) -> object:
    """A LoadedRun without checkpoints: enough for resolving inputs."""
    from vistrain.config.loader import validate
    from vistrain.engine.inference import LoadedRun

    run = tmp_path / "run"
    run.mkdir(parents=True)
    pd.DataFrame({"id": train_ids, "path": "x", "label": "0", "group": train_ids, "fold": 0}).to_csv(
        run / "splits.csv", index=False)
    return LoadedRun(run, validate({"data": {"image_ext": ".png"}}), ["0"], [0], None)


@pytest.mark.parametrize("train_ids,expected", [
    (["a1", "a2"], ["x", "y.v2"]),  # training IDs without extension: file names without theirs
    (["a1.jpg", "a2.jpg"], ["x.png", "y.v2.png"]),  # training IDs are file names: so are these
])
def test_folder_ids_follow_the_training_ids(tmp_path: Path, train_ids: list[str], expected: list[str]) -> None:
    from vistrain.engine.prediction import resolve_inputs

    folder = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    folder.mkdir()
    for name in ("x.png", "y.v2.png"):
        class_image(0, rng, 8).save(folder / name)
    inputs = resolve_inputs(_fake_run(tmp_path, train_ids), folder, None, None)
    assert inputs.ids == expected
    assert [Path(p).name for p in inputs.paths] == ["x.png", "y.v2.png"]
    # a CSV (or --sample) keeps its IDs exactly as written, with or without an extension
    ids = tmp_path / "ids.csv"
    pd.DataFrame({"ID": ["y.v2.png", "x"]}).to_csv(ids, index=False)
    assert resolve_inputs(_fake_run(tmp_path / "b", train_ids), ids, folder, None).ids == ["y.v2.png", "x"]


def test_folder_images_that_would_share_an_id_are_a_user_error(tmp_path: Path) -> None:
    from vistrain.engine.prediction import resolve_inputs
    from vistrain.errors import UserError

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "a.jpg", "b.png"):
        class_image(0, rng, 8).save(folder / name)
    with pytest.raises(UserError, match=r"^--input: .*a\.jpg.*a\.png.*'a'"):
        resolve_inputs(_fake_run(tmp_path, ["t1", "t2"]), folder, None, None)


# ---------------------------------------------------------------------------------------------- failures

def test_failures_list_classes_under_the_threshold_with_real_partners() -> None:
    """Class a: recall 1.0 but b's images are often called a (low precision); b: half of it called a; c: perfect."""
    from sklearn.metrics import f1_score

    from vistrain.engine.evaluation import failure_table
    from vistrain.metrics.classification import classification_report

    targets = np.array([0] * 4 + [1] * 4 + [2] * 4)
    preds = np.array([0, 0, 0, 0, 1, 1, 0, 0, 2, 2, 2, 2])
    logits = np.eye(3)[preds] * 5.0
    f1 = f1_score(targets, preds, average=None)  # a 0.8, b 0.667, c 1.0
    table = failure_table(classification_report(logits, targets, ["a", "b", "c"]), threshold=0.9)
    assert table["class"].tolist() == ["b", "a"]  # worst first; c is not a failure
    rows = {r["class"]: r for r in table.to_dict("records")}
    assert rows["a"]["f1"] == pytest.approx(f1[0]) and rows["b"]["f1"] == pytest.approx(f1[1])
    # a's images are never mistaken for anything: no partner, not "class 0, count 0"
    assert rows["a"]["most_confused_with"] == "" and rows["a"]["confused_count"] == 0
    assert rows["a"]["most_confused_from"] == "b" and rows["a"]["confused_from_count"] == 2
    assert rows["b"]["most_confused_with"] == "a" and rows["b"]["confused_count"] == 2
    assert rows["b"]["most_confused_from"] == "" and rows["b"]["confused_from_count"] == 0
    assert failure_table(classification_report(logits, targets, ["a", "b", "c"]), threshold=0.5).empty


def test_evaluate_console_prints_per_domain_metrics(trained: dict) -> None:
    res = run_cli("evaluate", str(trained["run"]), "--split", "oof", cwd=trained["root"])
    assert res.returncode == 0, res.stderr
    metrics = json.loads((trained["run"] / "eval" / "oof" / "metrics.json").read_text())
    lines = res.stdout.splitlines()
    for dom, m in metrics["per_domain"].items():
        row = next((ln.split() for ln in lines if ln.split()[:1] == [dom]), None)
        assert row is not None, res.stdout
        assert row[1] == str(m["n"]) and f"{m['top1']:.4f}" in row and f"{m['macro_f1']:.4f}" in row, row


def test_evaluate_writes_bootstrap_intervals_beside_unchanged_figures(trained: dict) -> None:
    """eval.bootstrap (default 1000): each figure gains a 95% percentile interval; figures keep their values; the
    console and the report show ``value [lo, hi]``; eval.bootstrap=0 writes none (issue 20 item 11)."""
    run, out = trained["run"], trained["run"] / "eval" / "oof"
    off = run_cli("evaluate", str(run), "--split", "oof", "eval.bootstrap=0", cwd=trained["root"])
    assert off.returncode == 0, off.stderr
    plain = json.loads((out / "metrics.json").read_text())
    assert "intervals" not in plain and "bootstrap" not in plain
    assert not any("intervals" in m for m in plain["per_domain"].values())
    assert "[" not in next(ln for ln in off.stdout.splitlines() if ln.startswith("top1 "))

    res = run_cli("evaluate", str(run), "--split", "oof", cwd=trained["root"])
    assert res.returncode == 0, res.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    skip = ("intervals", "bootstrap", "per_domain", "overrides")
    assert {k: v for k, v in metrics.items() if k not in skip} == \
        {k: v for k, v in plain.items() if k not in skip}  # the figures themselves are unchanged
    assert plain["overrides"] == {"eval.bootstrap": 0} and metrics["overrides"] == {}
    boot = metrics["bootstrap"]
    assert boot["replicates"] == 1000 and boot["level"] == 0.95 and boot["method"] == "percentile"
    iv = metrics["intervals"]
    for key in ("top1", "top5", "macro_f1", "weighted_f1", "balanced_accuracy", "nll", "ece",
                "top1@real", "macro_f1@studio"):
        lo, hi = iv[key]
        assert 0 <= lo <= hi, key
    # independent reference: a loop over the same seeded draw, scikit-learn's log loss of each resample (the NLL
    # varies between resamples even when every OOF prediction is right, as on this easy data)
    logits, targets = np.load(run / "oof" / "oof_logits.npy"), np.load(run / "oof" / "oof_targets.npy")
    cal = metrics["calibration"]  # evaluate's own temperatures: none, one, or one per fold fitted without it
    if cal["temperature"] == "cross-fitted":
        folds = pd.read_csv(run / "splits.csv")["fold"].to_numpy()
        temps = np.array([cal["temperatures"][str(f)] for f in folds])[:, None]
    else:
        temps = cal["temperature"] or 1.0
    probs = torch.softmax(torch.from_numpy(logits / temps).double(), 1).numpy()
    draw = np.random.default_rng(boot["seed"]).integers(0, len(targets), size=(1000, len(targets)))
    reps = [log_loss(targets[r], probs[r], labels=range(probs.shape[1])) for r in draw]
    assert iv["nll"] == pytest.approx(list(np.percentile(reps, [2.5, 97.5])), rel=1e-6)
    assert iv["nll"][0] <= metrics["nll"] <= iv["nll"][1] and iv["nll"][0] < iv["nll"][1]
    assert iv["top1"][0] <= metrics["top1"] <= iv["top1"][1]
    for dom, block in metrics["per_domain"].items():
        assert block["intervals"]["top1"] == iv[f"top1@{dom}"] and block["top1"] == metrics[f"top1@{dom}"]
        assert block["intervals"]["nll"] != iv["nll"]  # a domain resamples its own, fewer images
    lo, hi = iv["macro_f1"]
    assert f"{metrics['macro_f1']:.4f} [{lo:.4f}, {hi:.4f}]" in res.stdout
    report = run_cli("report", str(run), cwd=trained["root"])
    assert report.returncode == 0, report.stderr
    page = (run / "report.html").read_text()
    assert f"{metrics['top1']:.4f} [{iv['top1'][0]:.4f}, {iv['top1'][1]:.4f}]" in page
    real = metrics["per_domain"]["real"]
    assert f"{real['top1']:.4f} [{real['intervals']['top1'][0]:.4f}, {real['intervals']['top1'][1]:.4f}]" in page


def test_compare_a_trained_run_with_a_copy_of_itself(trained: dict, tmp_path: Path) -> None:
    """compare on a real run's files: its OOF logits, splits.csv folds and metrics.jsonl; a copy of the run with
    another learning rate in config.yaml scores the same images identically (differences 0, p = 1)."""
    import shutil

    import yaml
    from sklearn.metrics import accuracy_score

    copy = tmp_path / "copy"
    # no eval/test in the copy: compare defaults to oof
    shutil.copytree(trained["run"], copy, ignore=shutil.ignore_patterns("eval", "*.pt", "*.pth"))
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["train"]["lr"] = cfg["train"]["lr"] * 2
    write_yaml(copy / "config.yaml", cfg)
    res = run_cli("compare", str(trained["run"]), str(copy), "--output", str(tmp_path / "cmp"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "oof: no eval/test/predictions.csv" in res.stdout
    out = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    oof = trained["run"] / "oof"
    logits, targets = np.load(oof / "oof_logits.npy"), np.load(oof / "oof_targets.npy")
    assert out["runs"][0]["metrics"]["top1"]["value"] == pytest.approx(accuracy_score(targets, logits.argmax(1)))
    diff = out["differences"][0]
    assert all(m["value"] == 0 and m["interval"] == [0, 0] and m["p_value"] == 1 for m in diff["metrics"].values())
    assert diff["mcnemar_top1"]["p_value"] == 1.0
    assert sorted(r["fold"] for r in out["fold_differences"][0]["folds"]) == [0, 1]
    assert list(out["config_differences"]) == ["train.lr"]
    assert (tmp_path / "cmp" / "curves.png").stat().st_size > 1000
