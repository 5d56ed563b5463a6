"""Shared fixtures: tiny generated datasets (never downloaded), configs and a ``vistrain`` subprocess runner.

Everything runs on the CPU in a few seconds: 32 px images, a resnet10t from scratch, ``num_workers=0``.
Images are coloured and striped by class, so a model can tell the classes apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

# pytest's hooks, used because this module holds them: under VISTRAIN_REQUIRE_EXTRAS=1 (.ci/run) a test skipped for a
# missing optional extra fails
from required_extras import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401

# One colour and one stripe direction per class index (cycled for more classes).
PALETTE = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40), (200, 60, 220), (40, 210, 210)]


def class_image(k: int, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """An RGB picture whose colour and stripe pattern depend on the class index ``k``, plus a little noise."""
    base = np.array(PALETTE[k % len(PALETTE)], dtype=np.float64)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = ((xx if k % 2 == 0 else yy) // 4) % 2  # vertical stripes for even classes, horizontal for odd
    arr = base[None, None, :] * (0.6 + 0.4 * stripes[..., None])
    arr += rng.normal(0, 12, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


@dataclass
class CsvDataset:
    root: Path
    train_csv: Path
    image_dir: Path
    ids: list[str]
    labels: list[str]


def write_csv_dataset(root: Path, classes: tuple[str, ...] = ("0", "1", "2"), per_class: int = 12,
                      size: int = 40, seed: int = 0, extra_columns: dict[str, list[Any]] | None = None
                      ) -> CsvDataset:
    """``root/train.csv`` (ID,target; IDs without extension) and ``root/train/<ID>.png``."""
    rng = np.random.default_rng(seed)
    image_dir = root / "train"
    image_dir.mkdir(parents=True, exist_ok=True)
    ids, labels = [], []
    for k, name in enumerate(classes):
        for i in range(per_class):
            image_id = f"img_{k}_{i:03d}"
            class_image(k, rng, size).save(image_dir / f"{image_id}.png")
            ids.append(image_id)
            labels.append(name)
    lines = ["ID,target" + "".join(f",{c}" for c in (extra_columns or {}))]
    for j, (i, t) in enumerate(zip(ids, labels)):
        lines.append(f"{i},{t}" + "".join(f",{v[j]}" for v in (extra_columns or {}).values()))
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return CsvDataset(root, root / "train.csv", image_dir, ids, labels)


def write_folders_dataset(root: Path, classes: tuple[str, ...] = ("cat", "dog"), objects: int = 6,
                          views: int = 2, size: int = 40, seed: int = 0) -> Path:
    """``root/<class>/obj<j>_<seq>.png``: ``views`` images of each object, the object being the group."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(objects):
            for seq in range(views):
                class_image(k, rng, size).save(folder / f"obj{j}_{seq}.png")
    return root


