"""The augment grid: a training batch as the model receives it, each image with its label (``vistrain augment``,
and ``RUN/plots/augment_grid.png`` of every run). A mixed image (mixup / cutmix) reads ``a 0.7 / b 0.3``: the two
classes of its soft target and their shares."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vistrain.viz.plots import new_figure, save_png, short_name

MIN_SHARE = 0.005  # a second class below this share of a soft target is not shown


def _share(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def batch_labels(targets: np.ndarray, classes: Sequence[str], smoothing: float = 0.0) -> list[str]:
    """Each image's label: [N] class indices -> the class names; [N, C] soft targets (timm's mixup: each class's
    share times ``1 - smoothing``, plus ``smoothing / C`` for every class) -> ``"a 0.7 / b 0.3"``, the two
    largest shares, the smoothing taken out; one class alone when the other share is nil (an unmixed image, or one
    mixed with its own class)."""
    targets = np.asarray(targets)
    if targets.ndim == 1:
        return [short_name(classes[int(k)]) for k in targets]
    floor, scale = smoothing / targets.shape[1], 1.0 - smoothing
    labels = []
    for row in targets.astype(np.float64):
        shares = (row - floor) / scale
        first, second = np.argsort(-shares, kind="stable")[:2]
        label = short_name(classes[first])
        if shares[second] >= MIN_SHARE:
            label += f" {_share(shares[first])} / {short_name(classes[second])} {_share(shares[second])}"
        labels.append(label)
    return labels


def augment_grid_png(pixels: np.ndarray, labels: Sequence[str], path: Path, title: str) -> Path:
    """uint8 [N, H, W, 3] images in a near-square grid, each titled with its label, the whole under ``title``."""
    n = len(pixels)
    cols = min(n, max(4, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    fig = new_figure(1.9 * cols, 2.0 * rows + 0.5)
    fig.suptitle(title, fontsize=9)
    for i, (image, label) in enumerate(zip(pixels, labels)):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(image, interpolation="nearest")
        ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    return save_png(fig, path)
