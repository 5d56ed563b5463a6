"""A run's log files alone tell how it ended: the last line of ``RUN/train.log`` and of the ``logs/run_*.log``
copy is the ``[EXIT]`` marker, after the error's one line and its traceback; ``run.json`` has the error too.
Also what ``--resume`` and ``--mode`` say about themselves in the log."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

import pytest
from conftest import describe, last_line, run_cli, run_dirs, tiny_config, write_csv_dataset, write_yaml

from vistrain.cli import main
from vistrain.engine.trainer import Trainer

RESUME_NEW = "[RESUME] no unfinished run of this config; starting a new run"


def assert_text_ends_with(text: str, exit_line: str) -> list[str]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines and lines[-1].endswith(exit_line), f"the log must end with {exit_line!r}; it ends:\n" + \
        "\n".join(lines[-8:])
    return lines


def assert_log_ends_with(path: Path, exit_line: str) -> list[str]:
    return assert_text_ends_with(path.read_text(), exit_line)


def run_logs(run_dir: Path, logs_dir: Path) -> list[Path]:
    """RUN/train.log and its copies under output.logs_dir (one per attempt)."""
    copies = sorted(logs_dir.glob(f"run_*_{run_dir.name}.log"))
    assert copies, f"no copy of the run's log under {logs_dir}"
    return [run_dir / "train.log", copies[-1]]


def main_captured(*argv: str) -> subprocess.CompletedProcess:
    """``vistrain ARGV`` in this process (no second start-up of torch), its console output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``train --mode fast --resume`` (nothing to resume: a new run), then ``--resume RUN`` of that finished
    run, then ``--resume RUN`` after its last checkpoint was truncated."""
    root = tmp_path_factory.mktemp("outcome")
    data = write_csv_dataset(root / "data", classes=("a", "b"), per_class=6, size=32)
    raw = tiny_config(data.root, train={"epochs": 1}, tracking={"tensorboard": False},
                      output={"exp_dir": str(root / "exp"), "logs_dir": str(root / "logs")})
    raw["train"].pop("warmup_epochs")  # the file sets every key of the fast preset but this one
    config = write_yaml(root / "cfg.yaml", raw)
    out: dict = {"root": root, "logs": root / "logs"}
    out["first"] = run_cli("train", "--config", str(config), "--mode", "fast", "--resume", cwd=root)
    (run_dir,) = run_dirs(root / "exp")
    out["run"] = run_dir
    out["logs_after_first"] = [p.read_text() for p in run_logs(run_dir, root / "logs")]
    out["again"] = main_captured("train", "--resume", str(run_dir))
    out["log_after_again"] = (run_dir / "train.log").read_text()
    # A checkpoint cut short (a full disk, a copy that stopped) in a run that did not finish.
    last = run_dir / "ckpt" / "last_fold0.pth"
    last.write_bytes(last.read_bytes()[:1000])
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    out["corrupt"] = main_captured("train", "--resume", str(run_dir))
    return out


def test_successful_run_logs_end_with_the_exit_marker(flow: dict) -> None:
    r: subprocess.CompletedProcess = flow["first"]
    assert r.returncode == 0, describe(r)
    assert last_line(r.stdout) == "[EXIT] TRAINING SUCCESS code=0", describe(r)
    assert r.stdout.count("[EXIT]") == 1, f"the console shows the marker once\n{describe(r)}"
    for text in flow["logs_after_first"]:
        assert_text_ends_with(text, "[EXIT] TRAINING SUCCESS code=0")


def test_resume_with_nothing_to_resume_says_so_in_the_log(flow: dict) -> None:
    assert RESUME_NEW in flow["logs_after_first"][0]
    assert RESUME_NEW in flow["first"].stdout


def test_mode_is_logged_with_the_preset_keys_the_file_overrode(flow: dict) -> None:
    line = next((ln for ln in flow["logs_after_first"][0].splitlines() if "[CFG] mode=" in ln), None)
    assert line is not None, "the mode must be logged in a [CFG] line"
    assert line.endswith("[CFG] mode=fast (preset keys overridden by the config file: augment.policy, model.name, "
                         "train.epochs, train.img_size, train.lr)"), line
    assert json.loads((flow["run"] / "run.json").read_text())["mode"] == "fast"


def test_resume_of_a_finished_run_is_a_user_error_naming_it(flow: dict) -> None:
    r = flow["again"]
    assert r.returncode == 2, describe(r)
    (line,) = r.stderr.splitlines()
    assert str(flow["run"]) in line and "--fresh" in line and "--fold" in line, line
    assert flow["log_after_again"] == flow["logs_after_first"][0], "the finished run's log must be left alone"


def test_corrupt_checkpoint_on_resume_is_exit_2_naming_the_file_and_logged(flow: dict) -> None:
    r = flow["corrupt"]
    ckpt = flow["run"] / "ckpt" / "last_fold0.pth"
    assert r.returncode == 2, describe(r)
    (line,) = r.stderr.splitlines()
    assert line.startswith("error: ") and str(ckpt) in line and "--fresh" in line, line
    assert "Traceback" not in r.stdout + r.stderr, describe(r)
    for path in run_logs(flow["run"], flow["logs"]):
        lines = assert_log_ends_with(path, "[EXIT] TRAINING ERROR code=2")
        text = "\n".join(lines)
        tail = text[text.rfind("[BOOT]"):]
        assert "[ERROR] " + line.removeprefix("error: ") in tail, tail[-2000:]
        assert "Traceback (most recent call last)" in tail, "the traceback goes into the log files"
    info = json.loads((flow["run"] / "run.json").read_text())
    assert info["status"] == "error" and str(ckpt) in info["error"] and info["exit_code"] == 2, info


# ------------------------------------------------------------------------ in-process: crash and Ctrl-C

@pytest.fixture
def config(tmp_path: Path) -> Path:
    data = write_csv_dataset(tmp_path / "data", classes=("a", "b"), per_class=6, size=16)
    raw = tiny_config(data.root, output={"exp_dir": str(tmp_path / "exp"), "logs_dir": str(tmp_path / "logs")})
    return write_yaml(tmp_path / "cfg.yaml", raw)


@pytest.mark.parametrize(("raised", "code", "status"), [
    (RuntimeError("CUDA error: an illegal memory access was encountered"), 1, "error"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_crash_and_ctrl_c_end_the_log_files_with_the_error_traceback_and_marker(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, config: Path,
        raised: BaseException, code: int, status: str) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(Trainer, "train_fold", crash)
    assert main(["train", "--config", str(config)]) == code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, "without --debug the console shows no traceback"
    assert len(err.splitlines()) == 1 and out.count("[EXIT]") == 1, (out, err)
    (run_dir,) = run_dirs(tmp_path / "exp")
    for path in run_logs(run_dir, tmp_path / "logs"):
        lines = assert_log_ends_with(path, f"[EXIT] TRAINING ERROR code={code}")
        text = "\n".join(lines)
        assert "[ERROR] " + err.strip().removeprefix("error: ").removesuffix(" (run with --debug for the traceback)") \
            in text, text[-1500:]
        assert "Traceback (most recent call last)" in text and "in crash" in text
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == status and info["exit_code"] == code, info


def test_demo_log_ends_with_the_exit_marker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``vistrain demo`` trains through the same path; a small dataset stands in for the digits (the demo keeps
    a train.csv it finds in --out)."""
    write_csv_dataset(tmp_path / "demo_data", classes=("0", "1"), per_class=6, size=16)
    argv = ["demo", "--out", str(tmp_path / "demo_data"), "train.epochs=1", "train.batch_size=8",
            "tracking.tensorboard=false", f"output.exp_dir={tmp_path / 'exp'}", f"output.logs_dir={tmp_path / 'logs'}"]
    assert main(argv) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.count("[EXIT] TRAINING SUCCESS code=0") == 1
    (run_dir,) = run_dirs(tmp_path / "exp")
    for path in run_logs(run_dir, tmp_path / "logs"):
        assert_log_ends_with(path, "[EXIT] TRAINING SUCCESS code=0")
