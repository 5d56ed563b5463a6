"""vistrain.tracking.writers: TensorBoard event files read back, W&B offline runs, the missing-wandb error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from vistrain.config.schema import TrackingCfg, WandbCfg
from vistrain.errors import UserError
from vistrain.tracking.writers import WANDB_MISSING, Trackers, flatten

ROWS = [{"fold": fold, "epoch": epoch, "train_loss": 1.0 / epoch + fold, "valid_loss": 1.5 / epoch,
         "macro_f1": 0.5 + 0.1 * epoch, "accuracy": 0.6 + 0.1 * epoch, "lr": 1e-3 * 0.5 ** epoch,
         "time_s": 2.5, "mem_MiB": np.float32(100.0), "stopped": False, "note": "text is not a scalar"}
        for fold in (0, 1) for epoch in (1, 2, 3)]
SUMMARY = {"run_id": "run-1", "monitor": "macro_f1", "mean": {"macro_f1": 0.8}, "std": {"macro_f1": 0.02},
           "oof": {"macro_f1": 0.79, "accuracy": 0.81}, "folds": [{"fold": 0, "best_epoch": 3}]}


def make_png(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.arange(48 * 64 * 4, dtype=np.uint8).reshape(48, 64, 4), "RGBA").save(path)
    return path


def tb_only() -> TrackingCfg:
    return TrackingCfg(tensorboard=True, wandb=WandbCfg(enabled=False))


def read_events(folder: Path):  # noqa: ANN201 (EventAccumulator is imported lazily)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_images_and_summary(tmp_path: Path) -> None:
    png = make_png(tmp_path / "plots" / "fold0_curves.png")
    with Trackers(tb_only(), tmp_path, "run-1", {"train": {"lr": 1e-3}}) as trackers:
        for row in ROWS:
            trackers.log_epoch(row)
        trackers.log_images([png, tmp_path / "plots" / "missing.png"])  # a missing file is skipped
        trackers.log_summary(SUMMARY)
    acc = read_events(tmp_path / "tensorboard")
    tags = acc.Tags()
    numeric = ("train_loss", "valid_loss", "macro_f1", "accuracy", "lr", "time_s", "mem_MiB")
    expected = {f"fold{f}/{k}" for f in (0, 1) for k in numeric}
    assert expected <= set(tags["scalars"])
    assert not {t for t in tags["scalars"] if t.startswith("fold") and t.endswith(("/stopped", "/note", "/epoch"))}
    for fold in (0, 1):
        for key in numeric:
            logged = [(r["epoch"], float(r[key])) for r in ROWS if r["fold"] == fold]
            read = [(e.step, e.value) for e in acc.Scalars(f"fold{fold}/{key}")]
            assert [s for s, _ in read] == [s for s, _ in logged]
            np.testing.assert_allclose([v for _, v in read], [v for _, v in logged], rtol=1e-6)
    assert tags["images"] == ["plots/fold0_curves"]
    image = acc.Images("plots/fold0_curves")[0]
    assert (image.width, image.height) == (64, 48)
    assert acc.Scalars("summary/oof/accuracy")[0].value == pytest.approx(0.81)
    assert acc.Scalars("summary/mean/macro_f1")[0].value == pytest.approx(0.8)


def test_tensorboard_off_writes_nothing(tmp_path: Path) -> None:
    trackers = Trackers(TrackingCfg(tensorboard=False), tmp_path, "run-1", {})
    trackers.log_epoch(ROWS[0])
    trackers.log_images([make_png(tmp_path / "a.png")])
    trackers.log_summary(SUMMARY)
    trackers.close()
    trackers.close()  # twice is harmless
    assert not (tmp_path / "tensorboard").exists()
    assert not (tmp_path / "wandb").exists()


def test_flatten_nested_summary() -> None:
    flat = flatten(SUMMARY)
    assert flat["oof/accuracy"] == 0.81
    assert flat["folds/0/best_epoch"] == 3
    assert flat["run_id"] == "run-1"


def test_wandb_missing_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    cfg = TrackingCfg(tensorboard=True, wandb=WandbCfg(enabled=True))
    with pytest.raises(UserError) as err:
        Trackers(cfg, tmp_path, "run-1", {})
    assert str(err.value) == WANDB_MISSING
    assert not (tmp_path / "tensorboard").exists()  # failed before opening any writer
    assert "pip install 'vistrain[wandb]'" in str(err.value) and "tracking.wandb.enabled=false" in str(err.value)


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B kept off the network and out of the home folder."""
    pytest.importorskip("wandb")  # pip install 'vistrain[wandb]'
    for name, value in {"WANDB_SILENT": "true", "WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false",
                        "WANDB_DISABLE_GIT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                        "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_wandb_offline_run_is_written_and_resumable(tmp_path: Path, offline_wandb: None) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = TrackingCfg(tensorboard=False, wandb=WandbCfg(enabled=True, mode="offline", tags=["test"]))
    png = make_png(run_dir / "plots" / "fold0_curves.png")
    for rows in (ROWS[:3], ROWS[3:]):  # the second Trackers is a --resume of the same run directory
        with Trackers(cfg, run_dir, "run-1", {"train": {"lr": 1e-3}}) as trackers:
            assert trackers.wandb_run.id == "run-1"
            assert trackers.wandb_run.name == "run-1"  # wandb.name empty: the run id
            for row in rows:
                trackers.log_epoch(row)
            trackers.log_images([png])
            trackers.log_summary(SUMMARY)
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert runs and all(r.name.endswith("-run-1") for r in runs)  # same W&B id both times
    records = [f for r in runs for f in r.glob("run-*.wandb")]
    assert records and all(f.stat().st_size > 0 for f in records)


def test_json_files_are_strict_json_with_null_for_nan(tmp_path):
    """summary.json / metrics.jsonl must parse everywhere: NaN and inf (Python or NumPy) are written as null."""
    from vistrain.tracking.files import json_line, write_json

    obj = {"mean": {"valid_loss": float("nan"), "mAP": np.float32(0.5)}, "std": [np.inf, 1.0],
           "arr": np.array([np.nan, 2.0])}
    write_json(tmp_path / "s.json", obj)
    text = (tmp_path / "s.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))
    assert strict == {"mean": {"valid_loss": None, "mAP": 0.5}, "std": [None, 1.0], "arr": [None, 2.0]}
    assert json.loads(json_line({"fold": 0, "train_loss": float("nan")})) == {"fold": 0, "train_loss": None}


def test_the_done_line_gives_a_spread_only_over_several_folds() -> None:
    """One fold has no standard deviation: the [DONE] line says so instead of '± 0.0000' (summary.json's 0.0)."""
    from vistrain.engine.summary import summary_line

    fold = {"best": {"macro_f1": 0.9}}
    one = {"monitor": "macro_f1", "mean": {"macro_f1": 0.9}, "std": {"macro_f1": 0.0}, "folds": [fold]}
    assert summary_line(one) == "macro_f1=0.9000 on 1 fold (no spread over folds)"
    two = {**one, "mean": {"macro_f1": 0.85}, "std": {"macro_f1": 0.0707}, "folds": [fold, fold]}
    assert summary_line(two) == "macro_f1=0.8500±0.0707 over 2 folds"
