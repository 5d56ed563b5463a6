"""Everything a GPU is needed to measure, in the time a GPU is lent: one command, one JSON.

    bash benchmarks/gpu_check.sh [--cpu] [--out PATH] [--budget-s 450] [--steps env,gpu_tests,...] [--data DIR]

(the shell script installs carried wheels first, then runs this driver). Steps, in this order, each a subprocess
with its own time limit, all inside ``--budget-s`` (a step that would start with less than 20 s left is skipped):

  env              python, torch, CUDA, the GPU (nvidia-smi), vistrain's imports that are missing
  gpu_tests        ``pytest -m gpu`` on the test files that hold GPU tests (junit XML: counts and failed names)
  reid_eval        ``benchmarks/bench_reid_eval.py`` at Market-1501 size on CUDA: torch path against the numpy path
  data             the JPEGs the throughput steps share (``benchmarks/throughput.py --generate-only``)
  ratios_resnet50  ``throughput.py`` as docs/performance.md, shortened (8,192 JPEGs, 2 epochs): off, cache and
  ratios_resnet18  cache+device as ratios to the ceiling, against the targets 0.95 (resnet50) and 0.90 (resnet18)
  compile          ``throughput.py`` resnet50 ``--compile both`` with no run: torch.compile's gain on the training
                   step (the ceiling), eager and compiled in one process

The JSON (``$OUT/gpu_check.json`` when ``$OUT`` is set, as the device tool collects ``$OUT``; else ``--out``) is
rewritten after every step, so a step that fails or runs out of time keeps the others' figures; every step's full
output goes to ``gpu_check.log`` beside it. ``--cpu`` runs every step at toy sizes on the CPU with compile switched
off (``TORCH_COMPILE_DISABLE=1``: a CPU compile takes minutes): it checks this script, not the GPU.

Only the standard library here: the driver must still write its JSON when vistrain or its dependencies do not import.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MIN_STEP_S = 20  # a step that would get less than this is skipped: it could not finish anyway
TAIL_CHARS = 3000  # of each step's output, kept in the JSON
TARGETS = {"resnet50": 0.95, "resnet18": 0.90}  # cache+device / ceiling, docs/performance.md (issue 11)

ENV_PROBE = r"""
import importlib.util, json, shutil, subprocess, torch
gpu = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    gpu = {"name": p.name, "memory_GiB": round(p.total_memory / 2**30, 1), "capability": [p.major, p.minor]}
smi = None
if shutil.which("nvidia-smi"):
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,clocks.sm",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
needed = ["pydantic", "yaml", "timm", "torchvision", "pandas", "sklearn", "cv2", "PIL", "tqdm", "matplotlib",
          "threadpoolctl", "safetensors", "kornia", "onnxruntime", "faiss", "pytest"]
def missing(name):
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu, "nvidia_smi": smi,
                  "missing_imports": [m for m in needed if missing(m)]}))
