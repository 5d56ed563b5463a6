"""The suite's own checks can fail: a skip for a missing optional extra fails under VISTRAIN_REQUIRE_EXTRAS=1 (as
.ci/run runs ``make test``), the extras' module list covers what ``make install`` installs, and comparing two paths'
probabilities refuses a reference that cannot tell them apart."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import required_extras
from conftest import assert_same_probabilities
from required_extras import ENV, EXTRAS_MODULES, has_extra, missing_extra

ROOT = Path(__file__).resolve().parents[1]

# An extra "not installed": None in sys.modules makes its import fail (in the child pytest only).
AT_IMPORT = """
import sys
import pytest
sys.modules["kornia"] = None
pytest.importorskip("kornia")

def test_never_collected():
    pass
"""
IN_TESTS = """
import sys
import pytest

def test_extra_missing():
    sys.modules["cleanlab"] = None
    pytest.importorskip("cleanlab")

def test_other_module_missing():
    pytest.importorskip("no_such_module_in_any_extra")

def test_other_reason():
    pytest.skip("needs a CUDA device")
"""


def child_pytest(tmp_path: Path, name: str, source: str, require: bool) -> subprocess.CompletedProcess:
    """A pytest run of one file with the hooks as a plugin, outside this repository's configuration."""
    (tmp_path / name).write_text(source)
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env["COLUMNS"] = "400"  # the summary lines whole
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    if require:
        env[ENV] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "required_extras", "-p", "no:cacheprovider", "-rA",
                           name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def summary(result: subprocess.CompletedProcess) -> str:
    return result.stdout.strip().splitlines()[-1]


def test_a_missing_extra_at_import_fails_the_collection_only_when_required(tmp_path: Path) -> None:
    free = child_pytest(tmp_path, "test_at_import.py", AT_IMPORT, require=False)
    assert free.returncode == pytest.ExitCode.NO_TESTS_COLLECTED and re.search(r"\b1 skipped\b", summary(free)), \
        free.stdout
    strict = child_pytest(tmp_path, "test_at_import.py", AT_IMPORT, require=True)
    assert strict.returncode == pytest.ExitCode.INTERRUPTED and re.search(r"\b1 error\b", summary(strict)), \
        strict.stdout
    assert f"{ENV}=1 and could not import 'kornia'" in strict.stdout, strict.stdout


def test_a_missing_extra_in_a_test_fails_it_and_other_skips_stay_skips(tmp_path: Path) -> None:
    free = child_pytest(tmp_path, "test_in_tests.py", IN_TESTS, require=False)
    assert free.returncode == 0 and re.search(r"\b3 skipped\b", summary(free)), free.stdout
    strict = child_pytest(tmp_path, "test_in_tests.py", IN_TESTS, require=True)
    assert strict.returncode == 1 and re.search(r"\b1 failed, 2 skipped\b", summary(strict)), strict.stdout
    failed = [ln for ln in strict.stdout.splitlines() if ln.startswith("FAILED")]
    assert len(failed) == 1 and "test_extra_missing" in failed[0] and "could not import 'cleanlab'" in failed[0]


def test_has_extra_fails_for_a_missing_extra_only_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.delenv(ENV, raising=False)
    assert has_extra("onnxruntime") is False
    monkeypatch.setenv(ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{ENV}=1 and could not import 'onnxruntime'"):
        has_extra("onnxruntime")
    assert has_extra("no_such_module_in_any_extra") is False  # not an extra: never required


def test_skip_reasons_name_the_extra() -> None:
    assert missing_extra("could not import 'fastapi': No module named 'fastapi'") == "fastapi"
    assert missing_extra("Skipped: could not import 'onnxruntime.quantization': DLL load failed") == \
        "onnxruntime.quantization"
    assert missing_extra("could not import 'cv2': libGL.so.1") is None  # a core dependency: its own error
    assert missing_extra("needs a CUDA device") is None


def make_install_extras() -> list[str]:
    """The extras the Makefile's install step names: '.[dev,tune,...]'."""
    (names,) = re.findall(r"-e '\.\[([\w,]+)\]'", (ROOT / "Makefile").read_text())
    return names.split(",")


def test_the_module_list_covers_every_package_make_install_installs() -> None:
    """Each requirement of those extras imports as at least one module of EXTRAS_MODULES (pytest itself and the
    linter excepted), so a new extra's skips are caught too. Checked where the package is installed; under
    VISTRAIN_REQUIRE_EXTRAS=1 every one must be."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    modules_of: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            modules_of.setdefault(dist.lower().replace("_", "-"), set()).add(module)
    names = {re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower().replace("_", "-")
             for extra in make_install_extras() for req in extras[extra]}
    uncovered, absent = [], []
    for name in sorted(names - {"pytest", "ruff"}):
        if name not in modules_of:
            absent.append(name)
        elif not modules_of[name] & EXTRAS_MODULES:
            uncovered.append((name, sorted(modules_of[name])))
    assert not uncovered, f"add their import names to required_extras.EXTRAS_MODULES: {uncovered}"
    assert not (required_extras.required() and absent), f"{ENV}=1 but not installed: {absent}"


def test_ci_sets_the_variable_and_runs_make_test() -> None:
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert f"export {ENV}=1" in lines and lines[-1] == "make test"
    assert lines.index(f"export {ENV}=1") < lines.index("make test")


def test_same_probabilities_refuses_a_reference_that_cannot_tell_paths_apart() -> None:
    rng = np.random.default_rng(0)
    varied = rng.dirichlet(np.ones(3), size=8)
    assert_same_probabilities(varied + 1e-6, varied, atol=1e-4)
    with pytest.raises(AssertionError):
        assert_same_probabilities(varied + 1e-3, varied, atol=1e-4)
    flat = np.full((8, 3), 1 / 3) + rng.normal(0, 1e-5, (8, 3))  # a collapsed model: one answer for every image
    with pytest.raises(AssertionError, match="span at most"):
        assert_same_probabilities(flat.mean(axis=0, keepdims=True).repeat(8, axis=0), flat, atol=1e-4)
