"""``--mode`` presets. A preset is the base layer: the user's YAML overrides it, ``key=value`` overrides both."""

from __future__ import annotations

from typing import Any

MODES: dict[str, dict[str, Any]] = {
    # The schema's defaults: the config file alone decides.
    "basic": {},
    # basic, then predict data.image_dir_test into RUN/submission.csv (in data.sample_csv order when given).
    "full-pipeline": {},
    # Quick iteration: a small network, 224 px, a high learning rate, light augmentation.
    "fast": {
        "model": {"name": "efficientnet_b0"},
        "train": {"img_size": 224, "lr": 3e-3, "epochs": 10, "warmup_epochs": 1},
        "augment": {"policy": "light"},
    },
    # Best score: a larger network at 384 px, hard augmentation and mixup/cutmix.
    "highperf": {
        "model": {"name": "swin_base_patch4_window12_384", "drop_path_rate": 0.2},
        "train": {"img_size": 384, "lr": 1e-4, "epochs": 30, "warmup_epochs": 2, "label_smoothing": 0.1},
        "augment": {"policy": "hard", "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "mix_prob": 0.5},
    },
}
