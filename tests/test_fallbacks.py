"""Every fallback is visible and can be made strict (issue 21 item 4): where vistrain does something other than what
was asked because it cannot do that here (int8 static -> dynamic quantisation, torch.compile -> eager, export --verify
on random inputs, a checkpoint's preprocessing assumed, bf16 / fp16 on a CPU), the run's or the export's JSON says what
happened and why (``fallbacks``), and ``--strict`` / ``strict=True`` makes it an error: one line naming the fallback and
how to avoid it, exit 1, no traceback."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from conftest import tiny_config, write_csv_dataset, write_yaml
from torch import nn

from vistrain import cli
from vistrain.config import load_config
from vistrain.engine.training import run_train
from vistrain.errors import FallbackRefused
from vistrain.fallbacks import Fallbacks

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

PREPROCESS = {"crop": "center_square", "clahe": {"enabled": True}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A one-fold, one-epoch run with centre crop + CLAHE (what a checkpoint without its preprocessing loses)."""
    root = tmp_path_factory.mktemp("fallbacks")
    data = write_csv_dataset(root / "data", per_class=6)
    cfg = tiny_config(data.root, train={"epochs": 1}, preprocess=PREPROCESS,
                      output={"exp_dir": str(root / "exp"), "logs_dir": None}, tracking={"tensorboard": False})
    return {"root": root, "data": data, "cfg": cfg, "run": run_train(load_config(write_yaml(root / "cfg.yaml", cfg))
                                                                     ).run_dir}


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a refused fallback prints (stderr), checked to be the only one, without a traceback."""
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --strict: "), err
    assert "Traceback" not in out + err and "--debug" not in err, out + err
    return lines[0]


def legacy_copy(run: Path, dst: Path) -> Path:
    """``run`` as vistrain wrote it before checkpoints recorded their preprocessing: ``data_config`` only."""
    shutil.copytree(run, dst)
    path = dst / "ckpt" / "best_fold0.pth"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    spec = ckpt.pop("preprocess")
    ckpt["data_config"] = {"img_size": spec["resize"]["size"], "mean": spec["normalize"]["mean"],
                           "std": spec["normalize"]["std"]}
    torch.save(ckpt, path)
    return dst


# ------------------------------------------------------------------------------------------------ export int8

def test_int8_static_falling_back_to_dynamic_is_in_export_json_and_strict_refuses_it(
        trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime.quantization as q

    from vistrain.engine import deploy

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("calibration exploded")

    monkeypatch.setattr(q, "quantize_static", broken)
    monkeypatch.setattr(deploy, "BENCH_BUDGET_S", 0.2)
    out = tmp_path / "lenient"
    assert cli.main(["export", str(trained["run"]), "--quantize", "int8", "--output", str(out)]) == 0
    report = json.loads((out / "export.json").read_text())
    int8 = report["models"][0]["files"][1]
    assert int8["quantization"]["method"] == "dynamic"
    fallback = int8["quantization"]["fallback"]
    assert fallback["from"] == "static" and fallback["to"] == "dynamic" and "calibration exploded" in fallback["reason"]
    assert [(f["what"], f["from"], f["to"], f["fold"]) for f in report["fallbacks"]] == [
        ("export --quantize int8", "static", "dynamic", 0)]
    capsys.readouterr()

    strict = tmp_path / "strict"
    assert cli.main(["export", str(trained["run"]), "--quantize", "int8", "--output", str(strict), "--strict"]) == 1
    line = error_line(capsys)
    assert "int8" in line and "static" in line and "dynamic" in line and "calibration exploded" in line, line
    assert "without --strict" in line, line
    assert not (strict / "model_fold0.int8.onnx").exists()


def test_int8_without_quantisation_pre_processing_is_a_fallback_too(trained: dict, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from vistrain.engine import deploy

    def broken(src: Path, dst: Path) -> None:
        raise RuntimeError("shape inference exploded")

    assert cli.main(["export", str(trained["run"]), "--output", str(tmp_path)]) == 0
    monkeypatch.setattr(deploy, "_pre_process", broken)
    src, calib = tmp_path / "model_fold0.onnx", [torch.zeros(2, 3, 32, 32).numpy()]
    notes = Fallbacks()
    info = deploy.quantize_int8(src, tmp_path / "a.int8.onnx", calib, fallbacks=notes)
    assert info["method"] == "static" and "shape inference exploded" in info["pre_process_failed"]
    assert [(f["from"], f["to"]) for f in notes.entries] == [("quant_pre_process", "the exported graph as is")]
    with pytest.raises(FallbackRefused, match=r"^--strict: export --quantize int8: .*shape inference exploded"):
        deploy.quantize_int8(src, tmp_path / "b.int8.onnx", calib, fallbacks=Fallbacks(strict=True))


# ------------------------------------------------------------------------------------------ export --verify

def test_verify_on_random_inputs_is_in_export_json_and_strict_refuses_it(
        trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "moved"
    shutil.copytree(trained["run"], run)
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    splits["path"] = [str(tmp_path / "gone" / Path(p).name) for p in splits["path"]]  # the images moved away
    splits.to_csv(run / "splits.csv", index=False)
    assert cli.main(["export", str(run), "--verify"]) == 0
    report = json.loads((run / "export" / "export.json").read_text())
    verify = report["models"][0]["verify"]
    assert verify["passed"] is True and verify["fallback"]["to"] == "random inputs"
    assert "splits.csv" in verify["fallback"]["reason"]
    assert [(f["what"], f["from"], f["to"]) for f in report["fallbacks"]] == [
        ("export --verify", "the run's images", "random inputs")]
    capsys.readouterr()

    assert cli.main(["export", str(run), "--verify", "--strict", "--output", str(tmp_path / "strict")]) == 1
    line = error_line(capsys)
    assert "--verify" in line and "random inputs" in line and "splits.csv" in line, line


def test_verify_on_the_runs_images_records_no_fallback(trained: dict, tmp_path: Path) -> None:
    assert cli.main(["export", str(trained["run"]), "--verify", "--strict", "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "export.json").read_text())
    assert report["fallbacks"] == [] and "fallback" not in report["models"][0]["verify"]


# ------------------------------------------------------------------------------------- legacy preprocessing

def test_legacy_preprocessing_is_in_metrics_json_and_export_json(trained: dict, tmp_path: Path) -> None:
    run = legacy_copy(trained["run"], tmp_path / "old")
    assert cli.main(["evaluate", str(run), "--split", "val"]) == 0
    (entry,) = json.loads((run / "eval" / "val" / "metrics.json").read_text())["fallbacks"]
    assert entry["what"] == "preprocessing" and entry["fold"] == 0
    assert "crop=none" in entry["to"] and "clahe=off" in entry["to"] and "input=32x32" in entry["to"], entry
    assert "best_fold0.pth" in entry["reason"], entry
    assert cli.main(["export", str(run)]) == 0
    assert [f["what"] for f in json.loads((run / "export" / "export.json").read_text())["fallbacks"]] == [
        "preprocessing"]


@pytest.mark.parametrize("command", [["evaluate", "--split", "val"], ["predict", "--input", "{images}"], ["export"]])
def test_strict_refuses_legacy_preprocessing(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             command: list[str]) -> None:
    run = legacy_copy(trained["run"], tmp_path / "old")
    args = [a.replace("{images}", str(trained["data"].image_dir)) for a in command[1:]]
    assert cli.main([command[0], str(run), *args, "--strict"]) == 1
    line = error_line(capsys)
    assert "preprocessing" in line and "best_fold0.pth" in line and "crop=none" in line, line
    assert not (run / "eval").exists() and not (run / "export").exists() and not (run / "predictions.csv").exists()


def test_serve_records_legacy_preprocessing_in_metadata_and_strict_refuses_it(trained: dict, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from vistrain.serving.predictor import load_predictor

    run = legacy_copy(trained["run"], tmp_path / "old")
    assert [f["what"] for f in load_predictor(run).metadata()["fallbacks"]] == ["preprocessing"]
    assert load_predictor(trained["run"]).metadata()["fallbacks"] == []
    with pytest.raises(FallbackRefused, match=r"^--strict: preprocessing: .*best_fold0.pth"):
        load_predictor(run, strict=True)


def test_serve_records_an_onnx_file_without_its_preprocessing_and_strict_refuses_it(trained: dict,
                                                                                    tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    import onnx

    from vistrain.serving.predictor import load_predictor

    assert cli.main(["export", str(trained["run"]), "--output", str(tmp_path)]) == 0
    model = onnx.load(str(tmp_path / "model_fold0.onnx"))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != "vistrain.preprocess"]
    del model.metadata_props[:]
    for key, value in kept:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    old = tmp_path / "old.onnx"
    onnx.save(model, str(old))
    (entry,) = load_predictor(old).metadata()["fallbacks"]
    assert entry["what"] == "preprocessing" and "crop=none" in entry["to"] and "vistrain.preprocess" in entry["reason"]
    with pytest.raises(FallbackRefused, match=r"^--strict: preprocessing: .*old.onnx"):
        load_predictor(old, strict=True)


# -------------------------------------------------------------------------------------------- torch.compile

@pytest.fixture
def dynamo_reset() -> Any:
    yield
    torch._dynamo.reset()


def test_compile_unavailable_is_noted_and_strict_refuses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from vistrain.models.build import compile_model

    def broken(self: nn.Module, *a: Any, **k: Any) -> None:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(nn.Module, "compile", broken)
    notes = Fallbacks()
    compile_model(nn.Linear(4, 2), True, notes)
    assert notes.entries == [{"what": "train.compile", "from": "torch.compile", "to": "eager",
                              "reason": "RuntimeError: no compiler here"}]
    with pytest.raises(FallbackRefused, match=r"^--strict: train\.compile: .*no compiler here.*train\.compile: false"):
        compile_model(nn.Linear(4, 2), True, Fallbacks(strict=True))


def test_a_graph_that_fails_to_compile_at_its_first_step_is_noted_and_strict_refuses_it(
        monkeypatch: pytest.MonkeyPatch, dynamo_reset: None) -> None:
    """torch.compile is lazy: a compiler missing here shows at the first forward, where torch runs the graph eagerly
    (``suppress_errors``) and only logs it."""
    from vistrain.models.build import compile_fallbacks, compile_model

    def no_backend(gm: Any, example_inputs: Any) -> Any:
        raise RuntimeError("no C++ compiler found")

    compile_ = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **k: compile_(self, backend=no_backend))
    monkeypatch.setattr(logging.getLogger("torch._dynamo.convert_frame"), "propagate", False)  # torch's own warning
    notes = Fallbacks()
    model, x = nn.Sequential(nn.Linear(4, 3), nn.ReLU()), torch.randn(2, 4)
    with compile_fallbacks(True, notes):
        compile_model(model, True, notes)
        assert torch.equal(model(x), model._call_impl(x))  # ran eagerly
    (entry,) = notes.entries
    assert entry["what"] == "train.compile" and entry["to"] == "eager" and "no C++ compiler found" in entry["reason"]

    torch._dynamo.reset()
    strict, model = Fallbacks(strict=True), nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    with compile_fallbacks(True, strict), pytest.raises(FallbackRefused, match="no C\\+\\+ compiler found"):
        compile_model(model, True, strict)
        model(x)


# ----------------------------------------------------------------------------------------- training end to end

def test_training_records_its_fallbacks_in_summary_json_and_strict_refuses_them(
        trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(self: nn.Module, *a: Any, **k: Any) -> None:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(nn.Module, "compile", broken)
    cfg = {**trained["cfg"], "output": {"exp_dir": str(tmp_path / "exp"), "logs_dir": None},
           "train": {**trained["cfg"]["train"], "compile": True, "amp": "bf16"}}
    run = run_train(load_config(write_yaml(tmp_path / "cfg.yaml", cfg))).run_dir
    summary = json.loads((run / "summary.json").read_text())
    assert sorted((f["what"], f["from"], f["to"]) for f in summary["fallbacks"]) == [
        ("train.amp", "bf16", "fp32"), ("train.compile", "torch.compile", "eager")]
    assert summary["environment"]["precision"] == "fp32"
    capsys.readouterr()

    for override, named in (("train.amp=bf16", "train.amp"), ("train.amp=fp32", "train.compile")):
        before = set((tmp_path / "exp").glob("*/*"))
        assert cli.main(["train", "--config", str(tmp_path / "cfg.yaml"), "--strict", override]) == 1
        out, err = capsys.readouterr()
        (line,) = err.strip().splitlines()
        assert line.startswith(f"error: --strict: {named}: ") and "Traceback" not in out + err, out + err
        (failed,) = set((tmp_path / "exp").glob("*/*")) - before
        status = json.loads((failed / "run.json").read_text())
        assert status["status"] == "error" and status["exit_code"] == 1 and status["error"] == line[len("error: "):]


def test_train_with_nothing_to_fall_back_from_records_an_empty_list(trained: dict) -> None:
    assert json.loads((trained["run"] / "summary.json").read_text())["fallbacks"] == []


def test_strict_with_optimize_is_refused_not_ignored(trained: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """A study's trials do not take --strict yet: saying so beats a --strict that silently does nothing."""
    assert cli.main(["train", "--config", str(trained["root"] / "cfg.yaml"), "--optimize", "--strict"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --strict: not with --optimize; train the best values with "
                                              "--strict afterwards")
