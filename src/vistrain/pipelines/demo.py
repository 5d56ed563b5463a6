"""``vistrain demo``: scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped with scikit-learn,
nothing downloaded) written as PNG files in the seed's CSV layout, then ``configs/demo.yaml`` trained on them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import vistrain
from vistrain.config.loader import load_config
from vistrain.errors import UserError
from vistrain.pipelines.train import RunResult, run_train
from vistrain.tracking.files import write_csv

log = logging.getLogger(__name__)
DEMO_SIZE = 32  # pixels: the 8x8 scans upscaled 4x, so the usual resize path is exercised


def default_demo_config() -> Path:
    """``configs/demo.yaml`` of the source checkout this package runs from."""
    return Path(vistrain.__file__).resolve().parents[2] / "configs" / "demo.yaml"


def write_digits(out: Path, test_fraction: float = 0.2, seed: int = 0) -> dict[str, Path]:
    """Write ``train.csv``, ``train/``, ``test/``, ``sample_submission.csv`` and ``test_labels.csv`` under ``out``."""
    digits = load_digits()
    ids = np.array([f"digit_{i:04d}" for i in range(len(digits.target))])
    train_idx, test_idx = train_test_split(np.arange(len(ids)), test_size=test_fraction, stratify=digits.target,
                                           random_state=seed)
    for sub, idx in (("train", train_idx), ("test", test_idx)):
        folder = out / sub
        folder.mkdir(parents=True, exist_ok=True)
        for i in idx:
            pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
            img = Image.fromarray(pixels, mode="L").resize((DEMO_SIZE, DEMO_SIZE), Image.Resampling.BICUBIC)
            img.save(folder / f"{ids[i]}.png")
    write_csv(out / "train.csv", pd.DataFrame({"ID": ids[train_idx], "target": digits.target[train_idx]}))
    write_csv(out / "sample_submission.csv", pd.DataFrame({"ID": ids[test_idx], "target": 0}))
    write_csv(out / "test_labels.csv", pd.DataFrame({"ID": ids[test_idx], "target": digits.target[test_idx]}))
    return demo_paths(out)


def demo_paths(out: Path) -> dict[str, Path]:
    """The data keys of the demo layout under ``out``; ``test_csv`` makes ``evaluate RUN --split test`` work."""
    return {"train_csv": out / "train.csv", "image_dir_train": out / "train", "image_dir_test": out / "test",
            "sample_csv": out / "sample_submission.csv", "test_csv": out / "test_labels.csv"}


def run_demo(out: Path, config: Path | None = None, overrides: list[str] | None = None) -> RunResult:
    config = config or default_demo_config()
    if not config.is_file():
        raise UserError(f"--config: {config} not found; pass the demo config with --config")
    out = out.resolve()
    if not (out / "train.csv").is_file():
        log.info("[DATA] writing the scikit-learn digits (1,797 scans) as PNG files under %s", out)
        paths = write_digits(out)
    else:
        paths = demo_paths(out)
    data_overrides = [f"data.{k}={v}" for k, v in paths.items()]
    cfg = load_config(config, overrides=data_overrides + list(overrides or []))
    return run_train(cfg, config_path=config)
