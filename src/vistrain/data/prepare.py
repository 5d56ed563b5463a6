"""The data of a run, loaded and checked before anything is written (``prepare_data``): the item table from the
source(s), the class list (or the class map's), unreadable images split off, the folds or the ratio split. A user
error stops here, with no run directory. ``train``, ``split``, ``manifest`` and ``audit`` start from it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vistrain.config.schema import Config, DataCfg
from vistrain.data.cache import RunCache, open_cache
from vistrain.data.classmap import ClassMap, check_against, load_class_map
from vistrain.data.images import set_max_pixels
from vistrain.data.preprocess import Preprocessor
from vistrain.data.sources import (
    check_classes,
    check_min_images,
    drop_small_groups,
    group_origin,
    load_items,
    split_bad_images,
)
from vistrain.data.splits import (
    assign_class_split,
    assign_folds,
    assign_ratio_split,
    check_class_disjoint,
    classification_split,
    splits_table,
)
from vistrain.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """The data of a run, checked before anything is written: a user error stops here, with no run directory."""

    items: pd.DataFrame  # readable items only
    bad: pd.DataFrame  # unreadable or missing images, then those dropped by data.min_image_size, with a reason
    classes: list  # class labels in index order
    targets: np.ndarray  # [N] class index per item (-1 for items that do not train: queries, gallery)
    fold_of: np.ndarray  # [N] fold per item (embedding runs: one fold, 0, split by data.items["split"]; a ratio
    # split: 0 for the val items, -1 for the others)
    eval_codes: np.ndarray | None = None  # embedding: [N] identity / class code, equal codes match
    queries_without_match: int = 0  # re-id: queries the metrics skip (no gallery match on another camera)
    too_small: int = 0  # the last rows of ``bad``: dropped by data.min_image_size
    not_in_class_names: tuple[int, int] = (0, 0)  # embedding: (images, classes) left out by data.class_names
    class_map: ClassMap | None = None  # data.class_map, when given
    ratio_split: bool = False  # classification with data.split: ratio (items["split"]: train / val / test)
    split_given: bool = False  # ... taken from the data's split column rather than drawn by the ratios
    cache: RunCache | None = None  # decoded pixels of every readable item (data.cache), None when off

    def fold_indices(self, fold: int) -> tuple[np.ndarray, np.ndarray]:
        """(training, validation) item indices of a classifier's fold; a ratio split's test items are in neither."""
        if self.ratio_split:
            split = self.items["split"].to_numpy()
            return np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
        return np.flatnonzero(self.fold_of != fold), np.flatnonzero(self.fold_of == fold)

    def left_out(self, d: DataCfg) -> list[tuple[str, pd.DataFrame]]:
        """What the data lost before training: (log message, the items it lost, when listed in bad_images.csv)."""
        out = []
        images, classes = self.not_in_class_names
        if classes:
            kept = len(d.class_names or [])
            out.append((f"data.class_names keeps {kept} of {kept + classes} classes: {images} image(s) of {classes} "
                        "class(es) left out", self.bad.iloc[:0]))
        cut = len(self.bad) - self.too_small
        unreadable, small = self.bad.iloc[:cut], self.bad.iloc[cut:]
        if len(unreadable):
            out.append((f"{len(unreadable)} unreadable or missing image(s) left out", unreadable))
        if len(small):
            out.append((f"{len(small)} image(s) dropped: smaller than data.min_image_size={d.min_image_size} or in a "
                        "group with such an image", small))
        return out


def prepare_data(cfg: Config) -> Prepared:
    set_max_pixels(cfg.data.max_image_pixels)
    if cfg.task == "embedding":
        return _prepare_embedding(cfg)
    d = cfg.data
    items = load_items(d)
    class_map = load_class_map(d.class_map) if d.class_map is not None else None
    classes = check_against(class_map, items) if class_map else check_classes(items, d.class_names)
    items, bad, cache = _readable(cfg, items)
    if items.empty:
        raise UserError(f"data: no readable image among {len(bad)} items (see the paths, e.g. {bad['path'].iloc[0]})")
    check_min_images(items, classes, d.min_images_per_class)
    index = {c: i for i, c in enumerate(classes)}
    targets = items["label"].map(index).to_numpy(dtype=np.int64)
    given = "split" in items.columns
    if d.split == "ratio":
        items["split"] = classification_split(items, d.train_ratio, d.val_ratio, d.test_ratio, cfg.project.seed,
                                              group_origin(d))
        fold_of = np.where(items["split"] == "val", 0, -1).astype(np.int64)
    else:
        fold_of = assign_folds(items, d.folds, cfg.project.seed, d.stratify, group_origin(d))
    return Prepared(items, bad, classes, targets, fold_of, class_map=class_map, ratio_split=d.split == "ratio",
                    split_given=given, cache=cache)


def _readable(cfg: Config, items: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, RunCache | None]:
    """(readable items, unreadable ones with the reason, the decode-once cache): with ``data.cache`` the one decode
    that fills the cache is also the check for unreadable files."""
    d = cfg.data
    if d.cache == "off":
        return (*split_bad_images(items, d.on_bad_image), None)
    cache = open_cache(items.loc[items["path"] != "", "path"].tolist(), Preprocessor.from_config(cfg), d.cache,
                       d.cache_dir, max_pixels=d.max_image_pixels)
    return (*split_bad_images(items, d.on_bad_image, cache.errors), cache)


def _queries_without_match(items: pd.DataFrame) -> tuple[int, int]:
    """(queries with no gallery image of their person from another camera, all queries) of a re-id item table.

    The Market-1501 protocol does not count same-camera matches, so the metrics skip such queries.
    """
    cams = items[items["split"] == "gallery"].groupby("label")["camera"].agg(set).to_dict()
    query = items[items["split"] == "query"]
    valid = [bool(cams.get(label, set()) - {cam}) for label, cam in zip(query["label"], query["camera"])]
    return len(valid) - sum(valid), len(valid)


def _check_reid_queries(items: pd.DataFrame, d: DataCfg) -> int:
    """How many re-id queries the metrics will skip. None having a match is a mistake in the data: an error now,
    not after an epoch of training."""
    missing, total = _queries_without_match(items)
    if missing == total:
        raise UserError(f"data.query_folder: none of the {total} queries in '{d.query_folder}' has an image of its "
                        f"person from another camera in data.gallery_folder '{d.gallery_folder}' (same-camera "
                        "matches do not count in the Market-1501 protocol); check that the two folders belong "
                        "together")
    return missing


def _prepare_embedding(cfg: Config) -> Prepared:
    """Items with a ``split`` column (reid folders, or a grouped class-stratified ratio split); the training
    identities are the classes of the head."""
    d = cfg.data
    items = load_items(d)
    items, not_listed = _select_classes(items, d)
    dropped = pd.DataFrame()
    if d.min_image_size:
        items, dropped = drop_small_groups(items, d.min_image_size)
    items, bad, cache = _readable(cfg, items)
    bad = pd.concat([bad, dropped], ignore_index=True)
    skipped = 0
    if "split" not in items.columns and d.split_classes:
        items["split"] = assign_class_split(items, d.val_ratio, d.test_ratio, cfg.project.seed)
    elif "split" not in items.columns:
        items["split"] = assign_ratio_split(items, d.train_ratio, d.val_ratio, d.test_ratio, cfg.project.seed)
    elif (items["split"] == "query").any():  # re-id folders (a manifest's split column holds train / val / test)
        skipped = _check_reid_queries(items, d)
    elif d.split_classes:
        check_class_disjoint(items, items["split"].to_numpy(), "the data's split column")
    if d.split_classes:
        _check_leave_one_out(items)
    train = items["split"] == "train"
    classes = sorted(items.loc[train, "label"].unique().tolist())
    if len(classes) < 2:
        raise UserError(f"data: embedding training needs at least 2 identities or classes; found {len(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    targets = np.where(train, items["label"].map(index).fillna(-1), -1).astype(np.int64)
    codes = {v: i for i, v in enumerate(sorted(items["label"].astype(str).unique()))}
    eval_codes = items["label"].astype(str).map(codes).to_numpy(dtype=np.int64)
    return Prepared(items, bad, classes, targets, np.zeros(len(items), dtype=np.int64), eval_codes, skipped,
                    len(dropped), not_listed, cache=cache)


def _check_leave_one_out(items: pd.DataFrame) -> None:
    """data.split_classes validates each val image against the other val images: some val class needs two."""
    val = items.loc[items["split"] == "val", "label"]
    if not (val.value_counts() > 1).any():
        raise UserError(f"data.split_classes: the {val.nunique()} validation class(es) hold one image each, so no "
                        "validation image has another of its class to retrieve; raise data.val_ratio or add images")


def _select_classes(items: pd.DataFrame, d: DataCfg) -> tuple[pd.DataFrame, tuple[int, int]]:
    """Embedding runs: ``data.class_names`` picks the classes to use (seed 002); returns the kept items and the
    (images, classes) left out. A classifier's list must instead equal the data's classes (``check_classes``)."""
    if d.class_names is None:
        return items, (0, 0)
    if d.source == "reid":
        raise UserError("data.class_names: not used by data.source: reid (identities come from the file names); "
                        "remove it, or choose the images with data.train_folder")
    labels = items["label"].astype(str)
    missing = [n for n in d.class_names if n not in set(labels)]
    if missing:
        raise UserError(f"data.class_names: {', '.join(missing)} not in the data; classes found: "
                        f"{', '.join(sorted(set(labels))[:20])}{' ...' if labels.nunique() > 20 else ''}")
    keep = labels.isin(d.class_names)
    return items[keep].reset_index(drop=True), (int((~keep).sum()), int(labels[~keep].nunique()))


def write_splits(cfg: Config, output: Path) -> pd.DataFrame:
    """``vistrain split``: the assignment ``train`` would use for ``cfg``'s data, written to ``output``."""
    from vistrain.tracking.files import write_csv

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
