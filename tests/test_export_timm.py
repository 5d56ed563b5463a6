"""vistrain export --format timm: a Hugging Face layout folder that timm alone loads and runs as vistrain does.

The checking side of every comparison runs in a subprocess that imports timm, torch, PIL (and OpenCV for the CLAHE a
card tells a timm user to apply), never vistrain: what a user of timm or of the hub has."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import markdown
import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import (
    assert_same_probabilities,
    class_image,
    cli_env,
    run_cli,
    tiny_config,
    write_csv_dataset,
)
from PIL import Image

import vistrain

# A timm user's code: the folder through timm's own data config and transforms, then (for a feature model) the
# head code that config.json documents. Prints the outputs as JSON; fails if vistrain was imported on the way.
TIMM_SIDE = r"""
import json, sys
import numpy as np, timm, torch
from PIL import Image

folder, files, clahe = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "clahe"
config = json.loads(open(f"{folder}/config.json").read())
model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
data_cfg = timm.data.resolve_data_config({}, model=model)
transform = timm.data.create_transform(**data_cfg)

def load(path):
    img = Image.open(path).convert("RGB")
    if clahe:  # as the card says: CLAHE on L of OpenCV's 8-bit LAB (here after an identity resize)
        import cv2
        c = config["vistrain"]["preprocess"]["clahe"]
        lab = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2LAB)
        lab[..., 0] = cv2.createCLAHE(c["clip_limit"], (c["grid"], c["grid"])).apply(np.ascontiguousarray(lab[..., 0]))
        img = Image.fromarray(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB))
    return transform(img)

x = torch.stack([load(f) for f in files])
head = config["vistrain"]["head"]
with torch.no_grad():
    if head is None:
        out = model(x)
    else:
        scope = {"folder": folder, "model": model}
        exec(head["code"], scope)
        out = eval(head["call"], scope, {"x": x})
