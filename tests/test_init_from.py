"""Starting weights: ``model.init_from`` (a vistrain run or checkpoint) and ``model.pretrained_path`` (a vistrain
checkpoint or a plain state_dict) copy every tensor whose name and shape match, list what they skip, and refuse a
file that matches under half of the backbone's tensors (exit 2 naming the file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import describe, last_line, only_run_dir, run_cli, tiny_config, write_csv_dataset, write_yaml

from vistrain.config import load_config
from vistrain.config.schema import ModelCfg
from vistrain.engine.checkpoint import atomic_save
from vistrain.errors import ConfigError, UserError
from vistrain.models.build import build_model
from vistrain.models.embedding import EmbeddingModel
from vistrain.models.init import init_weights


def _config(root: Path, classes: tuple[str, ...], **model: object) -> Path:
    data = write_csv_dataset(root / "data", classes=classes, per_class=6)
    cfg = tiny_config(data.root, output={"exp_dir": str(root / "exp"), "logs_dir": None},
                      tracking={"tensorboard": False}, model=dict(model), train={"epochs": 1})
    return write_yaml(root / "cfg.yaml", cfg)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch classification run on 3 classes (resnet10t): the run to fine-tune from."""
    root = tmp_path_factory.mktemp("source")
    result = run_cli("train", "--config", str(_config(root, ("a", "b", "c"))), cwd=root)
    assert result.returncode == 0, describe(result)
    return only_run_dir(root / "exp")


def _vistrain_ckpt(path: Path, model: torch.nn.Module) -> Path:
    """A checkpoint laid out like a run's best_fold{k}.pth."""
    atomic_save({"model": model.state_dict(), "epoch": 1, "metrics": {}, "fold": 0, "classes": [0, 1],
                 "task": "embedding", "vistrain_version": "0.0.0"}, path)
    return path


def _equal_except(model: torch.nn.Module, source: dict[str, torch.Tensor], skipped: set[str],
                  rename: dict[str, str] | None = None) -> list[str]:
    """Names of ``model`` tensors that differ from ``source`` (keys renamed by prefix), ``skipped`` left out."""
    out = []
    for name, tensor in model.state_dict().items():
        key = name
        for old, new in (rename or {}).items():
            key = new + key[len(old):] if key.startswith(old) else key
        if name not in skipped and not torch.equal(tensor, source[key]):
            out.append(name)
    return out


# ------------------------------------------------------------------------------------------- init_from

def test_init_from_a_run_dir_loads_its_best_checkpoint_except_the_other_class_count_head(source_run: Path) -> None:
    m = ModelCfg(name="resnet10t", init_from=source_run)
    model = build_model("classification", m, 4)
    weights = init_weights(model, m, fold=0)
    best = source_run / "ckpt" / "best_fold0.pth"
    source = torch.load(best, weights_only=True)["model"]
    assert _equal_except(model, source, {"fc.weight", "fc.bias"}) == []
    assert model.fc.weight.shape == (4, 512)
    n = len(model.state_dict())
    assert weights == f"init_from {best} ({n - 2}/{n} tensors)"


