"""vistrain serve: the HTTP answers equal ``vistrain predict``'s, for a run and for its exported ONNX file; bad
uploads are refused with the file's name and nothing is predicted."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import assert_same_probabilities, run_cli, tiny_config, write_csv_dataset, write_yaml

from vistrain.config import load_config
from vistrain.data.preprocess import Preprocessor
from vistrain.engine.training import run_train
from vistrain.errors import UserError

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from vistrain.config.schema import ServeCfg  # noqa: E402
from vistrain.serving.app import Limits, create_app, load_predictor  # noqa: E402


def odd_images(folder: Path, like: Path) -> list[Path]:
    """An RGBA PNG (the content in the alpha channel) and a 16-bit grey PNG: decoded differently by a plain
    ``convert("RGB")`` than by vistrain's loader."""
    from PIL import Image

    with Image.open(like) as img:
        grey = np.asarray(img.convert("L"))
    rgba = np.zeros((*grey.shape, 4), np.uint8)
    rgba[..., 3] = 255 - grey
    Image.fromarray(rgba, "RGBA").save(folder / "odd_rgba.png")
    Image.fromarray(grey.astype(np.uint16) * 16).save(folder / "odd_16bit.png")  # mode I;16
    return [folder / "odd_rgba.png", folder / "odd_16bit.png"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A one-epoch, two-fold classification run; predict's answers for 7 images (the fold ensemble, and fold 0)."""
    root = tmp_path_factory.mktemp("serve")
    data = write_csv_dataset(root / "data", per_class=8)
    cfg = tiny_config(data.root, data={"valid_fold": "all"}, train={"epochs": 1},
                      output={"exp_dir": str(root / "exp"), "logs_dir": None}, tracking={"tensorboard": False},
                      serve={"min_resolution": 64, "max_files": 16})
    run = run_train(load_config(write_yaml(root / "cfg.yaml", cfg))).run_dir
    files = sorted(data.image_dir.glob("*.png"))[::5][:5]
    files += odd_images(data.image_dir, files[0])
    pd.DataFrame({"ID": [f.stem for f in files]}).to_csv(root / "q.csv", index=False)
    pred = {}
    for name, folds in (("all", "all"), ("fold0", "0")):
        res = run_cli("predict", str(run), "--input", str(root / "q.csv"), "--image-dir", str(data.image_dir),
                      "--probs", "--folds", folds, "--output", str(root / f"pred_{name}.csv"), cwd=root)
        assert res.returncode == 0, res.stderr
        pred[name] = pd.read_csv(root / f"pred_{name}.csv", dtype={"target": str})
    return {"run": run, "root": root, "files": files, "pred": pred}


def upload(files: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f.name, f.read_bytes(), "image/png")) for f in files]


def check_answers(answer: dict, served: dict, folds: str) -> None:
    """The served answers equal ``predict --probs --folds FOLDS`` for every file, the odd ones included: every
    class's probability, by name (each answer's class is its own most probable one)."""
    pred = served["pred"][folds]
    assert answer["task"] == "classification"
    got = answer["results"]
    assert [r["file"] for r in got] == [f.name for f in served["files"]]
    columns = [c for c in pred.columns if c.startswith("prob_")]  # predict --probs: prob_<class>
    rows = []
    for r in got:
        probs = {t["class"]: t["prob"] for t in r["top"]}
        assert len(probs) == 3 and r["prob"] == probs[r["class"]] == max(probs.values())
        rows.append([probs[c.removeprefix("prob_")] for c in columns])
    assert_same_probabilities(rows, pred[columns], atol=1e-4, what=f"serve vs predict --folds {folds}")


def test_run_is_served_with_predicts_answers(served: dict) -> None:
    client = TestClient(create_app(load_predictor(served["run"])))
    health = client.get("/health").json()
    assert health == {"status": "ok", "task": "classification", "model": "resnet10t", "backend": "torch",
                      "classes": 3}
    assert client.get("/metadata").json()["img_size"] == [32, 32]
    res = client.post("/predict", files=upload(served["files"]))
    assert res.status_code == 200, res.text
    check_answers(res.json(), served, "all")  # both folds averaged, as predict does by default
    one = TestClient(create_app(load_predictor(served["run"], fold=0)))
    check_answers(one.post("/predict", files=upload(served["files"])).json(), served, "fold0")