"""


@dataclass
class Step:
    name: str
    argv: list[str]
    cap_s: float  # this step's own time limit (the budget left may cut it shorter)
    result: Path | None = None  # the JSON (or junit XML) the step writes


def plan(args: argparse.Namespace, work: Path) -> list[Step]:
    """The steps with their sizes: the GPU's (about 6 minutes on an H100) or ``--cpu``'s toy ones."""
    py = sys.executable
    cores = os.cpu_count() or 1
    data = args.data or work / "jpegs"
    if args.cpu:
        images, size = "64", ["--image-size", "160x120"]
        train = ["--img-size", "32", "--batch", "16", "--epochs", "1", "--workers", "0", "--device", "cpu"]
        nets = {"resnet50": "resnet10t", "resnet18": "test_resnet"}  # stand-ins with the same step names
        reid = ["--queries", "60", "--gallery", "300", "--dim", "64", "--ids", "20", "--distractors", "30",
                "--ref-queries", "20", "--repeats", "1", "--device", "cpu"]
    else:
        images, size = "8192", ["--image-size", "470x360"]
        train = ["--img-size", "224", "--batch", "256", "--precision", "bf16", "--epochs", "2", "--policy", "hard",
                 "--workers", str(min(16, cores)), "--device", "cuda"]
        nets = {"resnet50": "resnet50", "resnet18": "resnet18"}
        reid = ["--repeats", "2", "--ref-queries", "200", "--device", "cuda"]
    bench = [py, str(ROOT / "benchmarks" / "throughput.py")]
    shared = [*train, *size, "--images", images, "--data", str(data)]
    gpu_files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                       if "mark.gpu" in p.read_text())
    steps = [
        Step("env", [py, "-c", ENV_PROBE], 60),
        Step("gpu_tests", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={work / 'gpu_tests.xml'}", *gpu_files], 150, work / "gpu_tests.xml"),
        Step("reid_eval", [py, str(ROOT / "benchmarks" / "bench_reid_eval.py"), *reid, "--json",
                           str(work / "reid.json")], 90, work / "reid.json"),
        Step("data", [*bench, "--generate-only", "--images", images, *size, "--data", str(data)], 60),
    ]
    for name, net in nets.items():
        steps.append(Step(f"ratios_{name}", [*bench, "--model", net, *shared, "--variants", "off,cache,cache+device",
                                             "--compile", "no", "--out", str(work / f"{name}.json")],
                          120 if name == "resnet50" else 90, work / f"{name}.json"))
    # the training step alone, eager then compiled, in one process: a compiled run would also compile the
    # evaluation graph, a minute more than the budget has
    steps.append(Step("compile", [*bench, "--model", nets["resnet50"], *shared, "--variants", "",
                                  "--compile", "both", "--out", str(work / "compile.json")], 150,
                      work / "compile.json"))
    return steps


def run_step(step: Step, env: dict[str, str], deadline: float, log: Path) -> dict[str, Any]:
    """Run one step within its limit and the budget left; its status, seconds, exit code and output's tail."""
    left = deadline - time.monotonic()
    if left < MIN_STEP_S:
        return {"status": "skipped", "why": f"{left:.0f} s left of the budget"}
    limit = min(step.cap_s, left)
    started = time.monotonic()
    # a session of its own: a timeout kills the step's DataLoader workers and compile processes with it
    proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status = "timeout"
    seconds = round(time.monotonic() - started, 1)
    with log.open("a") as fh:
        fh.write(f"\n===== {step.name}: {status} in {seconds} s (limit {limit:.0f} s)\n$ {' '.join(step.argv)}\n{out}")
    return {"status": status, "seconds": seconds, "limit_s": round(limit), "returncode": proc.returncode,
            "command": " ".join(step.argv), "output_tail": out[-TAIL_CHARS:]}