def test_init_from_logs_what_it_skipped_and_trains(tmp_path: Path, source_run: Path) -> None:
    config = _config(tmp_path, ("a", "b", "c", "d"))
    result = run_cli("train", "--config", str(config), f"model.init_from={source_run}", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    log = (only_run_dir(tmp_path / "exp") / "train.log").read_text()
    best = source_run / "ckpt" / "best_fold0.pth"
    line = next((ln for ln in log.splitlines() if f"[MODEL] init_from={best} loaded" in ln), None)
    assert line is not None, log
    assert "skipped: fc.weight (shape [3, 512] vs [4, 512]), fc.bias (shape [3] vs [4])" in line
    model_line = next(ln for ln in log.splitlines() if "[MODEL] fold=0" in ln)
    assert f"weights=init_from {best} (" in model_line
    assert "preprocessing" not in log  # the same size, crop and normalisation: nothing to warn about


def test_a_run_of_other_classes_skips_its_head_and_other_preprocessing_is_warned(tmp_path: Path,
                                                                                   source_run: Path) -> None:
    """The same number of classes under other names (a pills run into the digits config) loaded the head as if the
    classes were the same ("loaded 86/86 tensors, skipped: none"): the head is skipped and the [MODEL] lines say
    so. The source trained at 32 px, this config at 48: a warning names the difference."""
    config = _config(tmp_path, ("x", "y", "z"))
    result = run_cli("train", "--config", str(config), f"model.init_from={source_run}", "train.img_size=48",
                     cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    log = (only_run_dir(tmp_path / "exp") / "train.log").read_text()
    best = source_run / "ckpt" / "best_fold0.pth"
    line = next((ln for ln in log.splitlines() if f"[MODEL] init_from={best} loaded" in ln), None)
    assert line is not None, log
    n = len(torch.load(best, weights_only=True)["model"])
    assert f"loaded {n - 2}/{n} tensors; skipped: fc.weight (other classes), fc.bias (other classes)" in line, line
    assert "the source's classes a, b, c are not this run's x, y, z" in line, line
    model_line = next(ln for ln in log.splitlines() if "[MODEL] fold=0" in ln)
    assert f"weights=init_from {best} ({n - 2}/{n} tensors; head not loaded: other classes)" in model_line
    warns = [ln for ln in log.splitlines() if "[WARN]" in ln and "preprocessing" in ln]
    assert len(warns) == 1 and "input 32x32 (this config: 48x48)" in warns[0], warns


@pytest.mark.parametrize(("classes", "head_loaded"), [(["a", "b", "c"], True), (["c", "b", "a"], False),
                                                      (["a", "b", "x"], False), (None, True)])
def test_the_head_loads_only_for_the_same_classes_in_the_same_order(source_run: Path, classes: list[str] | None,
                                                                    head_loaded: bool) -> None:
    m = ModelCfg(name="resnet10t", init_from=source_run)
    model = build_model("classification", m, 3)
    weights = init_weights(model, m, fold=0, classes=classes)
    source = torch.load(source_run / "ckpt" / "best_fold0.pth", weights_only=True)["model"]
    assert _equal_except(model, source, set() if head_loaded else {"fc.weight", "fc.bias"}) == []
    assert torch.equal(model.fc.weight, source["fc.weight"]) is head_loaded
    assert ("head not loaded: other classes" in weights) is not head_loaded, weights


def test_a_run_dir_gives_each_fold_its_own_best_checkpoint_else_fold_0(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    (run / "config.yaml").write_text("task: classification\n")
    first, second = (timm.create_model("resnet10t", num_classes=3) for _ in range(2))
    _vistrain_ckpt(run / "ckpt" / "best_fold0.pth", first)
    _vistrain_ckpt(run / "ckpt" / "best_fold1.pth", second)
    m = ModelCfg(name="resnet10t", init_from=run)
    for fold, src in ((1, second), (2, first)):
        model = build_model("classification", m, 3)
        assert init_weights(model, m, fold=fold).startswith(f"init_from {run / 'ckpt' / f'best_fold{fold % 2}.pth'}")
        assert _equal_except(model, src.state_dict(), set()) == []


def test_embedding_run_into_embedding_model_keeps_backbone_and_neck(tmp_path: Path) -> None:
    src = EmbeddingModel("resnet10t", num_classes=10, embedding_dim=64)
    ckpt = _vistrain_ckpt(tmp_path / "best_fold0.pth", src)
    m = ModelCfg(name="resnet10t", embedding_dim=64, init_from=ckpt)
    model = build_model("embedding", m, 3)
    init_weights(model, m, fold=0)
    assert _equal_except(model, src.state_dict(), {"head.weight"}) == []


def test_classifier_run_into_embedding_backbone(tmp_path: Path, source_run: Path) -> None:
    m = ModelCfg(name="resnet10t", init_from=source_run / "ckpt" / "best_fold0.pth")
    model = build_model("embedding", m, 5)
    init_weights(model, m, fold=0)
    source = torch.load(source_run / "ckpt" / "best_fold0.pth", weights_only=True)["model"]
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    assert [k for k, v in backbone.items() if not torch.equal(v, source[k.removeprefix("backbone.")])] == []


def test_another_architecture_is_a_user_error_naming_the_file(tmp_path: Path) -> None:
    ckpt = _vistrain_ckpt(tmp_path / "best_fold0.pth", timm.create_model("mobilenetv3_small_050", num_classes=3))
    m = ModelCfg(name="resnet10t", init_from=ckpt)
    with pytest.raises(UserError, match=r"model\.init_from: .*best_fold0\.pth matches \d+ of \d+"):
        init_weights(build_model("classification", m, 3), m, fold=0)


def test_init_from_that_does_not_exist_stops_before_the_run_directory(tmp_path: Path) -> None:
    from vistrain.engine.training import run_train

    cfg = load_config(_config(tmp_path, ("a", "b")), overrides=[f"model.init_from={tmp_path / 'nope'}"])
    with pytest.raises(UserError, match="model.init_from: .*nope"):
        run_train(cfg)
    assert not (tmp_path / "exp").exists() or not list((tmp_path / "exp").glob("*/*/run.json"))


@pytest.mark.parametrize("other", ["model.pretrained_path=w.pth", "model.pretrained=true"])
def test_init_from_with_other_weights_is_a_config_error(tmp_path: Path, other: str) -> None:
    config = _config(tmp_path, ("a", "b"))
    with pytest.raises(ConfigError, match=r"model\.init_from and model\.pretrained"):
        load_config(config, overrides=[f"model.init_from={tmp_path}", other])


# ------------------------------------------------------------------------------------------ pretrained_path

def test_pretrained_path_given_an_embedding_checkpoint_loads_its_backbone(tmp_path: Path) -> None:
    """The user's case: a re-id run's best_fold0.pth as pretrained_path used to load nothing, with a warning."""
    src = EmbeddingModel("resnet10t", num_classes=7)
    ckpt = _vistrain_ckpt(tmp_path / "reid" / "best_fold0.pth", src)
    config = _config(tmp_path, ("a", "b", "c"), pretrained_path=str(ckpt))
    result = run_cli("train", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    run = only_run_dir(tmp_path / "exp")
    log = (run / "train.log").read_text()
    assert f"[MODEL] pretrained_path={ckpt} loaded" in log, log
    n = len(torch.load(run / "ckpt" / "best_fold0.pth", weights_only=True)["model"])
    assert f"weights=pretrained_path {ckpt} (a vistrain checkpoint; {n - 2}/{n} tensors)" in log


def test_plain_state_dict_loads_and_reports_the_dropped_classifier(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = timm.create_model("resnet10t", num_classes=1000)
    path = tmp_path / "resnet10t.safetensors"
    save_file(src.state_dict(), str(path))
    m = ModelCfg(name="resnet10t", pretrained_path=path)
    model = build_model("classification", m, 3)
    n = len(model.state_dict())
    assert init_weights(model, m, fold=0) == f"timm pretrained (file {path}; {n - 2}/{n} tensors)"
    assert _equal_except(model, src.state_dict(), {"fc.weight", "fc.bias"}) == []


def test_half_of_the_backbone_loads_less_is_an_error(tmp_path: Path) -> None:
    src = timm.create_model("resnet10t", num_classes=3).state_dict()
    backbone = [k for k in src if not k.startswith("fc.")]
    half = (len(backbone) + 1) // 2
    keep = tmp_path / "half.pth"
    torch.save({k: src[k] for k in backbone[:half]}, keep)
    m = ModelCfg(name="resnet10t", pretrained_path=keep)
    init_weights(build_model("classification", m, 3), m, fold=0)
    short = tmp_path / "short.pth"
    torch.save({k: src[k] for k in backbone[:half - 1]}, short)
    m = ModelCfg(name="resnet10t", pretrained_path=short)
    with pytest.raises(UserError, match=rf"model\.pretrained_path: {short} matches {half - 1} of {len(backbone)}"):
        init_weights(build_model("classification", m, 3), m, fold=0)


def test_pretrained_path_with_no_matching_name_exits_2_naming_the_file(tmp_path: Path) -> None:
    """Another layout (here every key under "encoder.") used to load nothing with only timm's warning."""
    path = tmp_path / "encoder.pth"
    torch.save({f"encoder.{k}": v for k, v in timm.create_model("resnet10t").state_dict().items()}, path)
    config = _config(tmp_path, ("a", "b"), pretrained_path=str(path))
    result = run_cli("train", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2, describe(result)
    assert "model.pretrained_path" in result.stdout + result.stderr and str(path) in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert last_line(result.stdout) == "[EXIT] TRAINING ERROR code=2", describe(result)


def test_random_init_is_said_in_the_model_line(source_run: Path) -> None:
    log = (source_run / "train.log").read_text()
    assert "weights=random init" in next(ln for ln in log.splitlines() if "[MODEL] fold=0" in ln)
    assert json.loads((source_run / "run.json").read_text())["status"] == "success"
