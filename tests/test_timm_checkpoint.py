"""Checkpoints written by timm's ``train.py`` (``timm.utils.CheckpointSaver``: ``state_dict``, ``state_dict_ema``,
``optimizer``, ``epoch``, ``arch``, ``args`` as an ``argparse.Namespace``) as ``model.pretrained_path`` /
``model.init_from``, and ``vistrain convert-checkpoint IN OUT [--trust] [--ema]``.

The checkpoints are made by timm's own CheckpointSaver around a resnet10t, an SGD optimiser and a ModelEmaV3; the
converted files are checked with safetensors and timm, not with vistrain's reader."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from conftest import describe, only_run_dir, run_cli, tiny_config, write_csv_dataset, write_yaml
from safetensors import safe_open
from timm.utils import CheckpointSaver, ModelEmaV3

import vistrain
from vistrain.config import load_config
from vistrain.config.schema import ModelCfg
from vistrain.engine.checkpoint import atomic_save
from vistrain.errors import ConfigError, UserError
from vistrain.models.build import build_model
from vistrain.models.init import init_weights

CLASSES = 3
HEAD = ("fc.weight", "fc.bias")


def timm_train_checkpoint(folder: Path, ema: bool = True) -> Path:
    """``folder/model_best.pth.tar`` as timm's train.py writes it after one step: its CheckpointSaver with the
    model, the optimiser, the arguments (a Namespace) and the EMA model (decay 0.5, so its weights differ)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model_ema = ModelEmaV3(model, decay=0.5) if ema else None
    args = argparse.Namespace(model="resnet10t", lr=0.5, epochs=1, model_ema=ema, img_size=32)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()
    if model_ema is not None:
        model_ema.update(model)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=model_ema, checkpoint_dir=str(folder),
                            recovery_dir=str(folder))
    saver.save_checkpoint(epoch=0, metric=0.5)
    return folder / "model_best.pth.tar"


def trusted(path: Path) -> dict[str, Any]:
    """The test's own full read of a checkpoint it wrote (never vistrain's reader)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def without_args(src: Path, dst: Path, ddp: bool = True) -> Path:
    """The checkpoint with ``args`` removed (what a user who strips it keeps): tensors and plain values only;
    ``ddp``: the weights under DDP's ``module.`` prefix, as a wrapped model saves them."""
    ckpt = trusted(src)
    del ckpt["args"]
    if ddp:
        ckpt["state_dict"] = {f"module.{k}": v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, dst)
    torch.load(dst, weights_only=True)  # the safe unpickler reads it
    return dst


@pytest.fixture(scope="module")
def timm_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return timm_train_checkpoint(tmp_path_factory.mktemp("timm") / "output" / "train" / "run1")


def differing(model: torch.nn.Module, source: dict[str, torch.Tensor], skipped: tuple[str, ...] = HEAD) -> list[str]:
    """The model's tensors (``skipped`` left out) that are not equal to ``source``'s."""
    return [k for k, v in model.state_dict().items() if k not in skipped and not torch.equal(v, source[k])]


def start(path: Path, key: str = "pretrained_path", classes: int = CLASSES, **model: Any) -> tuple:
    """A classifier built as training builds it and ``init_weights`` with ``model.<key>: path``."""
    m = ModelCfg(name="resnet10t", **{key: path}, **model)
    built = build_model("classification", m, classes)
    return built, init_weights(built, m, fold=0)


def error_lines(result: Any) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]


# --------------------------------------------------------------------------- a checkpoint with a Namespace inside

@pytest.mark.parametrize("key", ["pretrained_path", "init_from"])
def test_a_train_py_checkpoint_names_the_namespace_and_the_command_that_extracts_its_weights(
        timm_ckpt: Path, key: str) -> None:
    with pytest.raises(UserError) as err:
        start(timm_ckpt, key)
    text = str(err.value)
    out = timm_ckpt.parent / "model_best.safetensors"
    assert "\n" not in text and text.startswith(f"model.{key}: {timm_ckpt}"), text
    assert "argparse.Namespace" in text and "full unpickler" in text and "can run code" in text, text
    assert text.endswith(f"vistrain convert-checkpoint {timm_ckpt} {out} --trust"), text


