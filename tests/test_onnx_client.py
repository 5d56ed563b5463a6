"""``examples/onnx_client.py``: a client of an exported model that reads only ``preprocess.json`` and the ONNX file,
with onnxruntime, Pillow, OpenCV and numpy and no vistrain, gives ``vistrain predict``'s probabilities (to 1e-5) on
every valid image of the hostile corpus (animated GIF, CMYK JPEG, 16-bit PNG, palette with a transparent index, EXIF
rotation) and on the other modes a user meets (RGBA, LA, 1-bit, 32-bit integer and float TIFF, a 16-bit PNG of a
narrow range). The run crops a centre square and applies CLAHE, so every step of the description is exercised."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import assert_same_probabilities, class_image, tiny_config, write_csv_dataset, write_yaml
from hostile import write_corpus
from PIL import Image

from vistrain import cli
from vistrain.config import load_config
from vistrain.data.images import load_rgb
from vistrain.engine.training import run_train

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CLIENT = Path(__file__).resolve().parents[1] / "examples" / "onnx_client.py"
PREPROCESS = {"crop": "center_square", "clahe": {"enabled": True, "clip_limit": 3.0, "grid": 4}}
HIGH_BIT_DEPTH = ("deep16.png", "narrow16.png", "int32.tif", "float.tif")

# Runs the client as its own program, after making any import of vistrain fail: the client must stand alone.
NO_VISTRAIN = """
import importlib.abc, runpy, sys
class NoVistrain(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] == 'vistrain':
            raise ImportError('the client imported ' + name)
