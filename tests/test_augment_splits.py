"""``augment.splits`` (issue 22 item 3): AugMix's splits as timm's ``--aug-splits K`` with its ``JsdCrossEntropy``.
Each training image reaches the model as K views in timm's batch layout (split k in rows k·B .. (k+1)·B - 1, the
clean one first: the normalised image as validation sees it), the loss is timm's JsdCrossEntropy(num_splits=K,
alpha=12, smoothing=train.label_smoothing), validation is unchanged, and the combinations timm refuses or has no
meaning for are one-line errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import describe, last_line, run_cli, tiny_config, write_csv_dataset, write_yaml
from timm.loss import JsdCrossEntropy

from vistrain.config import load_config
from vistrain.config.loader import validate
from vistrain.errors import ConfigError

K, BATCH, SMOOTHING = 3, 4, 0.1


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv_dataset(tmp_path_factory.mktemp("splits") / "data", per_class=6, size=32).root


def splits_config(data: Path, root: Path, **augment: Any) -> Path:
    raw = tiny_config(data, augment={"policy": "hard", "random_erasing": 0.5, "splits": K, **augment},
                      train={"batch_size": BATCH, "epochs": 1, "num_threads": 1, "amp": "fp32",
                             "label_smoothing": SMOOTHING},
                      model={"name": "test_resnet"}, tracking={"tensorboard": False})
    raw["output"] = {"exp_dir": str(root / "exp"), "logs_dir": None}
    return write_yaml(root / "cfg.yaml", raw)


def test_the_batch_holds_the_clean_view_then_the_augmented_ones_and_the_loss_is_timms_jsd(
        data: Path, tmp_path: Path) -> None:
    from vistrain.data.prepare import prepare_data
    from vistrain.engine.setup import classification_setup

    cfg = load_config(splits_config(data, tmp_path))
    prepared = prepare_data(cfg)
    setup = classification_setup(cfg, prepared, 0, torch.device("cpu"))
    setup.train_loader.batch_sampler.set_epoch(cfg.project.seed, 0)
    images, targets, indices = next(iter(setup.train_loader))
    assert images.shape == (K * BATCH, 3, 32, 32) and targets.shape == indices.shape == (K * BATCH,)
    views = images.view(K, BATCH, 3, 32, 32)  # torch.split(images, BATCH): the splits in order
    dataset = setup.train_loader.dataset
    for i, item in enumerate(indices[:BATCH].tolist()):
        assert torch.equal(indices[i::BATCH], torch.full((K,), item)), "row k·B + i is split k of image i"
        assert (targets[i::BATCH] == dataset.labels[item]).all()
        clean = setup.preprocessor.normalize(dataset.decode(dataset.paths[item]))
        assert torch.equal(views[0, i], clean), "split 0 is the clean image, normalised only"
        for k in range(1, K):
            assert not torch.equal(views[k, i], clean), f"split {k} is augmented"
        assert not torch.equal(views[1, i], views[2, i]), "each augmented split is a draw of its own"
    valid_images, _, _ = next(iter(setup.valid_loader))
    assert valid_images.shape[1:] == (3, 32, 32) and valid_images.shape[0] <= 2 * BATCH, "validation as before"

    logits = torch.randn(K * BATCH, 3, generator=torch.Generator().manual_seed(0)) * 3
    fixed_targets = torch.tensor([0, 2, 1, 1] * K)
    want = JsdCrossEntropy(num_splits=K, alpha=12, smoothing=SMOOTHING)(logits, fixed_targets)
    assert torch.allclose(setup.task.criterion(logits, fixed_targets), want, rtol=0, atol=1e-6)

    setup.model.eval()  # no dropout or batch statistics: the same logits twice
    loss, _ = setup.task.training_loss(setup.model, images, targets)
    with torch.no_grad():
        reference = JsdCrossEntropy(num_splits=K, alpha=12, smoothing=SMOOTHING)(setup.model(images), targets)
    assert torch.allclose(loss.detach(), reference, rtol=0, atol=1e-6)


def test_one_epoch_with_three_splits_trains(data: Path, tmp_path: Path) -> None:
    from vistrain.engine.training import run_train

    result = run_train(load_config(splits_config(data, tmp_path)))
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and 0 < rows[0]["train_loss"] < 50, rows
    assert json.loads((result.run_dir / "run.json").read_text())["status"] == "success"


@pytest.mark.parametrize(("task", "augment", "train", "words"), [
    ("classification", {"splits": 1}, {}, ["augment.splits", "0 turns the splits off"]),
    ("embedding", {"splits": 3}, {}, ["augment.splits: 3", "task: embedding"]),
    ("classification", {"splits": 3, "mixup_alpha": 0.2}, {}, ["augment.splits: 3", "mixup", "timm"]),
    ("classification", {"splits": 3, "cutmix_alpha": 1.0}, {}, ["augment.splits: 3", "augment.cutmix_alpha"]),
    ("classification", {"splits": 3}, {"class_weights": "balanced"}, ["train.class_weights: balanced",
                                                                      "JsdCrossEntropy"]),
    ("classification", {"splits": 3, "device": "cuda"}, {}, ["augment.device: cuda", "augment.splits: 3"]),
], ids=["one-split", "embedding", "mixup", "cutmix", "class-weights", "device-cuda"])
def test_splits_where_timm_or_the_task_has_no_meaning_for_them_are_refused(task: str, augment: dict, train: dict,
                                                                           words: list[str]) -> None:
    raw = tiny_config(Path("/x"), augment=augment, train=train)
    raw["task"] = task
    if task == "embedding":
        raw["data"] = {"source": "csv", "train_csv": "/x/t.csv", "image_dir_train": "/x/t"}
        raw["loss"] = {"terms": [{"name": "ce"}]}
    with pytest.raises(ConfigError) as err:
        validate(raw)
    text = str(err.value)
    assert "\n" not in text and all(w in text for w in words), text


def test_the_cli_refuses_splits_with_mixup_in_one_line_exit_2(data: Path, tmp_path: Path) -> None:
    cfg = splits_config(data, tmp_path, mixup_alpha=0.2)
    result = run_cli("train", "--config", str(cfg), cwd=tmp_path, timeout=120)
    assert result.returncode == 2, describe(result)
    assert "augment.splits: 3 and mixup/cutmix" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr, describe(result)
    assert not (tmp_path / "exp").exists() or not list((tmp_path / "exp").rglob("run.json"))
    assert last_line(result.stdout + result.stderr)


@pytest.mark.skipif(importlib.util.find_spec("kornia") is None, reason="augment.device: auto needs Kornia")
def test_auto_augments_on_the_cpu_when_the_views_are_split() -> None:
    from vistrain.config.schema import AugmentCfg
    from vistrain.engine.run_setup import _augment_device

    gpu = torch.device("cuda")  # only the device's type is read
    assert _augment_device(AugmentCfg(device="auto", splits=0), gpu) == "cuda"
    assert _augment_device(AugmentCfg(device="auto", splits=K), gpu) == "cpu"


def test_an_auto_batch_is_shared_by_the_splits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The model sees K·B inputs per batch: the batch that fits in memory is divided by K."""
    from vistrain.engine import autobatch
    from vistrain.engine.device import PRECISIONS

    monkeypatch.setattr(autobatch, "find_batch_size", lambda *args, **kwargs: 64)
    cfg = load_config(splits_config(tmp_path, tmp_path))
    cfg.train.batch_size = "auto"
    batch, why = autobatch.resolve_batch_size(cfg, torch.device("cuda"), PRECISIONS["fp32"], 3)
    assert batch == 64 // K and "augment.splits" in why
