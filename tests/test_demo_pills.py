"""``vistrain demo --scenario pills`` and the two pill configs (seed 003), and the end-to-end demo: data, training,
int8 export with budget lines, manifest."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, write_yaml

from vistrain.config import load_config
from vistrain.config.bundled import bundled_config
from vistrain.config.loader import parse_overrides
from vistrain.data.demo import default_demo_config, pills_overrides
from vistrain.data.synthetic_pills import write_pills
from vistrain.errors import UserError

FULL = bundled_config("pill_efficientnetv2s.yaml")
DEMO = bundled_config("demo_pills.yaml")


@pytest.fixture(scope="module")
def small_pills(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "pills"
    write_pills(out, classes=4, studio_objects=3, studio_views=2, real_objects=2, real_views=1)
    return out


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_full_config_carries_seed_003s_settings(tmp_path: Path) -> None:
    raw = _raw(FULL)
    assert FULL.read_text().startswith("# vistrain train --config configs/pill_efficientnetv2s.yaml")
    assert [(s["name"], s["source"], s["ratio"]) for s in raw["data"]["sources"]] == [
        ("studio", "folders", 0.3), ("real", "folders", 0.7)]
    assert (raw["data"]["split"], raw["data"]["min_images_per_class"]) == ("ratio", 50)
    assert raw["train"]["monitor"] == "top1@real"
    cfg = load_config(FULL)
    d = cfg.data
    assert (d.train_ratio, d.val_ratio, d.test_ratio) == (0.8, 0.1, 0.1)
    assert (cfg.model.name, cfg.model.drop_rate, cfg.model.drop_path_rate) == ("tf_efficientnetv2_s", 0.3, 0.2)
    p = cfg.preprocess
    assert (p.crop, p.resize.interpolation, p.clahe.enabled, p.clahe.clip_limit, p.clahe.grid) == (
        "center_square", "bilinear", True, 2.0, 8)
    t = cfg.train
    assert (t.img_size, t.epochs, t.optimizer, t.lr, t.weight_decay) == (512, 50, "adamw", 1e-3, 5e-4)
    assert (t.warmup_epochs, t.warmup_lr_factor, t.scheduler, t.min_lr) == (3, 0.001, "cosine", 1e-6)
    assert (t.label_smoothing, t.grad_clip_norm) == (0.1, 1.0)
    a = cfg.augment
    assert (a.mixup_alpha, a.cutmix_alpha, a.mix_prob) == (0.2, 1.0, 0.5)
    assert (a.rotate, a.color_jitter, a.hue, a.random_erasing) == (30, 0.2, 0.1, 0.2)


def test_the_demo_config_is_the_full_one_shrunk(tmp_path: Path) -> None:
    full, demo = _raw(FULL), _raw(DEMO)
    assert DEMO.read_text().startswith("# vistrain demo --scenario pills")
    assert [(s["name"], s["ratio"]) for s in demo["data"]["sources"]] == [
        (s["name"], s["ratio"]) for s in full["data"]["sources"]]
    for key in ("split", "train_ratio", "val_ratio", "test_ratio", "min_images_per_class"):
        assert demo["data"][key] == full["data"][key], key
    assert demo["preprocess"] == full["preprocess"]
    assert demo["train"]["monitor"] == full["train"]["monitor"]
    cfg = load_config(DEMO)
    assert cfg.model.pretrained is False, "nothing can be downloaded in the demo"
    assert cfg.train.img_size <= 64 and cfg.train.epochs <= 12 and cfg.train.num_workers == 0
    assert default_demo_config("pills") == DEMO


def test_pills_overrides_point_the_configs_sources_at_the_written_domains(small_pills: Path) -> None:
    overrides, num_classes = pills_overrides(small_pills, DEMO)
    assert num_classes == 4
    data = parse_overrides(overrides)["data"]
    assert data["sources"] == [
        {"name": "studio", "source": "folders", "image_dir_train": str(small_pills / "studio"), "ratio": 0.3},
        {"name": "real", "source": "folders", "image_dir_train": str(small_pills / "real"), "ratio": 0.7}]
    assert data["class_map"] == str(small_pills / "class_map.json")


def test_a_demo_config_with_another_source_name_is_a_user_error(small_pills: Path, tmp_path: Path) -> None:
    raw = _raw(DEMO)
    raw["data"]["sources"][1]["name"] = "phone"
    with pytest.raises(UserError, match=r"data\.sources\[1\]\.name: 'phone' .*valid: studio, real"):
        pills_overrides(small_pills, write_yaml(tmp_path / "c.yaml", raw))


def test_an_unknown_scenario_exits_2(tmp_path: Path) -> None:
    res = run_cli("demo", "--scenario", "cats", cwd=tmp_path)
    assert res.returncode == 2 and "invalid choice: 'cats'" in res.stderr and "'pills'" in res.stderr


@pytest.mark.slow
def test_the_pills_demo_runs_far_above_chance_and_exports(tmp_path: Path) -> None:
    res = run_cli("demo", "--scenario", "pills", "--out", str(tmp_path / "pills"), "output.exp_dir=exp",
                  "output.logs_dir=null", cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    m = re.search(r"\[DONE\] pills demo: top1@real=([0-9.]+) on the test split \(chance 1/(\d+)", res.stdout)
    assert m, res.stdout
    assert float(m[1]) > 4 / int(m[2]), "far above chance"
    assert re.search(r"\[DONE\] export: \S+model_fold0\.int8\.onnx \([0-9.]+ MB, top-1 agreement", res.stdout)
    assert re.search(r"\[BUDGET\] model_fold0\.int8\.onnx: .* (PASS|FAIL)", res.stdout)
    run = next((tmp_path / "exp").glob("*/*/config.yaml")).parent
    assert list((run / "export").glob("*.onnx"))
    manifest = tmp_path / "manifest.json"
    res = run_cli("manifest", "--config", str(run / "config.yaml"), "--output", str(manifest), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(manifest.read_text())["num_classes"] == int(m[2])