sys.meta_path.insert(0, NoVistrain())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def more_modes(folder: Path) -> list[str]:
    """Files of the modes the hostile corpus lacks, at odd sizes."""
    rng = np.random.default_rng(11)
    grey = np.asarray(class_image(2, rng, 48).convert("L"))[:43, :37]
    Image.fromarray(grey.astype(np.uint16) + 1000).save(folder / "narrow16.png")  # 1000..1255: saturates as uint8
    Image.fromarray(grey.astype(np.int32) * 70_000 - 5_000_000).save(folder / "int32.tif")
    Image.fromarray(grey.astype(np.float32) / 255 - 0.25).save(folder / "float.tif")
    rgba = np.dstack([np.asarray(class_image(1, rng, 48))[:41, :47], rng.integers(0, 256, (41, 47), dtype=np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray(rgba[..., [0, 3]], "LA").save(folder / "grey_alpha.png")
    Image.fromarray(grey > 128).save(folder / "bilevel.png")
    # Photos large enough for the reduced JPEG decode (decode.reduce): 1/8 and 1/4, one stored on its side
    photo = np.asarray(class_image(0, rng, 64).resize((1201, 903), Image.BICUBIC)).astype(np.int16)
    photo = np.clip(photo + rng.integers(-40, 41, photo.shape), 0, 255).astype(np.uint8)
    Image.fromarray(photo).save(folder / "photo.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo[:600, :455]).save(folder / "portrait.jpg", quality=90, exif=exif)
    return ["narrow16.png", "int32.tif", "float.tif", "alpha.png", "grey_alpha.png", "bilevel.png", "photo.jpg",
            "portrait.jpg"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A one-epoch run (centre crop + CLAHE) exported to ONNX, and ``predict --probs`` on every valid image."""
    root = tmp_path_factory.mktemp("onnx_client")
    data = write_csv_dataset(root / "data", per_class=6)
    cfg = tiny_config(data.root, train={"epochs": 1}, preprocess=PREPROCESS,
                      output={"exp_dir": str(root / "exp"), "logs_dir": None}, tracking={"tensorboard": False})
    run = run_train(load_config(write_yaml(root / "cfg.yaml", cfg))).run_dir
    assert cli.main(["export", str(run)]) == 0
    images = root / "images"
    names = [n for n, what in write_corpus(images).items() if what == "ok"] + more_modes(images)
    csv, out = root / "q.csv", root / "pred.csv"
    pd.DataFrame({"ID": names}).to_csv(csv, index=False)
    assert cli.main(["predict", str(run), "--input", str(csv), "--image-dir", str(images), "--probs",
                     "--output", str(out)]) == 0
    return {"run": run, "images": images, "names": names, "pred": pd.read_csv(out, dtype={"ID": str})}


def run_client(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # vistrain's src is not on the path
    return subprocess.run([sys.executable, "-c", NO_VISTRAIN, str(CLIENT), *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_corpus_holds_images_a_plain_rgb_decode_gets_wrong(exported: dict) -> None:
    """The check below can fail: Pillow's own ``convert('RGB')`` of these files (what "RGB uint8" alone tells a
    client) saturates or clips them, so they differ from the decode ``predict`` uses."""
    for name in HIGH_BIT_DEPTH:
        with Image.open(exported["images"] / name) as img:
            assert img.mode in ("I;16", "I", "F"), (name, img.mode)
            plain = np.asarray(img.convert("RGB"))
        assert not np.array_equal(plain, np.asarray(load_rgb(exported["images"] / name))), name


def test_preprocess_json_describes_the_decode(exported: dict) -> None:
    spec = json.loads((exported["run"] / "export" / "preprocess.json").read_text())
    decode = spec["decode"]
    assert decode["high_bit_depth"]["rule"] == "min_max" and set(decode["high_bit_depth"]["modes"]) >= {"I;16", "I",
                                                                                                         "F"}
    assert decode["transparency"]["background"] == [255, 255, 255]
    assert {"frame", "orientation", "palette", "cmyk", "order", "reduce"} <= set(decode)
    assert decode["order"][0] == "reduce" and decode["reduce"]["formats"] == ["JPEG"]
    assert spec["resize"]["shrink"] == "reduced_area" and "INTER_AREA" in spec["resize"]["shrink_rule"]
    assert spec["input"].startswith("RGB uint8")  # the keys read before stay as they were


def test_client_without_vistrain_gives_predicts_probabilities(exported: dict) -> None:
    for name, factor in (("photo.jpg", 8), ("portrait.jpg", 4)):  # the client has the reduced decode to follow
        assert load_rgb(exported["images"] / name, scale_for=lambda w, h, f=factor: f).info["reduced"] == factor
    pred = exported["pred"]
    classes = [c.removeprefix("prob_") for c in pred.columns if c.startswith("prob_")]
    onnx_file = exported["run"] / "export" / "model_fold0.onnx"
    files = [str(exported["images"] / n) for n in exported["names"]]
    result = run_client(str(onnx_file), *files, "--top-k", str(len(classes)))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [ln.split("\t") for ln in result.stdout.splitlines() if ln.strip()]
    assert [ln[0] for ln in lines] == files
    got = np.array([[dict(zip(ln[1::2], map(float, ln[2::2]), strict=True))[c] for c in classes] for ln in lines])
    assert pred["ID"].tolist() == exported["names"]
    want = pred[[f"prob_{c}" for c in classes]].to_numpy(dtype=np.float64)
    assert_same_probabilities(got, want, atol=1e-5, what="examples/onnx_client.py vs predict")


def test_client_prints_the_top_k_in_order_and_refuses_a_decode_it_does_not_know(exported: dict,
                                                                                tmp_path: Path) -> None:
    export = exported["run"] / "export"
    image = str(exported["images"] / "deep16.png")
    result = run_client(str(export / "model_fold0.onnx"), image, "--top-k", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    fields = result.stdout.strip().split("\t")
    assert len(fields) == 5 and float(fields[2]) >= float(fields[4])
    spec = json.loads((export / "preprocess.json").read_text())
    spec["decode"]["high_bit_depth"]["rule"] = "clip"
    (tmp_path / "preprocess.json").write_text(json.dumps(spec))
    result = run_client(str(export / "model_fold0.onnx"), image, "--preprocess", str(tmp_path / "preprocess.json"))
    assert result.returncode != 0 and "high_bit_depth" in result.stderr, result.stderr[-3000:]
