"""``vistrain manifest --config F [--output manifest.json]``: what a run would train on, described in one file
(seed 003's ``manifest.json``) without training. ``train`` writes the same file into the run directory.

The file holds the format ``version``, a ``dataset_hash`` over every readable image's path, label, size and
modification time (so any added, removed, relabelled or rewritten image changes it), the classes in index order,
the class distribution per split and per domain, and the preprocessing and augmentation settings.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

from vistrain._version import __version__
from vistrain.config.loader import config_to_dict
from vistrain.config.schema import Config
from vistrain.data.sources import single_domain_classes
from vistrain.tracking.files import write_json

log = logging.getLogger(__name__)
VERSION = 1  # of this file's layout


def dataset_hash(items: pd.DataFrame) -> str:
    """sha256 over the sorted (path, label, size, mtime in ns) of every item: the data as it is on disk now."""
    h = hashlib.sha256()
    for path, label in sorted(zip(items["path"].astype(str), items["label"].astype(str))):
        st = os.stat(path)
        h.update(f"{path}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _distribution(labels: pd.Series, classes: list) -> dict[str, int]:
    """Images per class, every class listed (0 when absent), in class order."""
    counts = labels.astype(str).value_counts()
    return {str(c): int(counts.get(str(c), 0)) for c in classes}


def _split_names(cfg: Config, items: pd.DataFrame, fold_of: Any) -> pd.Series:
    """Each item's split: train / val / test (ratio split, embedding, re-id folders), or fold<k> (K folds)."""
    if "split" in items.columns and (cfg.task == "embedding" or cfg.data.split == "ratio"):
        return items["split"].astype(str)
    return pd.Series([f"fold{k}" for k in fold_of], index=items.index)


def build_manifest(cfg: Config, data: Any) -> dict[str, Any]:
    """The manifest of prepared data (``data.prepare.Prepared``)."""
    from vistrain.data.preprocess import Preprocessor

    items, classes = data.items, data.classes
    split = _split_names(cfg, items, data.fold_of)
    ratios = cfg.data.domain_ratios() or {}
    domains: dict[str, Any] = {}
    if "domain" in items.columns:
        for name, part in items.groupby(items["domain"].astype(str), sort=True):
            domains[name] = {"num_images": len(part), "ratio": ratios.get(name),
                             "class_distribution": _distribution(part["label"], classes)}
    return {
        "version": VERSION,
        "dataset_name": cfg.project.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "vistrain_version": __version__,
        "dataset_hash": dataset_hash(items),
        "task": cfg.task,
        "num_classes": len(classes),
        "classes": [str(c) for c in classes],
        "total_images": len(items),
        "left_out_images": len(data.bad),  # unreadable or missing, or dropped by data.min_image_size
        "split": {"type": "ratio" if data.ratio_split or cfg.task == "embedding" else "kfold",
                  **({} if data.ratio_split or cfg.task == "embedding" else {"folds": cfg.data.folds})},
        "splits": {name: {"num_images": len(part), "class_distribution": _distribution(part["label"], classes)}
                   for name, part in items.groupby(split, sort=True)},
        "domains": domains,
        "classes_in_one_domain_only": single_domain_classes(items),
        "class_distribution": _distribution(items["label"], classes),
        "preprocessing": Preprocessor.from_config(cfg).to_dict(),
        "augmentation": {"train": config_to_dict(cfg)["augment"], "val": None, "test": None},
    }


def run_manifest(cfg: Config, output: Path) -> dict[str, Any]:
    """Read and check the data as ``train`` would (user errors surface the same way), then write the manifest."""
    from vistrain.data.prepare import prepare_data

    data = prepare_data(cfg)
    manifest = build_manifest(cfg, data)
    write_json(output, manifest)
    per_split = {k: v["num_images"] for k, v in manifest["splits"].items()}
    log.info("[DATA] %d images, %d classes | splits %s%s | hash %s... -> %s", manifest["total_images"],
             manifest["num_classes"], per_split,
             " | domains " + str({k: v["num_images"] for k, v in manifest["domains"].items()})
             if manifest["domains"] else "", manifest["dataset_hash"][:12], output)
    for message, listed in data.left_out(cfg.data):
        log.warning("[DATA] %s%s", message, ": " + ", ".join(listed["id"].astype(str).head(5)) if len(listed) else "")
    return manifest
