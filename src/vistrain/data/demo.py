"""The demo data sets of ``vistrain demo`` (``vistrain.demo``), written on the spot, nothing downloaded.

``--scenario digits`` (default): scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped with scikit-learn)
written as PNG files in the seed's CSV layout, then ``configs/demo.yaml``.
``--scenario pills``: the generated two-domain pill set (``data.synthetic_pills``: studio renders and "real" photos),
then ``configs/demo_pills.yaml`` (seed 003 shrunk), then the int8 ONNX export with its budget lines.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from vistrain.config.bundled import bundled_config
from vistrain.config.loader import read_yaml
from vistrain.data.synthetic_pills import DOMAINS, write_pills
from vistrain.errors import UserError
from vistrain.tracking.files import write_csv

log = logging.getLogger(__name__)
DEMO_SIZE = 32  # pixels: the 8x8 scans upscaled 4x, so the usual resize path is exercised
DEMO_CONFIGS = {"digits": "demo.yaml", "pills": "demo_pills.yaml"}
DEFAULT_OUT = {"digits": Path("demo_data"), "pills": Path("demo_data") / "pills"}
# The pills demo's export: seed 003's deployment targets (50 ms per image on a CPU, a 100 MB file).
# A file over budget is a FAIL line, not a failed demo.
PILLS_EXPORT = {"quantize": "int8", "budget_ms": 50.0, "budget_mb": 100.0, "fail_over_budget": False}


def default_demo_config(scenario: str = "digits") -> Path:
    """``configs/demo.yaml`` (or the scenario's config) shipped in the package: found in a wheel install too."""
    return bundled_config(DEMO_CONFIGS[scenario])


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


def digits_overrides(out: Path, config: Path) -> tuple[list[str], int]:
    """Write the digits under ``out`` unless they are there; the data keys pointing at them, and the class count."""
    if not (out / "train.csv").is_file():
        log.info("[DATA] writing the scikit-learn digits (1,797 scans) as PNG files under %s", out)
        paths = write_digits(out)
    else:
        paths = demo_paths(out)
    return [f"data.{k}={v}" for k, v in paths.items()], 10


def pills_overrides(out: Path, config: Path) -> tuple[list[str], int]:
    """Write the pill set under ``out`` unless it is there; ``data.sources`` as in ``config`` with each source's
    folder replaced by the domain the generator wrote, ``data.class_map``, and the class count."""
    if not (out / "class_map.json").is_file():
        start = time.time()
        counts = write_pills(out)
        log.info("[DATA] wrote %s generated pill images under %s in %.1f s",
                 " + ".join(f"{n} {d}" for d, n in counts.items()), out, time.time() - start)
    data = read_yaml(config).get("data")
    sources = data.get("sources") if isinstance(data, dict) else None
    if not isinstance(sources, list) or not all(isinstance(s, dict) for s in sources):
        raise UserError(f"{config}: data.sources: the pills demo needs a list of sources named after the domains it "
                        f"writes ({', '.join(DOMAINS)}), as in configs/demo_pills.yaml")
    for i, source in enumerate(sources):
        if source.get("name") not in DOMAINS:
            raise UserError(f"{config}: data.sources[{i}].name: '{source.get('name')}' is not a domain the pills demo "
                            f"writes; valid: {', '.join(DOMAINS)}")
        source["image_dir_train"] = str(out / source["name"])
    num_classes = json.loads((out / "class_map.json").read_text())["num_classes"]
    return [f"data.sources={json.dumps(sources)}", f"data.class_map={out / 'class_map.json'}"], num_classes


SCENARIOS: dict[str, Callable[[Path, Path], tuple[list[str], int]]] = {
    "digits": digits_overrides, "pills": pills_overrides}