@pytest.fixture(scope="module")
def exported(served: dict) -> Path:
    """Fold 0 of the served run exported once, for every test that needs an ONNX file."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = served["root"] / "onnx"
    res = run_cli("export", str(served["run"]), "--folds", "0", "--output", str(out), cwd=served["root"])
    assert res.returncode == 0, res.stderr
    return out / "model_fold0.onnx"


def test_exported_onnx_file_is_served_with_the_same_answers(served: dict, exported: Path) -> None:
    client = TestClient(create_app(load_predictor(exported)))
    assert client.get("/health").json()["backend"] == "onnxruntime"
    res = client.post("/predict", files=upload(served["files"]))
    assert res.status_code == 200, res.text
    check_answers(res.json(), served, "fold0")


def rewritten(src: Path, dst: Path, input_name: str = "image", **changes: str | None) -> Path:
    """A copy of ``src`` with ``vistrain.<key>`` metadata replaced (None: removed) and its input renamed."""
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    for key, value in changes.items():
        props.pop(f"vistrain.{key}") if value is None else props.__setitem__(f"vistrain.{key}", value)
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    if input_name != "image":
        model.graph.input[0].name = input_name
        for node in model.graph.node:
            node.input[:] = [input_name if i == "image" else i for i in node.input]
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("changes, key, why", [
    ({"img_size": "abc"}, "vistrain.img_size", "not JSON"),
    ({"img_size": "[32]"}, "vistrain.img_size", "two positive integers"),
    ({"img_size": "[0, 32]"}, "vistrain.img_size", "two positive integers"),
    ({"img_size": "[32.5, 32]"}, "vistrain.img_size", "two positive integers"),
    ({"img_size": "[64, 64]"}, "vistrain.img_size", "the graph's input 'image' is 32x32"),
    ({"mean": "[0.5, 0.5]"}, "vistrain.mean", "three finite numbers"),
    ({"mean": '[0.5, "x", 0.5]'}, "vistrain.mean", "three finite numbers"),
    ({"std": "[0.2, 0, 0.2]"}, "vistrain.std", "three finite numbers above 0"),
    ({"std": "[0.2, NaN, 0.2]"}, "vistrain.std", "three finite numbers above 0"),
    ({"classes": '["0", "1"]'}, "vistrain.classes", "the graph's probs output has 3"),
    ({"classes": "[0, 1, 2]"}, "vistrain.classes", "a list of strings"),
    ({"classes": '{"0": "a"}'}, "vistrain.classes", "a list of strings"),
    ({"task": "detection"}, "vistrain.task", "classification, embedding"),
    ({"task": "embedding"}, "vistrain.task", "output 'embedding'"),
    ({"temperature": "0"}, "vistrain.temperature", "a finite number above 0"),
    ({"temperature": '"hot"'}, "vistrain.temperature", "a finite number above 0"),
    ({"img_size": None}, "vistrain.img_size", "export it with vistrain export"),
    ({"serve": "abc"}, "vistrain.serve", "not JSON"),
    ({"serve": '{"top_k": 0}'}, "vistrain.serve", "serve.top_k: Input should be greater than 0"),
    ({"serve": '{"formats": ["JPG"]}'}, "vistrain.serve", "serve.formats: 'JPG' is not an image format"),
    ({"preprocess": "{crop"}, "vistrain.preprocess", "not JSON; valid: the run's preprocess.json"),
    ({"preprocess": "[1, 2]"}, "vistrain.preprocess", "not a vistrain preprocessing description"),
    ({"preprocess": json.dumps({**Preprocessor(size=(32, 32)).to_dict(), "crop": "circle"})}, "vistrain.preprocess",
     "the hash does not match"),
    ({"preprocess": json.dumps(Preprocessor(size=(48, 48)).to_dict())}, "vistrain.preprocess",
     "it says [48, 48], vistrain.img_size says [32, 32]"),
    ({"mean": "[0.5, 0.5, 0.5]"}, "vistrain.preprocess", "vistrain.mean says [0.5, 0.5, 0.5]"),
])
def test_bad_onnx_metadata_is_a_user_error_naming_the_file_and_key(exported: Path, tmp_path: Path, changes: dict,
                                                                   key: str, why: str) -> None:
    bad = rewritten(exported, tmp_path / "bad.onnx", **changes)
    with pytest.raises(UserError) as excinfo:
        load_predictor(bad)
    msg = str(excinfo.value)
    assert len(msg.splitlines()) == 1 and msg.startswith(f"MODEL: {bad}: ") and key in msg and why in msg, msg


def test_an_onnx_file_from_before_vistrain_preprocess_resizes_and_normalises(exported: Path, tmp_path: Path) -> None:
    old = load_predictor(rewritten(exported, tmp_path / "old.onnx", preprocess=None)).preprocessor
    assert old == Preprocessor(size=(32, 32), crop="none", interpolation="bilinear", clahe=False,
                               mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert load_predictor(exported).preprocessor == old  # this run's preprocessing is that too


def test_an_onnx_graph_without_the_image_input_is_refused(exported: Path, tmp_path: Path) -> None:
    bad = rewritten(exported, tmp_path / "renamed.onnx", input_name="pixels")
    with pytest.raises(UserError, match=r"input 'image' \[N, 3, H, W\]; it has pixels"):
        load_predictor(bad)


def test_serve_exits_2_on_bad_metadata_before_starting(exported: Path, tmp_path: Path) -> None:
    for changes, key in (({"img_size": "abc"}, "vistrain.img_size"), ({"classes": '["0", "1"]'}, "vistrain.classes")):
        bad = rewritten(exported, tmp_path / "bad.onnx", **changes)
        res = run_cli("serve", str(bad), cwd=tmp_path, timeout=120)
        assert res.returncode == 2, res.stdout + res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: MODEL: {bad}: ") and key in lines[0], lines


def test_metadata_and_health_reveal_no_server_paths(served: dict, exported: Path) -> None:
    for target, source in ((served["run"], f"{served['run'].name} folds 0,1 averaged"), (exported, exported.name)):
        client = TestClient(create_app(load_predictor(target)))
        meta = client.get("/metadata")
        assert meta.json()["source"] == source
        text = meta.text + client.get("/health").text
        assert str(served["root"]) not in text and str(served["root"].resolve()) not in text, text


def test_bad_uploads_are_refused_naming_the_file(served: dict) -> None:
    client = TestClient(create_app(load_predictor(served["run"]), Limits(max_files=3, max_mb=0.01)))
    good = served["files"][0]
    res = client.post("/predict", files=[*upload([good]), ("files", ("notes.png", b"not an image", "image/png"))])
    assert res.status_code == 400 and res.json()["detail"] == "notes.png: not a readable image (UnidentifiedImageError)"
    res = client.post("/predict", files=[("files", ("empty.jpg", b"", "image/jpeg"))])
    assert res.status_code == 400 and res.json()["detail"] == "empty.jpg: empty file"
    big = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(big, "PNG")
    res = client.post("/predict", files=[("files", ("big.png", big.getvalue(), "image/png"))])
    assert res.status_code == 413 and res.json()["detail"].startswith("big.png: ")
    res = client.post("/predict", files=upload([good] * 4))
    assert res.status_code == 400 and "over the limit of 3" in res.json()["detail"]
    assert client.post("/predict").status_code == 422  # no files field at all


def test_a_port_in_use_is_a_user_error(served: dict, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = run_cli("serve", str(served["run"]), "--port", str(port), cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --port: cannot listen on 127.0.0.1:{port}"), lines
    # A run is served with its log in RUN/serve.log: the start-up failure, its traceback, then [EXIT] last.
    log = (served["run"] / "serve.log").read_text()
    tail = log[log.rfind("[SERVE] log:"):]
    assert f"[ERROR] --port: cannot listen on 127.0.0.1:{port}" in tail and "Traceback (most recent call last)" in tail
    assert tail.rstrip().splitlines()[-1].endswith("[EXIT] SERVING ERROR code=2"), tail[-1000:]
    assert "Traceback" not in res.stdout + res.stderr
    bad = run_cli("serve", str(served["run"]), "--port", "70000", cwd=tmp_path)
    assert bad.returncode == 2 and "1..65535" in bad.stderr


def test_serve_target_must_be_a_run_or_an_onnx_file(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"x")
    res = run_cli("serve", str(tmp_path / "model.pt"), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: RUN|MODEL: ") and "neither a run directory nor an .onnx" in res.stderr


def test_request_errors_are_logged_with_their_traceback(served: dict, tmp_path: Path) -> None:
    """A 5xx answer says no more than that (no paths, no traceback); the log file has the error and traceback,
    and one line per refused upload."""
    from vistrain.tracking.logs import run_logging

    predictor = load_predictor(served["run"])

    def broken(batch: np.ndarray) -> dict:
        raise RuntimeError(f"model on {served['run']} exploded")

    predictor._run = broken
    log_file = tmp_path / "serve.log"
    with run_logging([log_file]):
        client = TestClient(create_app(predictor))
        res = client.post("/predict", files=upload(served["files"][:1]))
        refused = client.post("/predict", files=[("files", ("notes.png", b"not an image", "image/png"))])
    assert res.status_code == 500 and str(served["run"]) not in res.text, res.text
    assert refused.status_code == 400
    log = log_file.read_text()
    assert f"[SERVE] POST /predict -> 500 RuntimeError: model on {served['run']} exploded" in log
    assert "Traceback (most recent call last)" in log and "in broken" in log
    assert "[SERVE] POST /predict -> 400 notes.png: not a readable image" in log


def image_bytes(fmt: str, size: tuple[int, int]) -> bytes:
    """A ``size`` (width, height) picture of class 0 saved as ``fmt``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (220, 40, 40)).save(buf, fmt)
    return buf.getvalue()


