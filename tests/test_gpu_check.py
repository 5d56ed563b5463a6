"""``benchmarks/gpu_check.sh``: the one command that measures everything a GPU is needed for. What must hold without
a GPU: every step runs (``--cpu``), and a step that fails or hangs costs only its own figures, never the JSON."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env

ROOT = Path(__file__).resolve().parents[1]


def driver(monkeypatch):
    """benchmarks/gpu_check.py as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_failed_and_a_hung_step_keep_the_other_steps_figures(tmp_path, monkeypatch):
    gc = driver(monkeypatch)
    reid = tmp_path / "reid.json"
    figures = {"numpy_path": {"wall_s": 2.0}, "torch_path": {"device": "cuda", "wall_s": 0.5}}
    steps = [
        gc.Step("env", python('print("torch 9"); print(\'{"torch": "9", "gpu": null}\')'), 30),
        gc.Step("reid_eval", python(f"import json; json.dump({figures!r}, open({str(reid)!r}, 'w'))"), 30, reid),
        gc.Step("gpu_tests", python("import sys; print('3 failed'); sys.exit(3)"), 30, tmp_path / "none.xml"),
        # hangs, and so does a child holding its output: the whole process group must go at the step's limit
        # its own limit is longer than the budget left: the budget stops it
        gc.Step("data", python("import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"), 100),
        gc.Step("compile", python("print('never')"), 30),  # no budget left
    ]
    monkeypatch.setattr(gc, "plan", lambda args, work: steps)
    monkeypatch.setattr(gc, "MIN_STEP_S", 3)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))  # the device tool's folder: the default place of the JSON
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--budget-s", "10"])
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as exited:
        gc.main()
    assert exited.value.code == 1  # not every step succeeded
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    got = report["steps"]
    assert {name: s["status"] for name, s in got.items()} == {
        "env": "ok", "reid_eval": "ok", "gpu_tests": "failed", "data": "timeout", "compile": "skipped"}
    assert got["env"]["result"] == {"torch": "9", "gpu": None}
    assert got["gpu_tests"]["returncode"] == 3 and "3 failed" in got["gpu_tests"]["output_tail"]
    assert got["gpu_tests"]["result"] is None
    assert got["data"]["seconds"] < 15
    assert report["summary"]["reid_eval"]["wall_s"] == 0.5 and report["summary"]["reid_eval"]["numpy_path_wall_s"] == 2
    assert report["summary"]["steps_not_ok"] == {"gpu_tests": "failed", "data": "timeout", "compile": "skipped"}
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "===== gpu_tests: failed" in log and "===== data: timeout" in log


def test_unknown_steps_are_named_with_the_valid_ones(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--steps", "env,gpus",
                          "--out", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "--steps: unknown gpus; valid: env, gpu_tests, reid_eval, data, ratios_resnet50" in res.stderr


@pytest.mark.slow
@pytest.mark.sweep
def test_cpu_mode_runs_every_step_and_writes_the_json(tmp_path):
    """The whole script at toy sizes, as the suite can run it: proves each step's command line is right."""
    out = tmp_path / "gpu_check.json"
    env = {**{k: v for k, v in cli_env().items() if k != "OUT"}, "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())
    assert res.returncode == 0, (res.stdout[-3000:], {n: s.get("output_tail") for n, s in report["steps"].items()})
    assert report["mode"] == "cpu"
    assert set(report["summary"]["steps_ok"]) == {"env", "gpu_tests", "reid_eval", "data", "ratios_resnet50",
                                                  "ratios_resnet18", "compile"}
    summary = report["summary"]
    assert summary["gpu_tests"]["failures"] == 0 and summary["gpu_tests"]["errors"] == 0
    for name in ("ratios_resnet50", "ratios_resnet18"):
        assert set(summary[name]["ratio_to_ceiling"]) == {"off", "cache"}  # cache+device: GPU only
        assert summary[name]["cache/off"] > 0
    assert summary["compile"]["ceiling_compiled/eager"] > 0
    assert summary["reid_eval"]["device"] == "cpu" and summary["reid_eval"]["max_metric_diff_vs_numpy_path"] < 1e-9
