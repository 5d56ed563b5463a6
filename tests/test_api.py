"""The Python API as a notebook calls it: ``vistrain.train(...)`` returns a ``Run``, whose methods answer as the
commands do (``Run.predict`` = ``vistrain predict``, also for PIL images and numpy arrays), ``vistrain.load_config``
raises ``ConfigError`` with every problem, and an embedding run embeds and searches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_same_probabilities, tiny_config, write_csv_dataset, write_yaml
from PIL import Image

import vistrain
from vistrain import cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``vistrain.train`` on a config file with a dict of overrides, as a notebook would."""
    root = tmp_path_factory.mktemp("api")
    data = write_csv_dataset(root / "data", per_class=8)
    cfg = write_yaml(root / "cfg.yaml", tiny_config(data.root, output={"exp_dir": str(root / "exp"),
                                                                       "logs_dir": None},
                                                    tracking={"tensorboard": False}))
    run = vistrain.train(cfg, overrides={"train.epochs": 1, "data.valid_fold": "all"}, progress=False)
    files = sorted((data.root / "train").glob("*.png"))[:6]
    return {"root": root, "data": data.root, "cfg": cfg, "run": run, "files": files}


def test_train_returns_the_run_with_its_files_as_python_objects(trained: dict) -> None:
    run = trained["run"]
    assert isinstance(run, vistrain.Run) and run.status == "success"
    assert run.config.train.epochs == 1  # the override, recorded in config.yaml
    assert run.classes == ["0", "1", "2"]
    assert set(run.summary["mean"]) >= {"macro_f1", "accuracy"}
    metrics = run.metrics
    assert isinstance(metrics, pd.DataFrame) and {"fold", "epoch", "train_loss"} <= set(metrics.columns)
    assert sorted(metrics["fold"].unique()) == [0, 1]  # data.valid_fold: all
    assert vistrain.Run(str(run.path)).path == run.path


def test_run_predict_answers_as_the_predict_command_for_files_pil_images_and_arrays(trained: dict) -> None:
    run, files = trained["run"], trained["files"]
    csv = trained["root"] / "q.csv"
    pd.DataFrame({"ID": [f.name for f in files]}).to_csv(csv, index=False)
    out = trained["root"] / "pred.csv"
    assert cli.main(["predict", str(run.path), "--input", str(csv), "--image-dir", str(files[0].parent), "--probs",
                     "--output", str(out)]) == 0
    want = pd.read_csv(out, dtype={"ID": str, "target": str})
    prob_cols = [f"prob_{c}" for c in run.classes]

    by_path = run.predict([str(f) for f in files], top_k=2)
    assert by_path["input"].tolist() == [str(f) for f in files]
    assert by_path["target"].tolist() == want["target"].tolist()
    assert_same_probabilities(by_path[prob_cols].to_numpy(), want[prob_cols].to_numpy(), atol=1e-6,
                              what="Run.predict(paths) vs vistrain predict")
    pil = run.predict([Image.open(f) for f in files])
    arrays = run.predict([np.asarray(Image.open(f).convert("RGB")) for f in files])
    for table in (pil, arrays):
        assert table["input"].tolist() == [f"#{i}" for i in range(len(files))]
        assert_same_probabilities(table[prob_cols].to_numpy(), want[prob_cols].to_numpy(), atol=1e-6,
                                  what="Run.predict(images in memory) vs vistrain predict")
    row = by_path.iloc[0]
    assert len(row["top_classes"]) == 2 and row["top_classes"][0] == row["target"]
    assert row["top_probs"][0] == pytest.approx(row["confidence"]) and row["top_probs"][0] >= row["top_probs"][1]
    folder = run.predict(files[0].parent)  # a folder: every image in it, sorted by name
    assert len(folder) == len(list(files[0].parent.glob("*.png")))
    frame = run.predict(pd.DataFrame({"ID": [f.stem for f in files]}), image_dir=files[0].parent)
    assert frame["target"].tolist() == want["target"].tolist()


def test_run_predict_names_a_bad_input_in_one_line(trained: dict) -> None:
    run = trained["run"]
    with pytest.raises(vistrain.UserError, match=r"inputs\[1\]: a dict; valid: a file path, a PIL image"):
        run.predict([str(trained["files"][0]), {"not": "an image"}])
    with pytest.raises(vistrain.UserError, match=r"inputs\[0\]: file not found"):
        run.predict(["nowhere.png"])
    with pytest.raises(vistrain.UserError, match="is not a vistrain run directory"):
        vistrain.Run(trained["root"])
    with pytest.raises(vistrain.UserError, match="embed needs task: embedding"):
        run.embed([str(trained["files"][0])])


def test_the_model_and_its_preprocessor_give_predicts_logits(trained: dict) -> None:
    run = trained["run"]
    model = run.model(fold=0)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model.preprocessor == run.preprocessor
    rgb = np.asarray(Image.open(trained["files"][0]).convert("RGB"))
    with torch.no_grad():
        probs = torch.softmax(model(model.preprocessor(rgb)[None]), dim=1).numpy()
    one_fold = run.predict([rgb], folds=[0])
    assert np.allclose(probs[0], one_fold[[f"prob_{c}" for c in run.classes]].to_numpy()[0], atol=1e-6)