def test_training_on_it_exits_2_and_the_printed_command_makes_a_file_that_loads(timm_ckpt: Path,
                                                                                tmp_path: Path) -> None:
    data = write_csv_dataset(tmp_path / "data", per_class=4)
    cfg = tiny_config(data.root, output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None},
                      tracking={"tensorboard": False}, train={"epochs": 1}, model={"pretrained_path": str(timm_ckpt)})
    config = write_yaml(tmp_path / "cfg.yaml", cfg)
    result = run_cli("train", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2, describe(result)
    (line,) = error_lines(result)
    out = timm_ckpt.parent / "model_best.safetensors"
    assert "argparse.Namespace" in line and "Traceback" not in result.stderr, describe(result)
    assert line.endswith(f"extract its weights with: vistrain convert-checkpoint {timm_ckpt} {out} --trust"), line
    command = shlex.split(line.split("extract its weights with: ", 1)[1])
    converted = run_cli(*command[1:], cwd=tmp_path)
    assert converted.returncode == 0, describe(converted)
    assert "fully unpickled" in converted.stdout + converted.stderr, describe(converted)
    model, weights = start(out)  # the weights a run starts from, before any step
    assert differing(model, trusted(timm_ckpt)["state_dict"], skipped=()) == []
    n = len(model.state_dict())
    origin = f"pretrained_path {out} (a timm train.py checkpoint: resnet10t, epoch 0, state_dict; {n}/{n} tensors)"
    assert weights == origin, weights
    again = run_cli("train", "--config", str(config), f"model.pretrained_path={out}",
                    f"output.exp_dir={tmp_path / 'exp2'}", cwd=tmp_path)
    assert again.returncode == 0, describe(again)
    log = (only_run_dir(tmp_path / "exp2") / "train.log").read_text()
    assert f"[MODEL] pretrained_path={out} loaded {n}/{n} tensors; skipped: none" in log, log
    assert f"weights={origin}" in next(ln for ln in log.splitlines() if "[MODEL] fold=0" in ln)


# ------------------------------------------------------------------------ without the Namespace: read directly

@pytest.mark.parametrize("key", ["pretrained_path", "init_from"])
def test_a_checkpoint_without_args_loads_with_the_safe_unpickler(timm_ckpt: Path, tmp_path: Path, key: str) -> None:
    path = without_args(timm_ckpt, tmp_path / "stripped.pth.tar")
    model, weights = start(path, key, classes=5)  # another class count: the head is skipped
    assert differing(model, trusted(timm_ckpt)["state_dict"]) == []
    n = len(model.state_dict())
    assert weights == f"{key} {path} (a timm train.py checkpoint: resnet10t, epoch 0, state_dict; " \
                      f"{n - 2}/{n} tensors)", weights


def test_training_from_it_says_so_in_the_model_line(timm_ckpt: Path, tmp_path: Path) -> None:
    path = without_args(timm_ckpt, tmp_path / "stripped.pth.tar")
    data = write_csv_dataset(tmp_path / "data", per_class=4)
    cfg = tiny_config(data.root, output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None},
                      tracking={"tensorboard": False}, train={"epochs": 1},
                      model={"pretrained_path": str(path), "use_ema_weights": True})
    result = run_cli("train", "--config", str(write_yaml(tmp_path / "cfg.yaml", cfg)), cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    log = (only_run_dir(tmp_path / "exp") / "train.log").read_text()
    line = next(ln for ln in log.splitlines() if "[MODEL] fold=0" in ln)
    assert f"weights=pretrained_path {path} (a timm train.py checkpoint: resnet10t, epoch 0, state_dict_ema; " in line


# ------------------------------------------------------------------------------------------- use_ema_weights

def test_use_ema_weights_takes_state_dict_ema(timm_ckpt: Path, tmp_path: Path) -> None:
    path = without_args(timm_ckpt, tmp_path / "stripped.pth.tar")
    ckpt = trusted(timm_ckpt)
    assert differing(_loaded(ckpt["state_dict"]), ckpt["state_dict_ema"]) != [], "the test needs EMA != weights"
    model, weights = start(path, use_ema_weights=True)
    assert differing(model, ckpt["state_dict_ema"], skipped=()) == []
    assert "state_dict_ema" in weights, weights
    model, _ = start(path)
    assert differing(model, ckpt["state_dict"], skipped=()) == []


def _loaded(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = timm.create_model("resnet10t", num_classes=CLASSES)
    model.load_state_dict(state)
    return model


def test_use_ema_weights_on_a_checkpoint_without_ema_is_one_line_naming_the_key_and_the_files_keys(
        tmp_path: Path) -> None:
    path = without_args(timm_train_checkpoint(tmp_path / "no_ema", ema=False), tmp_path / "no_ema.pth.tar")
    with pytest.raises(UserError) as err:
        start(path, use_ema_weights=True)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"model.use_ema_weights: {path}"), text
    assert "state_dict_ema" in text and all(k in text for k in ("state_dict", "epoch", "arch", "optimizer")), text


def test_use_ema_weights_without_a_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.use_ema_weights: .* model\.pretrained_path or model\.init_from"):
        load_config(None, overrides=["model.use_ema_weights=true"])


# ---------------------------------------------------------------------------------------- convert-checkpoint

def test_convert_without_trust_refuses_the_namespace_file_in_one_line(timm_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    result = run_cli("convert-checkpoint", str(timm_ckpt), str(out), cwd=tmp_path)
    assert result.returncode == 2, describe(result)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "argparse.Namespace" in lines[0] and "--trust" in lines[0], describe(result)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_convert_refuses_an_output_that_is_not_safetensors(timm_ckpt: Path, tmp_path: Path) -> None:
    result = run_cli("convert-checkpoint", str(timm_ckpt), str(tmp_path / "w.pth"), "--trust", cwd=tmp_path)
    assert result.returncode == 2, describe(result)
    (line,) = error_lines(result)
    assert "w.pth" in line and ".safetensors" in line, describe(result)
    assert not (tmp_path / "w.pth").exists()


def test_convert_keeps_an_existing_output_unless_forced(timm_ckpt: Path, tmp_path: Path) -> None:
    """The suggested OUT sits beside IN: for a run's checkpoint that is the run's own best_fold0.safetensors."""
    out = tmp_path / "best_fold0.safetensors"
    out.write_bytes(b"the run's weights")
    result = run_cli("convert-checkpoint", str(timm_ckpt), str(out), "--trust", cwd=tmp_path)
    assert result.returncode == 2, describe(result)
    (line,) = error_lines(result)
    assert str(out) in line and "--force" in line, describe(result)
    assert out.read_bytes() == b"the run's weights"
    result = run_cli("convert-checkpoint", str(timm_ckpt), str(out), "--trust", "--force", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    with safe_open(str(out), framework="pt") as fh:
        assert fh.keys()


@pytest.mark.parametrize("ema", [False, True])
def test_converted_file_opens_with_safetensors_and_timm_loads_it(timm_ckpt: Path, tmp_path: Path,
                                                                 ema: bool) -> None:
    out = tmp_path / "resnet10t.safetensors"
    result = run_cli("convert-checkpoint", str(timm_ckpt), str(out), "--trust", *(["--ema"] if ema else []),
                     cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    assert str(out) in result.stdout, describe(result)
    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
    entry = "state_dict_ema" if ema else "state_dict"
    assert str(timm_ckpt) in meta["source"] and "resnet10t" in meta["arch"] and meta["epoch"] == "0", meta
    assert entry in meta["weights"], meta
    model = timm.create_model("resnet10t", pretrained=True,
                              pretrained_cfg_overlay={"file": str(out), "num_classes": CLASSES})
    assert differing(model, trusted(timm_ckpt)[entry], skipped=()) == []
    strict = timm.create_model("resnet10t", num_classes=CLASSES)
    strict.load_state_dict(timm.models.load_state_dict(str(out)), strict=True)


def test_a_converted_ema_file_loads_with_use_ema_weights(timm_ckpt: Path, tmp_path: Path) -> None:
    out = vistrain.convert_checkpoint(timm_ckpt, tmp_path / "ema.safetensors", trust=True, ema=True)
    model, weights = start(out, use_ema_weights=True)
    assert differing(model, trusted(timm_ckpt)["state_dict_ema"], skipped=()) == []
    plain = vistrain.convert_checkpoint(timm_ckpt, tmp_path / "plain.safetensors", trust=True)
    with pytest.raises(UserError, match=r"model\.use_ema_weights: .*plain\.safetensors.*--ema"):
        start(plain, use_ema_weights=True)


def test_convert_reads_a_checkpoint_without_args_safely_and_a_vistrain_checkpoint_and_a_state_dict(
        timm_ckpt: Path, tmp_path: Path) -> None:
    stripped = vistrain.convert_checkpoint(without_args(timm_ckpt, tmp_path / "s.pth.tar"), tmp_path / "s.safetensors")
    assert differing(_loaded(timm.models.load_state_dict(str(stripped))), trusted(timm_ckpt)["state_dict"]) == []

    net, ema = (timm.create_model("resnet10t", num_classes=CLASSES) for _ in range(2))
    atomic_save({"model": net.state_dict(), "ema": ema.state_dict(), "epoch": 3, "fold": 0, "classes": ["a", "b", "c"],
                 "task": "classification", "vistrain_version": "0.1.0"}, tmp_path / "best_fold0.pth")
    ours = vistrain.convert_checkpoint(tmp_path / "best_fold0.pth", tmp_path / "ours.safetensors")
    assert differing(_loaded(timm.models.load_state_dict(str(ours))), ema.state_dict(), skipped=()) == []
    with safe_open(str(ours), framework="pt") as fh:
        assert fh.metadata()["classes"] == '["a", "b", "c"]'

    torch.save(net.state_dict(), tmp_path / "plain.bin")
    plain = vistrain.convert_checkpoint(tmp_path / "plain.bin", tmp_path / "plain.safetensors")
    assert differing(_loaded(timm.models.load_state_dict(str(plain))), net.state_dict(), skipped=()) == []
