"""Untrusted files (issue 12 item 6): checkpoints hold only tensors and plain values and load with the safe
unpickler; a pickle that would run code (in ``ckpt/last_fold0.pth`` for ``--resume``, or as
``model.pretrained_path``) is refused with exit 2 naming the file, and its code never runs; the weights are also
written as ``.safetensors``, which ``model.pretrained_path`` accepts."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import describe, only_run_dir, run_cli, run_dirs, tiny_config, write_csv_dataset, write_yaml
from safetensors.torch import load_file, safe_open


class Evil:
    """Unpickling this creates ``marker``: proof that the file's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # noqa: D105
        return (open, (str(self.marker), "w"))


def write_evil(path: Path, marker: Path, plain_pickle: bool = False) -> Path:
    """A checkpoint-shaped file (torch.save's zip, or a bare pickle) whose unpickling would create ``marker``."""
    obj = {"model": Evil(marker), "vistrain_version": "0.1.0"}
    if plain_pickle:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A finished 1-epoch run with train.save_every_n_epochs=1 (so epoch checkpoints too)."""
    root = tmp_path_factory.mktemp("untrusted")
    data = write_csv_dataset(root / "data", per_class=6)
    cfg = tiny_config(data.root, output={"exp_dir": str(root / "exp"), "logs_dir": None},
                      tracking={"tensorboard": False}, train={"epochs": 1, "save_every_n_epochs": 1})
    config = write_yaml(root / "cfg.yaml", cfg)
    result = run_cli("train", "--config", str(config), cwd=root)
    assert result.returncode == 0, describe(result)
    return {"root": root, "data": data, "config": config, "run": only_run_dir(root / "exp")}


def test_every_checkpoint_loads_with_the_safe_unpickler_and_has_safetensors_beside(flow: dict) -> None:
    ckpts = sorted((flow["run"] / "ckpt").glob("*.pth"))
    assert {p.name for p in ckpts} >= {"best_fold0.pth", "last_fold0.pth", "epoch1_fold0.pth"}
    for pth in ckpts:
        ckpt = torch.load(pth, map_location="cpu", weights_only=True)  # raises on anything but plain values
        side = pth.with_suffix(".safetensors")
        assert side.is_file(), f"no {side.name} beside {pth.name}"
        tensors = load_file(str(side))
        weights = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
        assert tensors.keys() == weights.keys()
        assert all(torch.equal(tensors[k], weights[k]) for k in tensors)
        with safe_open(str(side), framework="pt") as fh:
            meta = fh.metadata()
        assert json.loads(meta["classes"]) == ckpt["classes"] and json.loads(meta["fold"]) == 0


def _resumable_copy(flow: dict, name: str) -> Path:
    run = flow["root"] / name / flow["run"].name
    shutil.copytree(flow["run"], run)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "error"}))
    return run


def test_malicious_last_checkpoint_on_resume_is_exit_2_naming_it_and_never_runs(flow: dict, tmp_path: Path) -> None:
    run = _resumable_copy(flow, "evil_resume")
    marker = tmp_path / "pwned"
    last = write_evil(run / "ckpt" / "last_fold0.pth", marker)
    result = run_cli("train", "--resume", str(run), cwd=tmp_path)
    assert result.returncode == 2, describe(result)
    assert str(last) in result.stderr and "refused" in result.stderr, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    assert not marker.exists(), "the pickle's code ran"


def test_old_format_last_checkpoint_is_refused_with_a_clear_message(flow: dict, tmp_path: Path) -> None:
    """A last checkpoint as vistrain wrote it before (NumPy RNG state as an ndarray) needs the full unpickler."""
    run = _resumable_copy(flow, "old_format")
    last = run / "ckpt" / "last_fold0.pth"
    ckpt = torch.load(last, weights_only=True)
    ckpt["rng"]["numpy"] = np.random.get_state()
    torch.save(ckpt, last)
    result = run_cli("train", "--resume", str(run), cwd=tmp_path)
    assert result.returncode == 2, describe(result)
    assert f"{last}: refused" in result.stderr and "delete it to train that fold again" in result.stderr, \
        describe(result)


def _pretrained_run(flow: dict, tmp_path: Path, path: Path) -> tuple:
    exp = tmp_path / "exp"
    cfg = tiny_config(flow["data"].root, output={"exp_dir": str(exp), "logs_dir": None},
                      tracking={"tensorboard": False}, train={"epochs": 1}, model={"pretrained_path": str(path)})
    result = run_cli("train", "--config", str(write_yaml(tmp_path / "cfg.yaml", cfg)), cwd=tmp_path)
    return result, exp


def test_malicious_pretrained_path_is_exit_2_naming_it_and_never_runs(flow: dict, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = write_evil(tmp_path / "weights.pth", marker, plain_pickle=True)
    result, exp = _pretrained_run(flow, tmp_path, evil)
    assert result.returncode == 2, describe(result)
    assert f"model.pretrained_path: {evil}: refused" in result.stderr, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    assert not marker.exists(), "the pickle's code ran"
    (run,) = run_dirs(exp)
    assert json.loads((run / "run.json").read_text())["status"] == "error"


def test_pretrained_path_accepts_a_runs_safetensors(flow: dict, tmp_path: Path) -> None:
    source = flow["run"] / "ckpt" / "best_fold0.safetensors"
    result, exp = _pretrained_run(flow, tmp_path, source)
    assert result.returncode == 0, describe(result)
    log = (only_run_dir(exp) / "train.log").read_text()
    n = len(load_file(str(source)))
    assert f"pretrained_path={source} loaded {n}/{n} tensors" in log, log[-2000:]
    assert "a vistrain checkpoint" in log


def test_a_run_directorys_config_with_a_python_tag_is_exit_2_and_never_runs(flow: dict, tmp_path: Path) -> None:
    """config.yaml is read with yaml.safe_load: a ``!!python/object/apply`` tag is refused, not called."""
    run = _resumable_copy(flow, "evil_yaml")
    marker = tmp_path / "pwned"
    (run / "config.yaml").write_text(f'project: !!python/object/apply:os.system ["touch {marker}"]\n')
    from test_run_outcome import main_captured

    r = main_captured("train", "--resume", str(run))
    assert r.returncode == 2, describe(r)
    assert f"{run / 'config.yaml'}: line 1 not valid YAML" in r.stderr, describe(r)
    assert not marker.exists()
