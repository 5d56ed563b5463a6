"""Disk full and read-only (issue 12 item 2): a checkpoint, log or result the file system refuses (over the
file-size limit, full, read-only, no permission) stops the run with one line naming the file and the cause
(exit 2, no traceback), the last good checkpoint intact, and ``--resume`` continues once the disk takes writes."""

from __future__ import annotations

import errno
import json
import resource
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import cli_command, cli_env, describe, last_line, read_metrics, run_dirs, tiny_config, write_csv_dataset
from conftest import write_yaml as write_config

from vistrain.tracking.files import StorageError, atomic_write, atomic_write_bytes

MB = 1 << 20


def train(*args: str, cwd: Path, fsize: int | None = None) -> subprocess.CompletedProcess:
    """``vistrain ARGS``, optionally under RLIMIT_FSIZE (SIGXFSZ ignored, so a write over it fails with EFBIG)."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(cli_command("train", *args), cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=600, preexec_fn=limit if fsize else None)


def assert_stopped_on(r: subprocess.CompletedProcess, path: Path, cause: str) -> None:
    assert r.returncode == 2, describe(r)
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"error: cannot write {path}: {cause}") and "--resume" in line, describe(r)
    assert last_line(r.stdout) == "[EXIT] TRAINING ERROR code=2", describe(r)
    assert not list(path.parent.glob(".*.tmp")), "the half-written temporary file must be removed"


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-epoch run under a 40 MB file-size limit (the model's checkpoint fits, the last checkpoint with the
    optimiser state does not), resumed with its ckpt/ folder mounted read-only, then resumed normally."""
    root = tmp_path_factory.mktemp("storage")
    data = write_csv_dataset(root / "data", per_class=6, size=32)
    exp = root / "exp"
    config = write_config(root / "c.yaml", tiny_config(data.root, output={"exp_dir": str(exp), "logs_dir": None},
                                                       tracking={"tensorboard": False}))
    out: dict = {"efbig": train("--config", str(config), cwd=root, fsize=40 * MB)}
    (run,) = run_dirs(exp)
    out["run"] = run
    out["status_efbig"] = json.loads((run / "run.json").read_text())
    ckpt = run / "ckpt"
    out["best_after_efbig"] = torch.load(ckpt / "best_fold0.pth", weights_only=True)["epoch"]
    if _mount("--bind", str(ckpt), str(ckpt)):
        try:
            if _mount("-o", "remount,bind,ro", str(ckpt)):
                out["erofs"] = train("--resume", str(run), cwd=root)
        finally:
            subprocess.run(["umount", str(ckpt)], check=True)
    out["resumed"] = train("--resume", str(run), cwd=root)
    return out


def test_over_the_file_size_limit_is_one_line_naming_the_checkpoint(flow: dict) -> None:
    run = flow["run"]
    assert_stopped_on(flow["efbig"], run / "ckpt" / "last_fold0.pth", "File too large (EFBIG)")
    assert flow["status_efbig"]["status"] == "error" and flow["status_efbig"]["exit_code"] == 2
    assert flow["best_after_efbig"] == 1, "the best model written before the failure stays"


def test_read_only_checkpoint_folder_is_one_line_naming_the_file(flow: dict) -> None:
    if "erofs" not in flow:
        pytest.skip("cannot bind-mount read-only here (needs root and mount permission)")
    assert_stopped_on(flow["erofs"], flow["run"] / "ckpt" / "best_fold0.pth", "Read-only file system (EROFS)")


def test_resume_continues_once_the_disk_takes_writes(flow: dict) -> None:
    r = flow["resumed"]
    assert r.returncode == 0, describe(r)
    assert [x["epoch"] for x in read_metrics(flow["run"])] == [1, 2]
    assert json.loads((flow["run"] / "run.json").read_text())["status"] == "success"


def test_full_disk_keeps_the_last_good_checkpoint_and_resume_continues(tmp_path: Path) -> None:
    """A tmpfs sized for epoch 1's files (save_every_n_epochs=1: each epoch adds a checkpoint) is full in epoch 2;
    grown, the run resumes from epoch 1."""
    from vistrain.config.schema import ModelCfg
    from vistrain.models.build import build_model

    m = sum(t.numel() * t.element_size() for t in build_model(
        "classification", ModelCfg(name="resnet10t", pretrained=False), 3, pretrained=False).state_dict().values())
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount("-t", "tmpfs", "-o", f"size={int(8.6 * m)}", "tmpfs", str(disk)):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        data = write_csv_dataset(tmp_path / "data", per_class=6, size=32)
        config = write_config(tmp_path / "c.yaml", tiny_config(
            data.root, output={"exp_dir": str(disk / "exp"), "logs_dir": None}, tracking={"tensorboard": False},
            train={"epochs": 2, "save_every_n_epochs": 1}))
        full = train("--config", str(config), cwd=tmp_path)
        (run,) = run_dirs(disk / "exp")
        assert full.returncode == 2, describe(full)
        (line,) = full.stderr.splitlines()
        assert line.startswith(f"error: cannot write {run}/") and "No space left on device (ENOSPC)" in line, line
        assert last_line(full.stdout) == "[EXIT] TRAINING ERROR code=2", describe(full)
        last = torch.load(run / "ckpt" / "last_fold0.pth", weights_only=True)
        assert last["epoch"] == 1, "the last good checkpoint (epoch 1) is intact"
        assert not list((run / "ckpt").glob(".*.tmp"))
        assert _mount("-o", "remount,size=1g", str(disk))
        resumed = train("--resume", str(run), cwd=tmp_path)
        assert resumed.returncode == 0, describe(resumed)
        assert [x["epoch"] for x in read_metrics(run)] == [1, 2]
        assert "[RESUME] fold=0 from epoch 1 of 2" in (run / "train.log").read_text()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_permission_denied_is_a_storage_error_naming_the_file(tmp_path: Path) -> None:
    """EACCES (root ignores mode bits, so it is raised here as the kernel would) and the old file is kept."""
    target = tmp_path / "result.json"
    atomic_write_bytes(target, b"old")

    def refused(fh: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(StorageError, match=rf"cannot write {target}: Permission denied \(EACCES\); make the folder"):
        atomic_write(target, refused)
    assert target.read_bytes() == b"old" and not list(tmp_path.glob(".*.tmp"))