def test_evaluate_calibrate_export_and_report(trained: dict) -> None:
    run = trained["run"]
    metrics = run.evaluate("val")
    assert metrics == json.loads((run.path / "eval" / "val" / "metrics.json").read_text())
    assert 0 <= metrics["macro_f1"] <= 1
    oof = run.evaluate("oof", eval__bootstrap=0)  # an evaluation option as a keyword
    assert oof["overrides"] == {"eval.bootstrap": 0} and "intervals" not in oof
    calibration = run.calibrate()
    assert calibration == json.loads((run.path / "calibration.json").read_text())
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    folder = run.export(folds=[0])
    assert folder == run.path / "export" and (folder / "model_fold0.onnx").is_file()
    assert json.loads((folder / "export.json").read_text())["models"][0]["fold"] == 0
    assert run.report() == run.path / "report.html" and run.report().is_file()


def test_load_config_takes_a_dict_and_lists_every_problem(trained: dict) -> None:
    raw = tiny_config(trained["data"])
    cfg = vistrain.load_config(raw, {"train.lr": 1e-3, "augment.policy": "hard"})
    assert cfg.train.lr == 1e-3 and cfg.augment.policy == "hard"
    assert vistrain.load_config(cfg, ["train.epochs=3"]).train.epochs == 3  # a Config, overrides on top
    with pytest.raises(vistrain.ConfigError) as err:
        vistrain.load_config(raw, {"train.lr": -1, "augment.policy": "extreme"})
    assert len(err.value.problems) == 2
    assert {p.split(":")[0] for p in err.value.problems} == {"train.lr", "augment.policy"}


def test_train_refuses_what_the_command_refuses(trained: dict, tmp_path: Path) -> None:
    with pytest.raises(vistrain.UserError, match="--resume: .* is not a vistrain run directory"):
        vistrain.train(resume=tmp_path)
    with pytest.raises(vistrain.UserError, match="--config: required"):
        vistrain.train()


def test_an_embedding_run_embeds_and_searches(tmp_path: Path) -> None:
    from test_embedding_e2e import _retrieval_config, write_products

    root = write_products(tmp_path / "products", classes=3, objects=4)
    cfg = _retrieval_config(tmp_path, root)
    cfg["model"].update(name="resnet10t", pretrained=False, embedding_dim=16)
    cfg["sampler"].update(p=3, k=2)
    cfg["train"].update(img_size=32, epochs=1, warmup_epochs=0, num_workers=0, device="cpu", log_interval=0,
                        channels_last=False, freeze_backbone_epochs=0)
    cfg["augment"]["policy"] = "none"
    cfg["tracking"]["tensorboard"] = False
    run = vistrain.train(cfg, progress=False)  # a dict config
    images = sorted(root.rglob("*.jpg"))[:3]
    feats = run.embed([str(p) for p in images])
    assert feats.shape == (3, 16) and np.allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5)
    in_memory = run.embed([Image.open(p) for p in images])
    assert np.allclose(in_memory, feats, atol=1e-5)
    table = run.search(images[0], root, top_k=4)
    assert len(table) == 4 and table["similarity"].is_monotonic_decreasing
    assert Path(table["path"].iloc[0]) == images[0]  # the query itself is in the gallery: nearest


def test_tune_returns_the_study_and_the_run_of_its_best_values(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    data = write_csv_dataset(tmp_path / "data", per_class=6)
    raw = tiny_config(data.root, output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None},
                      tracking={"tensorboard": False},
                      tune={"epochs": 1, "space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2,
                                                                "log": True}}})
    study = vistrain.tune(raw, n_trials=2, overrides={"train.epochs": 1}, auto_continue=True)
    assert isinstance(study, vistrain.Study) and study.counts.get("COMPLETE", 0) >= 1
    assert set(study.best_params) == {"train.lr"} and study.monitor == "macro_f1" and study.direction == "maximize"
    assert study.study.best_trial.number == study.best_trial  # the optuna.Study itself
    assert len(study.trials()) == 2
    assert study.run is not None and study.run.status == "success"
    assert study.run.config.train.lr == pytest.approx(study.best_params["train.lr"])


def test_the_commands_without_a_run_are_functions_too(trained: dict, tmp_path: Path) -> None:
    from vistrain import api

    cfg = trained["cfg"]
    table = api.split(cfg, tmp_path / "splits.csv")
    assert (tmp_path / "splits.csv").is_file() and set(table["fold"]) == {0, 1}
    manifest = api.manifest(cfg, tmp_path / "manifest.json")
    assert manifest == json.loads((tmp_path / "manifest.json").read_text()) and manifest["num_classes"] == 3
    doctor = api.doctor(cfg)
    assert doctor["device"] == "cpu" and "num_workers" in doctor
    starter = api.init("embedding", tmp_path / "mine.yaml")
    assert starter.read_text().startswith(f"# vistrain train --config {starter}")
    with pytest.raises(vistrain.UserError, match="exists; pass --force"):
        api.init("embedding", starter)
    pytest.importorskip("cleanlab")
    audit = trained["run"].audit(output=tmp_path / "audit")
    assert audit.folder == tmp_path / "audit" and audit.summary == json.loads((audit.folder / "audit.json").read_text())
    issues = audit.table("label_issues")
    assert {"id", "given_label", "suggested_label", "score"} <= set(issues.columns)
    assert len(issues) == audit.summary["label_issues"]["count"]
