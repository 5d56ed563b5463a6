"""See what you train on: ``vistrain augment`` draws the first training batch of fold 0 exactly as the loop gives
it to the model (preprocessed, augmented, mixed), with its labels; every run draws it into RUN/plots/ before
training, without changing the training, and its report shows it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import describe, read_metrics, run_cli, tiny_config, write_csv_dataset, write_yaml
from PIL import Image

from vistrain.config.loader import validate
from vistrain.engine.tasks import ClassificationTask
from vistrain.engine.training import run_train


def test_mixed_labels_read_as_the_two_classes_and_their_shares() -> None:
    from vistrain.viz.augment_grid import batch_labels

    classes = ["cat", "dog", "fox"]
    assert batch_labels(np.array([2, 0]), classes) == ["fox", "cat"]
    # timm's mixup targets with label smoothing 0.1 over 3 classes: off = 0.1 / 3, on = 1 - 0.1 + off
    off = 0.1 / 3
    on = 1 - 0.1 + off
    cat, dog = np.array([on, off, off]), np.array([off, on, off])
    soft = np.stack([0.7 * cat + 0.3 * dog, 0.25 * cat + 0.75 * dog, cat, 0.6 * dog + 0.4 * dog])
    assert batch_labels(soft, classes, smoothing=0.1) == ["cat 0.7 / dog 0.3", "dog 0.75 / cat 0.25", "cat", "dog"]
    # two classes: the smaller share is not the smoothing floor
    two = np.array([[0.7 * 0.95 + 0.3 * 0.05 * 1, 0.7 * 0.05 + 0.3 * 0.95]])
    assert batch_labels(two, ["a", "b"], smoothing=0.1) == ["a 0.7 / b 0.3"]


def _config(root: Path, tmp_path: Path, **augment: Any) -> dict[str, Any]:
    return tiny_config(root, augment={"policy": "light", "color_jitter": 0.4, **augment},
                       train={"epochs": 1, "label_smoothing": 0.1}, model={"drop_rate": 0.3},
                       output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None})


def _train_recording(raw: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list]:
    """Train ``raw``; every batch the model was given and the targets its loss saw, in order."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = ClassificationTask.training_loss

    def recording(self: ClassificationTask, model: torch.nn.Module, images: torch.Tensor,
                  targets: torch.Tensor) -> Any:
        criterion, given = self.criterion, []

        def spy_model(x: torch.Tensor) -> torch.Tensor:
            given.append(x.detach().clone())
            return model(x)

        def spy_loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            seen.append((given[-1], t.detach().clone()))
            return criterion(out, t)

        self.criterion = spy_loss
        try:
            return original(self, spy_model, images, targets)
        finally:
            self.criterion = criterion

    with monkeypatch.context() as m:
        m.setattr(ClassificationTask, "training_loss", recording)
        run = run_train(validate(raw)).run_dir
    return run, seen


def test_the_grid_is_the_batch_the_loop_trains_on_and_drawing_it_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vistrain.engine.augment_preview import run_first_batch
    from vistrain.engine.hooks.augment_grid import AugmentGrid

    root = write_csv_dataset(tmp_path / "data", per_class=12).root  # 18 training images: 2 batches of 8
    raw = _config(root, tmp_path, mixup_alpha=0.4, cutmix_alpha=1.0)
    with_grid, seen = _train_recording(raw, monkeypatch)
    monkeypatch.setattr(AugmentGrid, "before_train", lambda self, fold: None)
    without_grid, seen_without = _train_recording(raw, monkeypatch)
    monkeypatch.undo()

    assert (with_grid / "plots" / "augment_grid.png").is_file()
    assert not (without_grid / "plots" / "augment_grid.png").exists()
    # the training is the same, batch for batch, with or without the grid drawn before it
    assert len(seen) == len(seen_without) > 1
    for (x, t), (x0, t0) in zip(seen, seen_without):
        assert torch.equal(x, x0) and torch.equal(t, t0)
    keys = ("epoch", "train_loss", "valid_loss", "accuracy", "macro_f1")
    rows = [[{k: r[k] for k in keys} for r in read_metrics(run)] for run in (with_grid, without_grid)]
    assert rows[0] == rows[1] and len(rows[0]) == 1

    batch, classes = run_first_batch(validate(raw), n=8)
    images, targets = seen[0]
    assert targets.ndim == 2  # mixed: soft targets
    assert torch.equal(batch.images, images[:8]) and torch.equal(batch.targets, targets[:8])
    assert classes == ["0", "1", "2"]


def test_a_togray_pipeline_trains_and_the_augment_command_shows_grey_images(tmp_path: Path) -> None:
    """The issue's acceptance: a pipeline of only ToGray(p=1) saved with albumentations.save trains, and the grid's
    batch (its pixels, not only the PNG) is grey; the run keeps the file and its report shows the grid."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    A = pytest.importorskip("albumentations")
    from vistrain.engine.augment_preview import run_first_batch

    root = write_csv_dataset(tmp_path / "data", per_class=6).root
    pipeline = tmp_path / "grey.yaml"
    A.save(A.Compose([A.ToGray(p=1)]), str(pipeline), data_format="yaml")
    raw = _config(root, tmp_path, albumentations=str(pipeline))
    run = run_train(validate(raw)).run_dir
    assert (run / "augment_pipeline.yaml").read_bytes() == pipeline.read_bytes()
    html = (run / "report.html").read_text()
    section = html[html.index("<h2>What the model trained on</h2>"):]
    section = section[: section.index("</section>")]
    assert '<img alt="plots/augment_grid.png" src="data:image/png;base64,' in section
    assert html.count('alt="plots/augment_grid.png"') == 1  # not a second time under Plots

    config = write_yaml(tmp_path / "grey_config.yaml", raw)
    result = run_cli("augment", "--config", str(config), "--n", "6", "--output", "out/grid.png", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    grid = tmp_path / "out" / "grid.png"
    assert "[DONE] augment grid written to out/grid.png" in result.stdout
    with Image.open(grid) as img:
        assert img.format == "PNG" and img.width > 100 and img.height > 100

    pixels = run_first_batch(validate(raw), n=6)[0].pixels()
    assert pixels.shape == (6, 32, 32, 3)
    spread = pixels.astype(int).max(axis=3) - pixels.astype(int).min(axis=3)
    assert spread.max() <= 1  # R = G = B, up to the normalisation's rounding
    colour = run_first_batch(validate(_config(root, tmp_path)), n=6)[0].pixels().astype(int)
    assert (colour.max(axis=3) - colour.min(axis=3)).mean() > 20  # the same batch without the pipeline has colour


def test_the_augment_command_names_a_bad_config_in_one_line(tmp_path: Path) -> None:
    root = write_csv_dataset(tmp_path / "data", per_class=4).root
    config = write_yaml(tmp_path / "c.yaml", _config(root, tmp_path, policy="medium"))
    result = run_cli("augment", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2 and "augment.policy" in result.stderr and "Traceback" not in result.stderr, \
        describe(result)
    assert not (tmp_path / "augment_grid.png").exists()