def test_uploads_carry_warnings_for_low_resolution_and_unusual_formats(served: dict) -> None:
    """Seed 003's BFF checks, per file, beside the answer; the images are still predicted."""
    client = TestClient(create_app(load_predictor(served["run"]), Limits()))  # the defaults: 512 px, JPEG / PNG
    uploads = {"small.png": ("PNG", (300, 200)), "photo.webp": ("WEBP", (640, 600)),
               "scan.bmp": ("BMP", (100, 600)), "big.jpg": ("JPEG", (800, 600))}
    res = client.post("/predict", files=[("files", (name, image_bytes(fmt, size), "image/*"))
                                         for name, (fmt, size) in uploads.items()])
    assert res.status_code == 200, res.text
    warnings = {r["file"]: r["warnings"] for r in res.json()["results"]}
    assert warnings == {
        "small.png": ["resolution 300x200 is under serve.min_resolution=512"],
        "photo.webp": ["format WEBP is not one of JPEG, PNG"],
        "scan.bmp": ["resolution 100x600 is under serve.min_resolution=512", "format BMP is not one of JPEG, PNG"],
        "big.jpg": [],
    }
    for r in res.json()["results"]:  # predicted as any other upload (which class a 1-epoch model picks: not the point)
        assert r["class"] in ("0", "1", "2") and sum(t["prob"] for t in r["top"]) == pytest.approx(1, abs=1e-5), r


