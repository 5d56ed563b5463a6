"""User errors through the real command line: exit code 2, one ``error:`` line, no traceback (unless --debug).

Every command is started up front, a few at a time, so their start-up costs overlap on 2 cores.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import Started, describe, last_line, run_dirs, tiny_config, write_csv_dataset, write_yaml

CASES: dict[str, list[str]] = {
    # name: command line after `python -m vistrain` (CONFIG / BADCSV are replaced below)
    "missing_target_column": ["train", "--config", "CONFIG", "data.train_csv=BADCSV"],
    "unknown_key": ["train", "--config", "CONFIG", "train.lrr=0.1"],
    "missing_train_csv": ["train", "--config", "CONFIG", "data.train_csv=does/not/exist.csv"],
    "valid_fold_out_of_range": ["train", "--config", "CONFIG", "data.folds=5", "data.valid_fold=7"],
    "debug_after_command": ["train", "--debug", "--config", "CONFIG", "data.train_csv=BADCSV"],
    "debug_before_command": ["--debug", "train", "--config", "CONFIG", "data.train_csv=BADCSV"],
    "resume_not_a_run": ["train", "--resume", "NOT_A_RUN"],
    "unknown_model": ["train", "--config", "CONFIG", "model.name=resnet18x"],
    "double_balancing": ["train", "--config", "CONFIG", "sampler.name=weighted", "train.class_weights=balanced"],
}
MAX_PARALLEL = 4


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("cli_errors")
    data = write_csv_dataset(root / "data", classes=("a", "b"), per_class=6, size=16)
    bad_csv = root / "data" / "no_target.csv"
    bad_csv.write_text("ID,label\n" + "".join(f"{i},{t}\n" for i, t in zip(data.ids, data.labels)))
    (root / "not_a_run").mkdir()
    out: dict[str, subprocess.CompletedProcess] = {}
    pending = list(CASES.items())
    running: list[tuple[str, Started]] = []
    while pending or running:
        while pending and len(running) < MAX_PARALLEL:
            name, argv = pending.pop(0)
            case_dir = root / name
            config = write_yaml(case_dir / "config.yaml", tiny_config(
                data.root, output={"exp_dir": str(case_dir / "exp"), "logs_dir": str(case_dir / "logs")}))
            swap = {"CONFIG": str(config), "NOT_A_RUN": str(root / "not_a_run")}
            args = [swap.get(a, a.replace("BADCSV", str(bad_csv))) for a in argv]
            running.append((name, Started(*args, cwd=case_dir / "work")))
        name, started = running.pop(0)
        out[name] = started.wait()
    for name in out:
        out[name].case_dir = root / name  # type: ignore[attr-defined]
    return out


def assert_one_line_user_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, describe(r)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"stderr must be exactly one line\n{describe(r)}"
    assert lines[0].startswith("error: "), describe(r)
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not named\n{describe(r)}"
    assert "Traceback" not in r.stdout + r.stderr, describe(r)
    assert last_line(r.stdout) == "[EXIT] TRAINING ERROR code=2", describe(r)
    return lines[0]


def assert_no_run_directory(r: subprocess.CompletedProcess) -> None:
    assert run_dirs(r.case_dir / "exp") == [], "a user error found before training must not leave a run directory"


def test_missing_target_column(results):
    r = results["missing_target_column"]
    line = assert_one_line_user_error(r, "data.target_col", "target")
    assert "ID, label" in line, "the message lists the columns the CSV has"
    assert_no_run_directory(r)


def test_unknown_config_key(results):
    r = results["unknown_key"]
    line = assert_one_line_user_error(r, "train.lrr")
    assert "did you mean 'lr'" in line
    assert_no_run_directory(r)


def test_missing_train_csv(results):
    r = results["missing_train_csv"]
    line = assert_one_line_user_error(r, "data.train_csv")
    expected = (Path(r.case_dir) / "work" / "does" / "not" / "exist.csv").resolve()
    assert str(expected) in line, "a relative override resolves against the working directory"
    assert_no_run_directory(r)


def test_valid_fold_out_of_range(results):
    r = results["valid_fold_out_of_range"]
    assert_one_line_user_error(r, "data.valid_fold", "7")
    assert_no_run_directory(r)


def test_resume_of_a_directory_that_is_not_a_run(results):
    r = results["resume_not_a_run"]
    line = assert_one_line_user_error(r, "not_a_run")
    assert line.startswith("error: --resume"), f"the message must name the flag the user gave\n{describe(r)}"


@pytest.mark.parametrize("case", ["debug_after_command", "debug_before_command"])
def test_debug_shows_the_traceback(results, case):
    r = results[case]
    assert r.returncode == 2, describe(r)
    assert "Traceback (most recent call last)" in r.stderr, describe(r)
    assert r.stderr.splitlines()[-1].startswith("error: data.target_col"), describe(r)
    assert last_line(r.stdout) == "[EXIT] TRAINING ERROR code=2"


def test_unknown_model_name_leaves_no_run_directory(results):
    r = results["unknown_model"]
    line = assert_one_line_user_error(r, "model.name", "resnet18x")
    assert "did you mean 'resnet18'" in line
    assert_no_run_directory(r)


def test_weighted_sampler_with_balanced_class_weights(results):
    r = results["double_balancing"]
    assert_one_line_user_error(r, "sampler.name: weighted", "train.class_weights: balanced", "weighs 100×")
    assert_no_run_directory(r)


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    import vistrain
    from vistrain.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"vistrain {vistrain.__version__}"
