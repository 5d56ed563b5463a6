"""vistrain as an installed package: the ready configs and the starter configs ship inside it (package data found
with importlib.resources), the checkout's ``configs/`` is that same folder, ``vistrain init`` writes a commented
starter config, and a wheel installed outside this checkout runs ``vistrain demo`` and ``vistrain init`` from an
empty folder."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import cli_env, describe, run_cli, write_folders_dataset

from vistrain.config import Config, load_config
from vistrain.config.bundled import bundled_config, bundled_configs
from vistrain.config.starter import STARTER_TASKS

REPO = Path(__file__).resolve().parents[1]
# What each starter says to change first (its header names them, and the file sets them).
CHANGE_FIRST = {
    "classification": ("data.image_dir_train", "model.name", "train.img_size", "train.epochs"),
    "embedding": ("data.image_dir_train", "model.name", "train.img_size", "train.epochs"),
    "reid": ("data.root", "model.name", "train.img_size", "train.epochs"),
    "pills": ("data.sources", "model.name", "train.img_size", "train.epochs"),
}
TASK_OF = {"classification": "classification", "embedding": "embedding", "reid": "embedding",
           "pills": "classification"}


def test_the_checkouts_configs_folder_is_the_one_the_package_ships() -> None:
    shipped = bundled_configs()
    assert "demo.yaml" in [p.name for p in shipped] and "demo_pills.yaml" in [p.name for p in shipped]
    assert (REPO / "configs").resolve() == shipped[0].parent.resolve(), "configs/ must be the package's folder"
    assert sorted(p.name for p in (REPO / "configs").glob("*.yaml")) == [p.name for p in shipped]
    assert bundled_config("demo.yaml") == shipped[0].parent / "demo.yaml"


def test_a_checkout_config_still_finds_its_paths_beside_configs() -> None:
    """``vistrain train --config configs/train.yaml`` reads ../data from the checkout root, not from inside the
    package the file now lives in."""
    cfg = load_config(REPO / "configs" / "train.yaml")
    assert cfg.data.train_csv == REPO / "data" / "raw" / "train.csv"
    assert cfg.output.exp_dir == REPO / "experiments"


def test_the_demo_configs_write_their_runs_in_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    """From a wheel the demo config sits in site-packages: its runs must not go there."""
    monkeypatch.chdir(tmp_path)
    for name in ("demo.yaml", "demo_pills.yaml"):
        cfg = load_config(bundled_config(name))
        assert (cfg.output.exp_dir, cfg.output.logs_dir) == (tmp_path.resolve() / "experiments",
                                                              tmp_path.resolve() / "logs"), name


def _starter_paths(cfg: Config) -> list[Path]:
    d = cfg.data
    paths = [d.image_dir_train, d.train_csv, d.root, d.class_map, d.image_dir_test, d.manifest]
    paths += [s.image_dir_train for s in d.sources or []]
    return [p for p in paths if p is not None]


@pytest.mark.parametrize("task", STARTER_TASKS)
def test_init_writes_a_commented_starter_that_validates_once_its_data_exists(tmp_path: Path, task: str) -> None:
    res = run_cli("init", "--task", task, "--output", "proj/vistrain.yaml", cwd=tmp_path)
    assert res.returncode == 0, describe(res)
    path = tmp_path / "proj" / "vistrain.yaml"
    assert str(path.relative_to(tmp_path)) in res.stdout
    text = path.read_text()
    assert text.startswith("# vistrain train --config proj/vistrain.yaml\n"), text[:200]
    header = text[: text.index("\n", text.index("Change first"))]
    raw = yaml.safe_load(text)
    for key in CHANGE_FIRST[task]:
        assert key in header, f"{task}: the header does not say to change {key}"
        section, name = key.split(".")
        assert name in raw[section], f"{task}: {key} is not set in the file"
    keys = [line for line in text.splitlines() if re.match(r"\s*[a-z_]+:\s*\S", line)]
    uncommented = [line for line in keys if "#" not in line]
    assert not uncommented, f"{task}: every value set says what it means: {uncommented}"

    cfg = load_config(path)
    assert cfg.task == TASK_OF[task]
    paths = _starter_paths(cfg)
    assert paths, task
    for p in paths:  # relative paths resolve beside the written file
        assert p.is_relative_to(tmp_path.resolve() / "proj"), p
        if p.suffix:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("{}\n" if p.suffix == ".json" else "ID,target\n")
        else:
            p.mkdir(parents=True, exist_ok=True)
    assert load_config(path).task == TASK_OF[task]


def test_init_writes_the_classification_starter_by_default_and_never_overwrites_unasked(tmp_path: Path) -> None:
    target = tmp_path / "vistrain.yaml"
    res = run_cli("init", cwd=tmp_path)
    assert res.returncode == 0, describe(res)
    assert target.read_text() == bundled_config("init/classification.yaml").read_text()
    target.write_text("mine: true\n")
    res = run_cli("init", "--task", "reid", cwd=tmp_path)
    assert res.returncode == 2, describe(res)
    assert target.read_text() == "mine: true\n"
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "vistrain.yaml" in lines[0] and "--force" in lines[0], res.stderr
    res = run_cli("init", "--task", "reid", "--force", cwd=tmp_path)
    assert res.returncode == 0, describe(res)
    assert load_config(target).data.source == "reid"


def test_init_refuses_a_folder_and_an_unknown_task(tmp_path: Path) -> None:
    (tmp_path / "proj").mkdir()
    res = run_cli("init", "--output", "proj", "--force", cwd=tmp_path)
    assert res.returncode == 2 and "proj" in res.stderr and len(res.stderr.strip().splitlines()) == 1, describe(res)
    res = run_cli("init", "--task", "detection", cwd=tmp_path)
    assert res.returncode == 2 and "detection" in res.stderr and "classification" in res.stderr, describe(res)
    assert list(tmp_path.iterdir()) == [tmp_path / "proj"]


# ------------------------------------------------------------------------------------------- the wheel

def _build_backend_missing() -> str | None:
    """Why this venv cannot build a wheel offline (setuptools without its bdist_wheel), or None."""
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools (the build backend) is not installed in this venv"
    if importlib.util.find_spec("setuptools.command.bdist_wheel") is None and importlib.util.find_spec("wheel") is None:
        return "setuptools < 70.1 without the wheel package cannot build a wheel offline"
    return None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, built offline from a copy of it (a build in place leaves build/ behind)."""
    reason = _build_backend_missing()
    if reason:
        pytest.skip(reason)
    tree = tmp_path_factory.mktemp("tree")
    shutil.copy(REPO / "pyproject.toml", tree)
    shutil.copy(REPO / "README.md", tree)
    shutil.copytree(REPO / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(tree), "--no-deps", "--no-build-isolation",
                          "--no-index", "--disable-pip-version-check", "-q", "-w", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, describe(res)
    (built,) = out.glob("vistrain-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the wheel's vistrain; it sees this venv's packages (torch, timm ...) through a .pth
    line, which puts their folder on sys.path without running its .pth files (so not this checkout's editable
    install either)."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    (purelib,) = (root / "lib").glob("python3*/site-packages")
    (purelib / "dev_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    res = subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index",
                          "--ignore-installed", "--disable-pip-version-check", "-q", str(wheel)],
                         env=_outside_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, describe(res)
    return root


def _outside_env() -> dict[str, str]:
    """The test's subprocess environment without the PYTHONPATH that points at this checkout's src/."""
    env = cli_env()
    env.pop("PYTHONPATH", None)
    return env


def _installed(venv: Path, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "vistrain"), *args], cwd=cwd, env=_outside_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_the_wheel_holds_every_ready_starter_and_recipe_config(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "vistrain/py.typed" in names  # the API's type hints reach a user's type checker (PEP 561)
    shipped = {f"vistrain/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    starters = {f"vistrain/configs/init/{task}.yaml" for task in STARTER_TASKS}
    recipes = {f"vistrain/configs/recipes/{p.name}" for p in (REPO / "configs" / "recipes").glob("*.yaml")}
    assert shipped and recipes and shipped | starters | recipes <= names, sorted((shipped | starters | recipes) - names)


def test_the_installed_wheel_runs_the_demo_and_init_from_an_empty_folder(venv: Path, tmp_path: Path) -> None:
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import vistrain; print(vistrain.__file__)"],
                           cwd=tmp_path, env=_outside_env(), capture_output=True, text=True, timeout=60)
    assert Path(where.stdout.strip()).is_relative_to(venv), f"vistrain imported from {where.stdout}{where.stderr}"

    empty = tmp_path / "empty"
    empty.mkdir()
    res = _installed(venv, "demo", "train.epochs=1", cwd=empty)
    assert res.returncode == 0, describe(res)
    assert re.search(r"\[DONE\] demo validation macro_f1=\d\.\d{4} accuracy=\d\.\d{4}", res.stdout), res.stdout
    run = Path(re.search(r"\[DONE\] run directory: (\S+)", res.stdout).group(1))
    assert run.is_relative_to(empty.resolve() / "experiments") and (run / "summary.json").is_file()
    assert (empty / "demo_data" / "train.csv").is_file()
    written = [p for p in venv.rglob("*") if p.name in ("experiments", "logs", "demo_data")]
    assert not written, f"the demo wrote into the installed package: {written}"

    project = tmp_path / "project"
    project.mkdir()
    res = _installed(venv, "init", cwd=project)
    assert res.returncode == 0, describe(res)
    text = (project / "vistrain.yaml").read_text()
    assert text == bundled_config("init/classification.yaml").read_text()
    # The starter, as written, reads a folder-per-class data set where it says (manifest: no training).
    write_folders_dataset(project / yaml.safe_load(text)["data"]["image_dir_train"], classes=("cat", "dog"))
    res = _installed(venv, "manifest", "--config", "vistrain.yaml", cwd=project)
    assert res.returncode == 0, describe(res)
    assert json.loads((project / "manifest.json").read_text())["classes"] == ["cat", "dog"]