def test_serve_limits_come_from_the_run_config_with_the_flags_over_them(served: dict, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from vistrain import cli
    from vistrain.serving import app as serve

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))  # no server: the app it would run
    monkeypatch.setattr(serve, "_check_port", lambda host, port: None)
    log = tmp_path / "serve.log"
    assert cli.main(["serve", str(served["run"]), "--max-files", "2", "--log-file", str(log)]) == 0
    client = TestClient(apps[-1])
    res = client.post("/predict", files=upload(served["files"][:3]))
    assert res.status_code == 400 and "over the limit of 2" in res.json()["detail"]  # the flag
    (row,) = client.post("/predict", files=upload(served["files"][:1])).json()["results"]
    assert row["warnings"] == ["resolution 40x40 is under serve.min_resolution=64"]  # the run's config
    assert ("[SERVE] limits: max_files=2 max_mb=20 top_k=5 min_resolution=64 formats=JPEG,PNG max_pixels=24000000 "
            "max_request_mb=64 max_concurrency=4 timeout_s=30 (the run's serve: section; flags: max_files)"
            ) in log.read_text()

    assert cli.main(["serve", str(served["run"]), "--min-resolution", "0", "--formats", "jpeg", "--log-file",
                     str(log)]) == 0
    client = TestClient(apps[-1])
    (row,) = client.post("/predict", files=upload(served["files"][:1])).json()["results"]
    assert row["warnings"] == ["format PNG is not one of JPEG"]
    assert client.post("/predict", files=upload(served["files"][:3] * 5)).status_code == 200  # 15 <= 16 (config)
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["serve", str(served["run"]), "--formats", "JPG"])
    assert excinfo.value.code == 2


def test_an_exported_file_carries_the_serve_section(exported: Path, tmp_path: Path) -> None:
    (row,) = TestClient(create_app(load_predictor(exported))).post(
        "/predict", files=upload([exported.parent.parent / "data" / "train" / "img_0_000.png"])).json()["results"]
    assert row["warnings"] == ["resolution 40x40 is under serve.min_resolution=64"]
    assert load_predictor(exported).serve["max_files"] == 16
    older = rewritten(exported, tmp_path / "older.onnx", serve=None)  # exported before the serve: section existed
    assert load_predictor(older).serve == ServeCfg().model_dump()  # the defaults


def test_serve_section_is_checked_when_the_config_loads(tmp_path: Path) -> None:
    from vistrain.errors import ConfigError

    data = write_csv_dataset(tmp_path / "data", per_class=2)
    cfg = tiny_config(data.root, serve={"min_resolution": -1, "formats": ["jpeg", "JPG"]})
    with pytest.raises(ConfigError) as excinfo:
        load_config(write_yaml(tmp_path / "cfg.yaml", cfg))
    lines = str(excinfo.value).splitlines()
    assert any(ln.startswith("serve.min_resolution: ") and "greater than or equal to 0" in ln for ln in lines), lines
    assert any(ln.startswith("serve.formats: 'JPG' is not an image format") and "(did you mean 'JPEG'?)" in ln
               for ln in lines), lines
    ok = load_config(write_yaml(tmp_path / "ok.yaml", tiny_config(data.root, serve={"formats": ["jpeg", "webp"]})))
    assert ok.serve.formats == ["JPEG", "WEBP"] and ok.serve.min_resolution == 512