def read_result(step: Step, record: dict[str, Any]) -> Any:
    """What the step measured: its JSON, the junit counts, or the env probe's last line."""
    if step.name == "env":
        lines = [line for line in record.get("output_tail", "").splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    if step.result is None or not step.result.is_file():
        return None
    if step.result.suffix == ".xml":
        return junit_counts(step.result)
    return json.loads(step.result.read_text())


def junit_counts(path: Path) -> dict[str, Any]:
    suites = ET.parse(path).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    assert suite is not None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["not_passed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                            if c.find("failure") is not None or c.find("error") is not None]
    return counts


def summarise(steps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The figures a reader wants first, from the steps that produced them."""
    out: dict[str, Any] = {"steps_ok": sorted(n for n, s in steps.items() if s["status"] == "ok"),
                           "steps_not_ok": {n: s["status"] for n, s in steps.items() if s["status"] != "ok"}}
    tests = steps.get("gpu_tests", {}).get("result")
    if tests:
        out["gpu_tests"] = {k: tests[k] for k in ("passed", "failures", "errors", "skipped", "not_passed")}
    for name, target in TARGETS.items():
        res = steps.get(f"ratios_{name}", {}).get("result")
        if res:
            ratios = {r["name"]: r.get("ratio_to_ceiling") for r in res["results"] if r["name"] != "ceiling"}
            ceiling = next(r["img_per_s"] for r in res["results"] if r["name"] == "ceiling")
            device = ratios.get("cache+device")
            out[f"ratios_{name}"] = {"ceiling_img_per_s": ceiling, "ratio_to_ceiling": ratios, **res["ratios"],
                                     "target_cache+device": target,
                                     "meets_target": None if device is None else device >= target}
    res = steps.get("compile", {}).get("result")
    if res:
        by = {(r["name"], r["compile"]): r["img_per_s"] for r in res["results"]}
        gain = {f"{name}_compiled/eager": round(by[(name, True)] / by[(name, False)], 3)
                for name in ("ceiling", "cache+device", "cache") if (name, True) in by and (name, False) in by}
        out["compile"] = {"img_per_s": {f"{n}{' (compiled)' if c else ''}": v for (n, c), v in by.items()}, **gain}
    reid = steps.get("reid_eval", {}).get("result")
    if reid and "torch_path" in reid:
        t = reid["torch_path"]
        out["reid_eval"] = {k: t.get(k) for k in ("device", "name", "wall_s", "speedup_vs_numpy_path",
                                                  "max_metric_diff_vs_numpy_path", "peak_gpu_MiB")}
        out["reid_eval"]["numpy_path_wall_s"] = reid["numpy_path"]["wall_s"]
    return out


def write_atomic(path: Path, report: dict[str, Any]) -> None:
    """Temp file + rename: a reader (or a killed run) never sees half a JSON."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check.json" if out else Path("gpu_check.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="toy sizes on the CPU: checks this script, measures nothing")
    ap.add_argument("--out", type=Path, default=None, help="the JSON (default $OUT/gpu_check.json, else ./)")
    ap.add_argument("--budget-s", type=float, default=450, help="all steps together (default 450: 7.5 minutes)")
    ap.add_argument("--steps", default=None, help="comma list: a subset of the steps, in their order")
    ap.add_argument("--data", type=Path, default=None, help="the JPEGs' folder (kept; reused when complete)")
    args = ap.parse_args()
    out = (args.out or default_out()).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    log.write_text("")
    deadline = time.monotonic() + args.budget_s
    env = {**os.environ, "CI": "true", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    if args.cpu:
        env["TORCH_COMPILE_DISABLE"] = "1"
    report: dict[str, Any] = {"mode": "cpu" if args.cpu else "gpu", "command": " ".join([sys.executable, *sys.argv]),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": args.budget_s,
                              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                          "python": platform.python_version(), "load_avg": list(os.getloadavg())},
                              "steps": {}, "summary": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        env["VISTRAIN_CACHE_DIR"] = str(Path(tmp) / "cache")
        steps = plan(args, Path(tmp))
        if args.steps:
            wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
            unknown = sorted(set(wanted) - {s.name for s in steps})
            if unknown:
                ap.error(f"--steps: unknown {', '.join(unknown)}; valid: {', '.join(s.name for s in steps)}")
            steps = [s for s in steps if s.name in wanted]
        write_atomic(out, report)
        for step in steps:
            record = run_step(step, env, deadline, log)
            try:
                record["result"] = read_result(step, record)
            except (OSError, ValueError, ET.ParseError, AssertionError) as err:
                record["result"] = None
                record["read_error"] = f"{type(err).__name__}: {err}"
            report["steps"][step.name] = record
            try:
                report["summary"] = summarise(report["steps"])
            except Exception as err:  # noqa: BLE001 - a result of an unexpected shape must not lose the JSON
                report["summary"] = {"error": f"{type(err).__name__}: {err}"}
            report["elapsed_s"] = round(args.budget_s - (deadline - time.monotonic()), 1)
            write_atomic(out, report)
            print(f"[gpu_check] {step.name}: {record['status']} ({record.get('seconds', 0)} s)", flush=True)
    print(json.dumps(report["summary"], indent=2))
    print(f"[gpu_check] {report['elapsed_s']} s -> {out} (step output: {log})")
    if args.cpu:
        print("[gpu_check] --cpu: toy sizes and no compile; these figures measure nothing")
    bad = [n for n, s in report["steps"].items() if s["status"] != "ok"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
