"""What the model is given first: the first training batch of a fold, as the loop receives it.

``first_batch`` takes a fold's own training loader, batch transform (``augment.device: cuda``) and task, and
builds batch 1 of epoch 1 the way the loop does: the epoch's first batch of ``EpochBatches`` (each item decoded,
preprocessed and augmented under its own seed), collated, moved to the device, transformed there, then mixed by the
task (mixup / cutmix with the fold's first mixing seed). Every global generator (Python, NumPy, torch on the CPU and
the device) is put back afterwards, and the sampler's epoch too, so drawing it before the fold trains changes
nothing of the training (the ``AugmentGrid`` hook does, for every run's report).

``write_augment_grid`` is ``vistrain augment``: fold 0 set up as the Trainer sets it up (the data, the machine and
its ``auto`` settings, the fold's seed, ``SETUPS``), its first batch drawn to a PNG grid (``viz/augment_grid.py``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vistrain.config.schema import Config
from vistrain.data.albu import check_pipeline
from vistrain.data.preprocess import Preprocessor
from vistrain.engine.checkpoint import seed_everything
from vistrain.engine.distributed import SINGLE

log = logging.getLogger(__name__)


@dataclass
class TrainingBatch:
    """The first ``n`` images of a training batch as the model receives them."""

    images: torch.Tensor  # [N, 3, H, W] float32 on the CPU: augmented, normalised, mixed
    targets: torch.Tensor  # [N] class indices, or [N, C] soft targets when the batch was mixed
    mean: tuple[float, float, float]  # the normalisation, undone for display
    std: tuple[float, float, float]

    def pixels(self) -> np.ndarray:
        """uint8 [N, H, W, 3]: the images de-normalised (an erased rectangle shows the model's mean colour)."""
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        x = (self.images.float() * std + mean).clamp(0, 1) * 255
        return x.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@contextmanager
def _generators_kept(device: torch.device) -> Iterator[None]:
    """Python's, NumPy's and torch's generators (the device's too) as they were before the block."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@torch.no_grad()
def first_batch(loader: DataLoader, task: Any, transform: Callable[[torch.Tensor], torch.Tensor] | None,
                device: torch.device, seed: int, pre: Preprocessor, n: int) -> TrainingBatch:
    """Batch 1 of epoch 1 of the fold whose training ``loader`` (an ``EpochBatches`` batch sampler), device
    ``transform`` and ``task`` are given; ``seed``: the fold's (``setup.fold_seed``). The whole batch is made (mixup
    pairs image i with image B-1-i; the device draws per batch), then its first ``n`` images kept."""
    sampler = loader.batch_sampler
    before = (sampler.seed, sampler.epoch, sampler.skip)
    with _generators_kept(device):
        sampler.set_epoch(seed, 0)
        try:
            items = next(iter(sampler))
        finally:
            sampler.set_epoch(*before)
        images, targets, _ = loader.collate_fn([loader.dataset[item] for item in items])
        images, targets = images.to(device), targets.to(device)
        if transform is not None:
            images = transform(images)
        images, targets = task.mix_batch(images, targets, 0)
    return TrainingBatch(images[:n].float().cpu(), targets[:n].cpu(), pre.mean, pre.std)


def run_first_batch(cfg: Config, n: int) -> tuple[TrainingBatch, list[str]]:
    """Fold 0's first training batch (its first ``n`` images) and the class names, the fold set up as the Trainer
    sets it up on this machine."""
    from vistrain.data.prepare import prepare_data
    from vistrain.engine.run_setup import resolve_auto, setup_machine
    from vistrain.engine.setup import SETUPS, batch_transform, fold_seed

    check_pipeline(cfg.augment, cfg.train.img_size)  # before the data is read, as train checks it
    data = prepare_data(cfg)
    machine = setup_machine(cfg, data, SINGLE)
    cfg = resolve_auto(cfg, machine, len(data.classes), data.cache is not None)
    seed_everything(cfg.project.seed)  # the Trainer's fold 0 starts from this seed (the device's draws follow it)
    setup = SETUPS[cfg.task](cfg, data, 0, machine.device, SINGLE)
    transform = batch_transform(cfg, setup.preprocessor, machine.device)
    batch = first_batch(setup.train_loader, setup.task, transform, machine.device, fold_seed(cfg.project.seed, 0),
                        setup.preprocessor, n)
    return batch, [str(c) for c in data.classes]


def draw(batch: TrainingBatch, classes: Sequence[str], smoothing: float, path: Path, title: str) -> Path:
    """The batch as a grid of labelled images at ``path`` (PNG)."""
    from vistrain.viz.augment_grid import augment_grid_png, batch_labels

    return augment_grid_png(batch.pixels(), batch_labels(batch.targets.numpy(), classes, smoothing), path, title)


def write_augment_grid(cfg: Config, output: Path, n: int = 32) -> Path:
    """``vistrain augment``: fold 0's first training batch drawn to ``output``."""
    batch, classes = run_first_batch(cfg, n)
    path = draw(batch, classes, cfg.train.label_smoothing, output, title(cfg, 0, len(batch.images)))
    log.info("[DATA] augment grid: %d images of fold 0's first training batch -> %s", len(batch.images), path)
    return path


def title(cfg: Config, fold: int, n: int) -> str:
    """The grid's heading: which batch, and what made it."""
    a = cfg.augment
    made = [f"policy {a.policy}", "albumentations " + Path(a.albumentations).name if a.albumentations else "",
            "mixup/cutmix" if a.mixup_alpha or a.cutmix_alpha else "", "on the GPU" if a.device == "cuda" else ""]
    return f"fold {fold}, first training batch ({n} images) as the model receives it: " + ", ".join(filter(None, made))
