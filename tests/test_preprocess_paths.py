"""One preprocessing on every path: the same image files (JPEG, PNG with alpha, 16-bit PNG, EXIF-rotated JPEG, odd
sizes) give the same tensor through the training run's validation loader, and the same answers through ``predict``,
the exported ONNX file fed from ``preprocess.json`` alone, and ``serve`` (the run and the ONNX file). A run keeps its
preprocessing: ``evaluate`` / ``predict`` read it from the run, not from timm's defaults or an edited config.yaml."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_same_probabilities, class_image, tiny_config, write_csv_dataset, write_yaml
from PIL import Image

from vistrain import cli
from vistrain.config import load_config
from vistrain.data.images import load_rgb
from vistrain.data.preprocess import Preprocessor
from vistrain.engine.training import run_train

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from vistrain.serving.app import create_app, load_predictor  # noqa: E402

PREPROCESS = {"crop": "center_square", "clahe": {"enabled": True, "clip_limit": 3.0, "grid": 4}}


def odd_files(folder: Path) -> list[Path]:
    """One file of each kind a user uploads, at odd, non-square sizes (so the centre crop matters)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    rgb = np.asarray(class_image(0, rng, 64))
    jpeg = folder / "photo.jpg"
    Image.fromarray(rgb[:45, :61]).save(jpeg, quality=92)
    rgba = np.dstack([np.asarray(class_image(1, rng, 64))[:37, :53], np.linspace(40, 255, 53, dtype=np.uint8)[None]
                      .repeat(37, 0)])
    png_alpha = folder / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(png_alpha)
    grey16 = (np.asarray(class_image(2, rng, 64).convert("L"))[:29, :41].astype(np.uint16) * 200)
    png16 = folder / "deep.png"
    Image.fromarray(grey16).save(png16)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated = folder / "rotated.jpg"
    Image.fromarray(np.asarray(class_image(1, rng, 64))[:30, :52]).save(rotated, quality=92, exif=exif)
    return [jpeg, png_alpha, png16, rotated]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A one-fold, one-epoch run with centre crop + CLAHE, exported to ONNX, and ``predict --probs`` on the files."""
    root = tmp_path_factory.mktemp("prepaths")
    data = write_csv_dataset(root / "data", per_class=6)
    cfg = tiny_config(data.root, train={"epochs": 1}, preprocess=PREPROCESS,
                      output={"exp_dir": str(root / "exp"), "logs_dir": None}, tracking={"tensorboard": False})
    cfg_path = write_yaml(root / "cfg.yaml", cfg)
    run = run_train(load_config(cfg_path)).run_dir
    files = odd_files(root / "odd")
    csv = root / "q.csv"
    pd.DataFrame({"ID": [f.name for f in files]}).to_csv(csv, index=False)
    assert cli.main(["export", str(run)]) == 0
    out = root / "pred.csv"
    assert cli.main(["predict", str(run), "--input", str(csv), "--image-dir", str(root / "odd"), "--probs",
                     "--output", str(out)]) == 0
    return {"root": root, "run": run, "cfg": cfg_path, "files": files, "csv": csv, "pred": _read_pred(out)}


def _read_pred(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"ID": str, "target": str})


def _probs(pred: pd.DataFrame) -> np.ndarray:
    return pred[[c for c in pred.columns if c.startswith("prob_")]].to_numpy(dtype=np.float64)


def run_preprocessor(run: Path) -> Preprocessor:
    return Preprocessor.from_dict(json.loads((run / "preprocess.json").read_text()))


def test_the_files_are_what_they_claim(paths: dict) -> None:
    jpeg, alpha, deep, rotated = paths["files"]
    with Image.open(alpha) as a, Image.open(deep) as d, Image.open(rotated) as r:
        assert a.mode == "RGBA" and d.mode == "I;16" and r.getexif()[0x0112] == 6 and r.size == (52, 30)
    assert load_rgb(rotated).size == (30, 52)  # the orientation is applied when decoded


def test_run_records_its_preprocessing(paths: dict) -> None:
    run = paths["run"]
    spec = json.loads((run / "preprocess.json").read_text())
    pre = Preprocessor.from_dict(spec)
    assert (pre.size, pre.crop, pre.interpolation, pre.clahe, pre.clip_limit, pre.grid) == \
        ((32, 32), "center_square", "bilinear", True, 3.0, 4)
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406)) and pre.std == pytest.approx((0.229, 0.224, 0.225))
    ckpt = torch.load(run / "ckpt" / "best_fold0.pth", map_location="cpu", weights_only=False)
    assert ckpt["preprocess"] == spec
    log = (run / "train.log").read_text()
    line = next(ln for ln in log.splitlines() if "[MODEL] fold=0" in ln)
    assert f"preprocess={spec['hash']}" in line and "crop=center_square" in line and "clahe=3.0/4" in line, line


def test_validation_loader_gives_exactly_the_preprocessors_tensor(paths: dict) -> None:
    """The training run's own validation dataset (its decode and transform) on each file, against
    ``Preprocessor.from_dict(preprocess.json).process(load_rgb(file))``; and the training transform with the
    ``none`` policy adds nothing to the deterministic steps."""
    from vistrain.data.prepare import prepare_data
    from vistrain.engine.setup import SETUPS

    cfg = load_config(paths["cfg"])
    setup = SETUPS["classification"](cfg, prepare_data(cfg), 0, torch.device("cpu"))
    pre = run_preprocessor(paths["run"])
    for ds in (setup.valid_loader.dataset, setup.train_loader.dataset):
        probe = type(ds)([str(f) for f in paths["files"]], None, ds.transform, ds.decode)
        for i, f in enumerate(paths["files"]):
            tensor, label, index = probe[i]
            want = pre.process(np.asarray(load_rgb(f)))
            assert (label, index) == (-1, i)
            assert tensor.dtype == torch.float32 and tensor.shape == (3, 32, 32)
            assert torch.max(torch.abs(tensor - want)).item() <= 1e-6, f


def test_predict_equals_the_onnx_file_fed_from_preprocess_json_alone(paths: dict) -> None:
    import onnx

    export = paths["run"] / "export"
    spec = json.loads((export / "preprocess.json").read_text())
    assert spec == json.loads((paths["run"] / "preprocess.json").read_text())
    model = onnx.load(str(export / "model_fold0.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["vistrain.preprocess"]) == spec
    assert json.loads(meta["vistrain.img_size"]) == spec["resize"]["size"]
    assert json.loads(meta["vistrain.mean"]) == spec["normalize"]["mean"]
    pre = Preprocessor.from_dict(spec)
    batch = np.stack([pre.process(np.asarray(load_rgb(f))).numpy() for f in paths["files"]])
    session = ort.InferenceSession(str(export / "model_fold0.onnx"), providers=["CPUExecutionProvider"])
    _, probs = session.run(None, {"image": batch})
    pred = paths["pred"]
    assert pred["ID"].tolist() == [f.name for f in paths["files"]]
    assert_same_probabilities(probs, _probs(pred), atol=1e-4, what="ONNX from preprocess.json vs predict")


@pytest.mark.parametrize("target", ["run", "onnx"])
def test_serve_answers_as_predict_for_the_uploaded_bytes(paths: dict, target: str) -> None:
    path = paths["run"] if target == "run" else paths["run"] / "export" / "model_fold0.onnx"
    predictor = load_predictor(path)
    assert predictor.preprocessor == run_preprocessor(paths["run"])
    client = TestClient(create_app(predictor))
    assert client.get("/metadata").json()["preprocess"] == predictor.preprocessor.to_dict()
    files = [("files", (f.name, f.read_bytes(), "application/octet-stream")) for f in paths["files"]]
    answer = client.post("/predict", files=files)
    assert answer.status_code == 200, answer.text
    pred = paths["pred"]
    classes = [c.removeprefix("prob_") for c in pred.columns if c.startswith("prob_")]
    got = answer.json()["results"]
    assert [r["file"] for r in got] == pred["ID"].tolist()
    served = np.array([[{t["class"]: t["prob"] for t in r["top"]}[c] for c in classes] for r in got])
    assert_same_probabilities(served, _probs(pred), atol=1e-4, what=f"serve ({target}) vs predict")


def test_a_run_keeps_its_preprocessing_whatever_timm_or_config_yaml_say(paths: dict, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """predict and evaluate of a copy of the run whose config.yaml now says no crop, no CLAHE and other mean / std,
    with timm's defaults changed too, answer exactly as the original run."""
    import yaml

    from vistrain.data import preprocess

    copy = tmp_path / paths["run"].name
    shutil.copytree(paths["run"], copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["preprocess"] = {"crop": "none", "resize": {"interpolation": "nearest"}, "clahe": {"enabled": False},
                         "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(preprocess, "model_normalisation", lambda name: ((0.1, 0.2, 0.3), (0.9, 0.8, 0.7)))
    out = tmp_path / "pred.csv"
    assert cli.main(["predict", str(copy), "--input", str(paths["csv"]), "--image-dir", str(paths["root"] / "odd"),
                     "--probs", "--output", str(out)]) == 0
    assert np.array_equal(_probs(_read_pred(out)), _probs(paths["pred"]))
    for run in (paths["run"], copy):
        assert cli.main(["evaluate", str(run), "--split", "val"]) == 0
    original, edited = (json.loads((r / "eval" / "val" / "metrics.json").read_text())
                        for r in (paths["run"], copy))
    assert edited["nll"] == original["nll"] and edited["top1"] == original["top1"]


def test_other_preprocess_settings_give_a_run_another_hash(paths: dict, tmp_path: Path) -> None:
    cfg = yaml_config(paths["cfg"])
    cfg["preprocess"] = {**PREPROCESS, "clahe": {**PREPROCESS["clahe"], "clip_limit": 2.5}}
    cfg["output"]["exp_dir"] = str(tmp_path / "exp")
    cfg["train"]["epochs"] = 1
    run = run_train(load_config(write_yaml(tmp_path / "cfg.yaml", cfg))).run_dir
    first, second = (json.loads((r / "preprocess.json").read_text()) for r in (paths["run"], run))
    assert second["clahe"]["clip_limit"] == 2.5 and second["hash"] != first["hash"]


def yaml_config(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_a_checkpoint_from_before_preprocess_keeps_its_resize_and_normalisation(paths: dict, tmp_path: Path) -> None:
    from vistrain.engine.inference import load_fold_model, load_run
    from vistrain.errors import UserError

    copy = tmp_path / "old"
    shutil.copytree(paths["run"], copy)
    path = copy / "ckpt" / "best_fold0.pth"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    spec = ckpt.pop("preprocess")
    ckpt["data_config"] = {"img_size": [32, 32], "mean": spec["normalize"]["mean"], "std": spec["normalize"]["std"],
                           "interpolation": "bicubic"}
    torch.save(ckpt, path)
    _, pre = load_fold_model(load_run(copy), 0, torch.device("cpu"))
    assert pre == Preprocessor(size=(32, 32), crop="none", interpolation="bilinear", clahe=False,
                               mean=tuple(spec["normalize"]["mean"]), std=tuple(spec["normalize"]["std"]))
    ckpt["preprocess"] = {**spec, "crop": "circle"}
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"best_fold0.pth: no usable preprocessing in the checkpoint .*hash"):
        load_fold_model(load_run(copy), 0, torch.device("cpu"))


def large_photo(path: Path, size: tuple[int, int] = (6000, 4500), seed: int = 21, orientation: int = 1) -> Path:
    """A phone-sized JPEG with detail finer than the model's input: a smooth colour field, a fine grating (period
    under 3 pixels, which a resize without anti-aliasing folds into coarse stripes) and sensor noise."""
    import cv2

    w, h = size
    rng = np.random.default_rng(seed)
    field = cv2.resize(rng.uniform(40, 215, (6, 8, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    x = np.arange(w, dtype=np.float32)[None, :] + 0.37 * np.arange(h, dtype=np.float32)[:, None]
    grating = 45 * np.sin(2 * np.pi * x / 2.7)
    img = field + grating[..., None] + rng.normal(0, 6, (h, w, 1)).astype(np.float32)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90, exif=exif)
    return path


@pytest.fixture(scope="module")
def large(paths: dict) -> dict:
    """Phone photos over serve.max_pixels' 24 M pixels (6000 x 4500, and a portrait one stored on its side with an
    EXIF rotation), one under it (4000 x 3000), and ``predict --probs`` on them."""
    folder = paths["root"] / "large"
    folder.mkdir(exist_ok=True)
    photos = [large_photo(folder / "phone.jpg"), large_photo(folder / "portrait.jpg", seed=3, orientation=6),
              large_photo(folder / "small.jpg", (4000, 3000), seed=8)]
    csv, out = paths["root"] / "large.csv", paths["root"] / "large_pred.csv"
    pd.DataFrame({"ID": [p.name for p in photos]}).to_csv(csv, index=False)
    assert cli.main(["predict", str(paths["run"]), "--input", str(csv), "--image-dir", str(folder), "--probs",
                     "--output", str(out)]) == 0
    return {"photo": photos[0], "photos": photos, "pred": _read_pred(out)}


def test_serve_answers_as_predict_for_photos_over_the_decode_budget(paths: dict, large: dict) -> None:
    """The decode budget (serve.max_pixels, 24 M) never changes the pixels: serve's tensor for each photo is
    predict's, and so are its probabilities."""
    from vistrain.serving.app import Limits, decode_upload

    predictor = load_predictor(paths["run"])
    pre, limits = run_preprocessor(paths["run"]), Limits()
    assert 6000 * 4500 > limits.max_pixels
    for photo in large["photos"]:
        served = predictor.preprocess(decode_upload(photo.name, photo.read_bytes(), limits, predictor.preprocessor))
        assert torch.max(torch.abs(served - pre.normalize(pre.load(photo)))).item() <= 1e-6, photo.name
    answer = TestClient(create_app(predictor)).post("/predict", files=[
        ("files", (p.name, p.read_bytes(), "image/jpeg")) for p in large["photos"]])
    assert answer.status_code == 200, answer.text
    pred = large["pred"]
    assert pred["ID"].tolist() == [p.name for p in large["photos"]]
    classes = [c.removeprefix("prob_") for c in pred.columns if c.startswith("prob_")]
    served = np.array([[{t["class"]: t["prob"] for t in r["top"]}[c] for c in classes]
                       for r in answer.json()["results"]])
    assert_same_probabilities(served, _probs(pred), atol=1e-5, what="serve vs predict, photos over serve.max_pixels")


def test_a_large_photo_is_shrunk_with_anti_aliasing(paths: dict, large: dict) -> None:
    """Every path's decode of the photo (a reduced JPEG decode, then an area resize) is within a few grey levels of
    the exact area average of the full-size photo; the fine grating does not fold into stripes. A plain bilinear
    resize of the full decode (what predict did before) is far off."""
    import cv2

    pre = run_preprocessor(paths["run"])
    full = np.asarray(load_rgb(large["photo"]))
    side = min(full.shape[:2])
    top, left = (full.shape[0] - side) // 2, (full.shape[1] - side) // 2
    square = np.ascontiguousarray(full[top:top + side, left:left + side])
    exact = cv2.resize(square, pre.size[::-1], interpolation=cv2.INTER_AREA).astype(np.float32)
    bilinear = cv2.resize(square, pre.size[::-1], interpolation=cv2.INTER_LINEAR).astype(np.float32)
    ours = Preprocessor(pre.size, crop="center_square", mean=pre.mean, std=pre.std).load(large["photo"])
    ours = ours.astype(np.float32)
    assert np.abs(ours - exact).mean() < 2.0 and np.abs(ours - exact).max() < 12, \
        (np.abs(ours - exact).mean(), np.abs(ours - exact).max())
    assert np.abs(bilinear - exact).mean() > 10  # the defect this rule removes: aliasing, tens of grey levels