assert not [m for m in sys.modules if m.split(".")[0] == "vistrain"], "the timm side imported vistrain"
print(json.dumps({"out": out.tolist(), "num_classes": model.num_classes,
                  "data_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in data_cfg.items()}}))
"""


def timm_side(folder: Path, files: list[Path], clahe: bool = False) -> dict[str, Any]:
    res = subprocess.run([sys.executable, "-c", TIMM_SIDE, str(folder), json.dumps([str(f) for f in files]),
                          "clahe" if clahe else "-"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def softmax(logits: Any) -> np.ndarray:
    return torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=1).numpy()


def probs_of(table: Any, classes: list[str]) -> np.ndarray:
    return table[[f"prob_{c}" for c in classes]].to_numpy(dtype=np.float64)


def train(root: Path, **sections: dict[str, Any]) -> Path:
    data = write_csv_dataset(root / "data", per_class=8, size=40)
    cfg = tiny_config(data.root, output={"exp_dir": str(root / "exp"), "logs_dir": None},
                      tracking={"tensorboard": False})
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return vistrain.train(cfg, progress=False).path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-fold classifier at a non-square 32 x 40 (H x W) input, evaluated with EMA weights."""
    return train(tmp_path_factory.mktemp("timm_cls"), train={"img_size": [32, 40], "epochs": 2, "ema": True,
                                                             "ema_decay": 0.9})


def images(folder: Path, sizes: list[tuple[int, int]], fmt: str = "PNG", seed: int = 3) -> list[Path]:
    """One class picture per size (W, H), classes in turn: drawn at the classifier's 40 x 32 (W x H), then enlarged
    to the size with PIL's bicubic filter (an identity at 40 x 32)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i, size in enumerate(sizes):
        path = folder / f"im{i:02d}.{fmt.lower().replace('jpeg', 'jpg')}"
        picture = class_image(i % 3, rng, 40).crop((0, 0, 40, 32))
        picture.resize(size, Image.Resampling.BICUBIC).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append(path)
    return out


def test_timm_alone_predicts_what_predict_predicts(classifier: Path, tmp_path: Path) -> None:
    folder = tmp_path / "timm_model"
    res = run_cli("export", str(classifier), "--format", "timm", "--output", str(folder), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    done = [ln for ln in res.stdout.splitlines() if ln.startswith("[DONE]")]
    assert len(done) == 1 and str(folder) in done[0] and f'timm.create_model("local-dir:{folder}"' in done[0]
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md"}

    run = vistrain.Run(classifier)
    # At the model's size (40 x 32) the resize is an identity for OpenCV and for PIL: the same tensors, so the same
    # probabilities up to float rounding.
    exact = images(tmp_path / "at_size", [(40, 32)] * 32)
    got = timm_side(folder, exact)
    assert got["num_classes"] == 3
    want = probs_of(run.predict([str(p) for p in exact], folds="0"), run.classes)
    assert_same_probabilities(softmax(got["out"]), want, atol=1e-4, what="timm local-dir vs vistrain predict")

    # Photos larger than the input (JPEG, 4.2 - 6.5x, not whole factors): vistrain decodes them reduced (libjpeg at
    # 1/2) and shrinks with OpenCV's area average, timm decodes in full and resizes with PIL's antialiased bilinear
    # filter. The pixels differ by about 2 grey levels on average; measured: the same top-1 class for all 32 and
    # probabilities within 5e-3. Asserted: the same top-1 class and probabilities within 0.02.
    factors = np.random.default_rng(5).uniform(4.2, 6.5, (32, 2))
    photos = images(tmp_path / "photos", [(int(40 * fw), int(32 * fh)) for fw, fh in factors], fmt="JPEG")
    got = softmax(timm_side(folder, photos)["out"])
    want = probs_of(run.predict([str(p) for p in photos], folds="0"), run.classes)
    assert (got.argmax(1) == want.argmax(1)).all()
    assert_same_probabilities(got, want, atol=0.02, what="timm vs predict on photos larger than the input")


def test_config_json_and_card_say_classes_and_preprocessing(classifier: Path, tmp_path: Path) -> None:
    folder = vistrain.Run(classifier).export("timm", output=tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    run = vistrain.Run(classifier)
    pre = json.loads((classifier / "preprocess.json").read_text())
    assert config["architecture"] == "resnet10t" and config["num_classes"] == 3
    assert config["label_names"] == [str(c) for c in run.classes] == ["0", "1", "2"]
    p = config["pretrained_cfg"]
    assert p["input_size"] == [3, 32, 40] and p["interpolation"] == "bilinear"
    assert p["crop_pct"] == 1.0 and p["crop_mode"] == "squash"  # crop none: both sides resized to the input
    assert p["mean"] == pre["normalize"]["mean"] and p["std"] == pre["normalize"]["std"]
    v = config["vistrain"]
    assert v["fold"] == 0 and v["run"] == classifier.name and v["temperature"] is None and v["head"] is None
    assert v["preprocess"] == pre
    assert not any(s.startswith("preprocess.clahe") for s in v["not_expressed"])
    assert any(s.startswith("preprocess.resize.shrink") for s in v["not_expressed"])

    # the weights are the evaluated ones (EMA here): the best checkpoint's .safetensors, tensor for tensor
    from safetensors.torch import load_file

    exported, best = load_file(folder / "model.safetensors"), load_file(classifier / "ckpt" / "best_fold0.safetensors")
    assert exported.keys() == best.keys() and all(torch.equal(exported[k], best[k]) for k in best)

    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "timm"
    html = markdown.markdown(card.split("---", 2)[2], extensions=["fenced_code"])
    assert "How to load" in html and "local-dir:" in card and "hf-hub:" in card
    assert all(s.split(":")[0] in html for s in v["not_expressed"])
    # the card goes to the hub with --push-to-hub: it names the folder, never a path of this machine
    assert f'"local-dir:{folder.name}"' in card and str(tmp_path) not in card and str(classifier) not in card


@pytest.fixture(scope="module")
def gem_clahe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GeM classifier trained with CLAHE and a centre-square crop (what timm's config cannot say)."""
    return train(tmp_path_factory.mktemp("timm_gem"), model={"pooling": "gem"},
                 preprocess={"crop": "center_square", "clahe": {"enabled": True, "clip_limit": 3.0, "grid": 4}})


def test_gem_and_clahe_are_listed_and_the_documented_head_gives_predict(gem_clahe: Path, tmp_path: Path) -> None:
    res = run_cli("export", str(gem_clahe), "--format", "timm", "--output", str(tmp_path / "gem"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    config = json.loads((tmp_path / "gem" / "config.json").read_text())
    listed = config["vistrain"]["not_expressed"]
    for setting in ("preprocess.clahe", "model.pooling", "preprocess.crop"):
        assert any(s.startswith(setting) for s in listed), (setting, listed)
        assert any("[EXPORT] not in timm's config: " + setting in ln for ln in (res.stdout + res.stderr).splitlines())
    assert config["num_classes"] == 0 and config["label_names"] == ["0", "1", "2"]  # the head's classes
    assert config["pretrained_cfg"]["crop_mode"] == "center"
    assert (tmp_path / "gem" / "vistrain_head.safetensors").is_file()
    card = (tmp_path / "gem" / "README.md").read_text()
    assert "CLAHE" in card and config["vistrain"]["head"]["code"] in card

    exact = images(tmp_path / "square", [(32, 32)] * 32)  # centre square and resize: identities
    got = softmax(timm_side(tmp_path / "gem", exact, clahe=True)["out"])
    run = vistrain.Run(gem_clahe)
    want = probs_of(run.predict([str(p) for p in exact], folds="0"), run.classes)
    assert_same_probabilities(got, want, atol=1e-4, what="timm features + the documented GeM head vs predict")


def test_an_embedding_run_exports_a_feature_model_and_its_head(tmp_path: Path) -> None:
    from test_embedding_e2e import _retrieval_config, write_products

    root = write_products(tmp_path / "products", classes=3, objects=4)
    cfg = _retrieval_config(tmp_path, root)
    cfg["model"].update(name="resnet10t", pretrained=False, embedding_dim=16, pooling="avg", last_stride=1)
    cfg["sampler"].update(p=3, k=2)
    cfg["train"].update(img_size=32, epochs=1, warmup_epochs=0, num_workers=0, device="cpu", log_interval=0,
                        channels_last=False, freeze_backbone_epochs=0)
    cfg["augment"]["policy"] = "none"
    cfg["tracking"]["tensorboard"] = False
    cfg["eval"].update(flip_feats=True, feat_norm=True)
    run = vistrain.train(cfg, progress=False)
    folder = run.export("timm", output=tmp_path / "emb")
    config = json.loads((folder / "config.json").read_text())
    assert config["num_classes"] == 0 and config["pretrained_cfg"]["num_classes"] == 0
    assert "label_names" not in config  # the training identities are no output of the exported model
    head = config["vistrain"]["head"]
    assert head["kind"] == "embedding" and head["file"] == "vistrain_head.safetensors"
    assert any(s.startswith("model.last_stride") for s in config["vistrain"]["not_expressed"])

    files = sorted(root.rglob("*.jpg"))[:12]  # 48 x 48 JPEGs at a 32 px input: a shrink, the same in both
    want = run.embed([str(p) for p in files])
    # timm's features + the documented head, on vistrain's own input tensors: the model side alone
    got = timm_tensors_side(folder, torch.stack([run.preprocessor(np.asarray(Image.open(p).convert("RGB")))
                                                 for p in files]))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def timm_tensors_side(folder: Path, x: torch.Tensor) -> np.ndarray:
    """The documented head on given input tensors, in a process without vistrain."""
    path = folder.parent / "x.pt"
    torch.save(x, path)
    code = ("import json, sys, timm, torch\n"
            "folder = sys.argv[1]\n"
            "config = json.load(open(f'{folder}/config.json'))\n"
            "model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()\n"
            "scope = {'folder': folder, 'model': model}\n"
            "exec(config['vistrain']['head']['code'], scope)\n"
            "with torch.no_grad():\n"
            "    out = eval(config['vistrain']['head']['call'], scope, {'x': torch.load(sys.argv[2])})\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'vistrain']\n"
            "print(json.dumps(out.tolist()))\n")
    res = subprocess.run([sys.executable, "-c", code, str(folder), str(path)], env=cli_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return np.asarray(json.loads(res.stdout.strip().splitlines()[-1]), dtype=np.float32)


def test_dry_run_pushes_nothing_and_push_uploads_the_folder(classifier: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    import huggingface_hub

    calls: list[tuple[str, dict[str, Any]]] = []

    class FakeRepo:
        repo_id = "someone/tiny"

    def create_repo(self: Any, repo_id: str, **kw: Any) -> FakeRepo:
        calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return FakeRepo()

    def upload_folder(self: Any, **kw: Any) -> str:
        calls.append(("upload_folder", kw))
        return "https://huggingface.co/someone/tiny/commit/0"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    run = vistrain.Run(classifier)
    with caplog.at_level(logging.INFO, logger="vistrain"):
        folder = run.export("timm", output=tmp_path / "dry", push_to_hub="someone/tiny", dry_run=True)
    assert calls == [] and (folder / "model.safetensors").is_file()
    (line,) = [r.getMessage() for r in caplog.records if "would push" in r.getMessage()]
    assert "someone/tiny" in line and str(folder) in line
    folder = run.export("timm", output=tmp_path / "pushed", push_to_hub="someone/tiny")
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1]["repo_id"] == "someone/tiny" and calls[0][1].get("exist_ok") is True
    assert Path(calls[1][1]["folder_path"]) == folder and calls[1][1]["repo_id"] == "someone/tiny"


def test_user_mistakes_are_one_line(classifier: Path, capsys: pytest.CaptureFixture) -> None:
    from vistrain import cli

    def error_line(*args: str) -> str:
        assert cli.main(["export", str(classifier), *args]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
        return line

    line = error_line("--format", "timm", "--folds", "0,1")
    assert "--folds" in line and "one model per folder" in line
    line = error_line("--format", "tflite")
    assert "--format" in line and "valid: onnx, timm" in line
    line = error_line("--push-to-hub", "someone/x")  # onnx: nothing to push
    assert "--push-to-hub" in line and "--format timm" in line
    line = error_line("--format", "timm", "--verify")
    assert "--verify" in line and "--format onnx" in line


def test_a_run_with_two_folds_exports_one_chosen_fold(classifier: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / classifier.name
    shutil.copytree(classifier, copy)
    for suffix in (".pth", ".safetensors"):
        shutil.copy(copy / "ckpt" / f"best_fold0{suffix}", copy / "ckpt" / f"best_fold1{suffix}")
    with pytest.raises(vistrain.UserError, match="one model per folder"):
        vistrain.Run(copy).export("timm", folds="all", output=tmp_path / "x")
    folder = vistrain.Run(copy).export("timm", folds=[1], output=tmp_path / "one")
    assert json.loads((folder / "config.json").read_text())["vistrain"]["fold"] == 1
    assert vistrain.Run(copy).export("timm") == copy / "export" / "timm_fold0"  # default: fold 0


def test_an_architecture_whose_timm_head_adds_layers_pools_in_the_documented_head(tmp_path: Path) -> None:
    """ConvNeXt's timm forward puts a norm after the pooling, which vistrain's embedding (forward_features, then its
    own pooling) never applies: the avg pooling moves into the head code, which reproduces the model."""
    from vistrain.config import load_config
    from vistrain.engine.inference import LoadedRun
    from vistrain.engine.timm_folder import timm_parts
    from vistrain.models.build import build_model

    cfg = load_config({"task": "embedding", "data": {"source": "folders", "image_dir_train": str(tmp_path)},
                       "model": {"name": "convnext_atto", "pretrained": False, "pooling": "avg", "embedding_dim": 8},
                       "train": {"img_size": 32}, "eval": {"flip_feats": True}})
    torch.manual_seed(0)
    model = build_model("embedding", cfg.model, 3, pretrained=False).eval()
    model.neck.running_mean.normal_()  # a trained BNNeck's statistics, not the identity's
    model.neck.running_var.uniform_(0.5, 2.0)
    run = LoadedRun(tmp_path, cfg, ["a", "b", "c"], [0], None)
    timm_model, head, check = timm_parts(run, model, (32, 32))
    assert head["spec"]["pooling"] == "avg" and "model.forward_features(x)" in head["spec"]["code"]
    assert check["max_abs_diff"] < 1e-5
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        plain = timm.create_model("convnext_atto", num_classes=0, global_pool="avg").eval()
        plain.load_state_dict(model.backbone.state_dict())
        assert (plain(x) - model.backbone.forward_features(x).mean((-2, -1))).abs().max() > 1e-3  # the head norm


def test_a_timm_side_that_differs_from_the_model_writes_nothing(classifier: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The export runs timm's model (and the head code) against vistrain's before writing: a timm that pooled
    otherwise (here: max for avg) is refused, not published."""
    import vistrain.engine.timm_folder as tf

    build = tf._timm
    monkeypatch.setattr(tf, "_timm", lambda name, n, pool: build(name, n, "max"))
    with pytest.raises(vistrain.UserError, match="--format onnx"):
        vistrain.Run(classifier).export("timm", output=tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()


def test_a_calibrated_run_gives_its_temperature(classifier: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / classifier.name
    shutil.copytree(classifier, copy)
    (copy / "calibration.json").write_text(json.dumps({"temperature": 1.7}))
    config = json.loads((vistrain.Run(copy).export("timm") / "config.json").read_text())
    assert config["vistrain"]["temperature"] == 1.7
    assert any(s.startswith("calibration: temperature 1.7") and "softmax(logits / T)" in s
               for s in config["vistrain"]["not_expressed"])
