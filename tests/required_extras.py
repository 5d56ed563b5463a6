"""Under ``VISTRAIN_REQUIRE_EXTRAS=1`` (.ci/run sets it: its ``make test`` installs every extra first) a test skipped
because an optional extra does not import fails instead. A broken install must not pass as a green run with the
ONNX, serving, audit or GPU-augmentation suites quietly skipped. Without the variable the skips stay skips (a
laptop without onnxruntime still runs the rest).

conftest.py imports the two hooks, which makes pytest use them; a test that drops only a part of itself without an
extra asks ``has_extra`` instead of looking for the module itself."""

from __future__ import annotations

import importlib
import os
import re
from typing import Any

import pytest

ENV = "VISTRAIN_REQUIRE_EXTRAS"

# The import names of what `make install` installs beyond the core (Makefile: '.[dev,tune,postgres,retrieval,
# export,serve,audit,augment,albumentations]'); tests/test_suite_checks.py holds this list to pyproject.toml's extras.
EXTRAS_MODULES = frozenset({
    "optuna",  # tune
    "psycopg2",  # postgres
    "faiss",  # retrieval
    "onnx", "onnxscript", "onnxruntime",  # export
    "fastapi", "uvicorn", "multipart", "python_multipart",  # serve
    "cleanlab", "imagehash", "pywt",  # audit
    "kornia",  # augment
    "albumentations",  # albumentations
    "httpx", "hypothesis", "wandb", "xdist", "nbclient", "nbformat", "ipykernel", "markdown",  # dev
})

# pytest.importorskip's reason (without its reason= argument); tests/postgres.py words its driver check the same way
_COULD_NOT_IMPORT = re.compile(r"could not import '([\w.]+)'")


def required() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def missing_extra(reason: str) -> str | None:
    """The module of an extra that a skip's reason says could not be imported, or None (another reason)."""
    found = _COULD_NOT_IMPORT.search(reason)
    return found.group(1) if found and found.group(1).split(".")[0] in EXTRAS_MODULES else None


def has_extra(module: str) -> bool:
    """Whether ``module`` imports; for a test that leaves out a part of itself without it. Under ``ENV`` a missing
    extra fails the test (or, called at import time, the collection of its file)."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        if required() and module.split(".")[0] in EXTRAS_MODULES:
            pytest.fail(_failure(f"could not import {module!r}: {err}"), pytrace=False)
        return False
    return True


def _failure(reason: str) -> str:
    return f"{ENV}=1 and {reason}: make install installs it, so its tests must run, not skip"


def _as_failure(report: Any, reason: str) -> None:
    if required() and missing_extra(reason):
        report.outcome = "failed"
        report.longrepr = _failure(reason.removeprefix("Skipped: "))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """A skip raised in a test or its fixtures (``pytest.importorskip`` inside them)."""
    report = yield
    if report.skipped and call.excinfo is not None and call.excinfo.errisinstance(pytest.skip.Exception):
        _as_failure(report, str(call.excinfo.value.msg))
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    """A skip raised while a file is imported (``pytest.importorskip`` at module level): a collection error."""
    report = yield
    if report.skipped:
        longrepr = report.longrepr
        _as_failure(report, longrepr[2] if isinstance(longrepr, tuple) else str(longrepr))
    return report