@pytest.fixture(autouse=True, scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Disk caches (data.cache) of every test and its subprocesses go to a temporary folder, never ~/.cache."""
    before = os.environ.get("VISTRAIN_CACHE_DIR")
    os.environ["VISTRAIN_CACHE_DIR"] = str(tmp_path_factory.mktemp("vistrain-cache"))
    yield Path(os.environ["VISTRAIN_CACHE_DIR"])
    if before is None:
        os.environ.pop("VISTRAIN_CACHE_DIR", None)
    else:
        os.environ["VISTRAIN_CACHE_DIR"] = before


@pytest.fixture
def csv_dataset(tmp_path: Path) -> CsvDataset:
    return write_csv_dataset(tmp_path / "data")


@pytest.fixture
def folders_dataset(tmp_path: Path) -> Path:
    return write_folders_dataset(tmp_path / "folders")


# ----------------------------------------------------------------------------------------------- configs

def tiny_config(data_root: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config dict for a seconds-long CPU run on a ``write_csv_dataset`` folder (paths absolute)."""
    cfg: dict[str, Any] = {
        "project": {"name": "tiny", "seed": 7},
        "data": {"source": "csv", "train_csv": str(data_root / "train.csv"),
                 "image_dir_train": str(data_root / "train"), "image_ext": ".png", "folds": 2, "valid_fold": 0},
        "model": {"name": "resnet10t", "pretrained": False},
        "train": {"img_size": 32, "batch_size": 8, "epochs": 2, "lr": 3e-3, "warmup_epochs": 0,
                  "early_stopping_patience": 0, "num_workers": 0, "log_interval": 0, "device": "cpu"},
        "augment": {"policy": "none"},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------ subprocesses

def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CI"] = "true"
    env.pop("PYTHONWARNINGS", None)
    # One intra-op thread per run: several runs share 2 cores, and OpenMP threads spinning on an
    # oversubscribed CPU make a seconds-long run take minutes. A 32 px model gains nothing from more.
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    return env


def assert_python_runs(code: str) -> None:
    """``code`` in a fresh interpreter (its own sys.modules: what an import pulls in shows) exits 0."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "vistrain", *args]


def run_cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m vistrain ARGS`` in ``cwd`` with ``CI=true``; stdout and stderr captured as text."""
    return subprocess.run(cli_command(*args), cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


class Started:
    """A ``vistrain`` subprocess started in the background (several can run at once on 2 cores)."""

    def __init__(self, *args: str, cwd: Path):
        cwd.mkdir(parents=True, exist_ok=True)
        self.args = args
        self._out = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in wait()
        self._err = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.proc = subprocess.Popen(cli_command(*args), cwd=cwd, env=cli_env(), stdout=self._out,
                                     stderr=self._err, text=True)

    def wait(self, timeout: float = 600) -> subprocess.CompletedProcess:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        out, err = (self._read(f) for f in (self._out, self._err))
        return subprocess.CompletedProcess(self.args, code, out, err)

    def kill(self) -> subprocess.CompletedProcess:
        """SIGKILL: no handler, no cleanup, like a lost machine; returns what it printed until then."""
        self.proc.kill()
        return self.wait()

    def running(self) -> bool:
        return self.proc.poll() is None

    @staticmethod
    def _read(fh: Any) -> str:
        fh.flush()
        fh.seek(0)
        text = fh.read()
        fh.close()
        return text


def describe(result: subprocess.CompletedProcess) -> str:
    """Everything needed to understand a failed CLI assertion."""
    return (f"command: {' '.join(map(str, result.args))}\nexit code: {result.returncode}\n"
            f"--- stdout (tail) ---\n{result.stdout[-4000:]}\n--- stderr (tail) ---\n{result.stderr[-4000:]}")


def last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# ------------------------------------------------------------------------------------------ predictions

def assert_same_probabilities(got: Any, want: Any, atol: float, what: str = "", spread_of: Any = None) -> None:
    """Two paths' class probabilities [N, C] for the same N images (columns in the same class order) agree within
    ``atol``.

    The tests' models train 1-2 epochs on a few dozen images: one may answer nearly the same for every image, and its
    top class can sit in a near tie. So probabilities are compared, never argmax classes, and the reference must
    first vary between the images: a path that ignored its image (one answer for all) is within ``atol`` of every
    reference row only when no class's probability spans more than 2 * atol over the images; 4 * atol is asked for.
    ``spread_of``: the reference answers whose spread counts (default ``want``; a load test compares the few requests
    that were answered, against predict's answers for all its images)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape and want.ndim == 2, (what, got.shape, want.shape)
    reference = want if spread_of is None else np.asarray(spread_of, dtype=np.float64)
    spread = float(np.ptp(reference, axis=0).max())
    assert spread > 4 * atol, (f"{what}: the reference probabilities span at most {spread:.3g} over the "
                               f"{len(reference)} images; a tolerance of {atol:g} cannot tell a path that ignores its "
                               "image")
    np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=what)


# ------------------------------------------------------------------------------------------ run folders

def run_dirs(exp_dir: Path) -> list[Path]:
    """Every run directory ``exp_dir/YYYYMMDD/<run_id>/`` (those holding a run.json)."""
    return sorted(p.parent for p in exp_dir.glob("*/*/run.json"))


def only_run_dir(exp_dir: Path) -> Path:
    dirs = run_dirs(exp_dir)
    assert len(dirs) == 1, f"expected exactly one run directory under {exp_dir}, found {dirs}"
    day = dirs[0].parent.name
    assert len(day) == 8 and day.isdigit(), f"run directory not under a YYYYMMDD folder: {dirs[0]}"
    return dirs[0]


def read_metrics(run_dir: Path, complete_only: bool = False) -> list[dict[str, Any]]:
    """metrics.jsonl rows; ``complete_only`` ignores a last line still being written (no newline yet)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_text()
    if complete_only:
        text = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``sweep`` tests (a 15-kill sweep, a 6-trial study, a benchmark sweep: minutes each) run only when asked for
    with ``-m slow`` or ``-m sweep``; other ``slow`` tests run in ``make test`` as well."""
    asked = config.getoption("markexpr") or ""
    if "slow" in asked or "sweep" in asked:
        return
    skip = pytest.mark.skip(reason="a sweep: runs with -m slow (or -m sweep) only")
    for item in items:
        if "sweep" in item.keywords:
            item.add_marker(skip)
