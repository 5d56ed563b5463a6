"""``vistrain split``: write the fold assignment that ``train`` would use, without training."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from vistrain.config.schema import Config
from vistrain.data.prepare import prepare_data
from vistrain.data.splits import splits_table
from vistrain.tracking.files import write_csv

log = logging.getLogger(__name__)


def run_split(cfg: Config, output: Path) -> pd.DataFrame:
    data = prepare_data(cfg)
    table = splits_table(data.items, data.fold_of)
    write_csv(output, table)
    if "split" in table.columns:  # embedding runs: a train / val / test (or train / query / gallery) split
        sizes = table.groupby("split").size().to_dict()
        log.info("[DATA] %d images, split %s -> %s", len(table), sizes, output)
    else:
        sizes = table.groupby("fold").size().to_dict()
        log.info("[DATA] %d images in %d folds %s -> %s", len(table), cfg.data.folds, sizes, output)
    for message, listed in data.left_out(cfg.data):
        log.warning("[DATA] %s%s", message, ": " + ", ".join(listed["id"].astype(str).head(5)) if len(listed) else "")
    return table
