"""Fold assignment: stratified K-fold, grouped whenever a group holds more than one image."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

from vistrain.data.sources import SPLIT_VALUES
from vistrain.errors import UserError

GROUPS = ("data.group_col", "the 'group' column")  # group_origin's answer for an item table with no config


def assign_folds(items: pd.DataFrame, folds: int, seed: int, stratify: bool = True,
                 groups_from: tuple[str, str] = GROUPS) -> np.ndarray:
    """Fold index per row of ``items`` ([N] int). Deterministic for the same items, folds and seed.

    An existing ``fold`` column (from the CSV) is used as is, once no group lies in two of its folds (a
    ``UserError`` naming them and ``groups_from``: ``sources.group_origin``'s key and text). Otherwise
    StratifiedKFold, or StratifiedGroupKFold when some group holds several images, so no group is on both sides.
    """
    if "fold" in items.columns:
        values = _given_folds(items["fold"], folds)
        _refuse_straddling(items["group"], pd.Series(values, index=items.index), groups_from,
                           "the folds of the 'fold' column", "fold")
        return values
    n_groups = items["group"].nunique()
    grouped = n_groups < len(items)
    units = n_groups if grouped else len(items)
    if units < folds:
        what = "groups" if grouped else "images"
        raise UserError(f"data.folds: {folds} folds need at least {folds} {what}; the data has {units}")
    y = items["label"].astype(str).to_numpy()
    x = np.zeros(len(items))
    if grouped:
        groups = items["group"].astype(str).to_numpy()
        if stratify:
            splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        else:
            # GroupKFold does not shuffle: permute the groups' names with the seed instead.
            rng = np.random.default_rng(seed)
            names = np.unique(groups)
            remap = dict(zip(names, rng.permutation(len(names))))
            groups = np.array([remap[g] for g in groups])
            splitter = GroupKFold(n_splits=folds)
        parts = splitter.split(x, y, groups)
    elif stratify:
        least = pd.Series(y).value_counts().min()
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed) if least >= folds else None
        if splitter is None:
            # A class rarer than the fold count cannot be in every fold; sklearn would only warn.
            rare = pd.Series(y).value_counts().idxmin()
            raise UserError(f"data.stratify: class '{rare}' has {least} image(s), fewer than data.folds={folds}; "
                            "lower data.folds or set data.stratify=false")
        parts = splitter.split(x, y)
    else:
        parts = KFold(n_splits=folds, shuffle=True, random_state=seed).split(x)
    fold_of = np.full(len(items), -1, dtype=np.int64)
    for k, (_, valid_idx) in enumerate(parts):
        fold_of[valid_idx] = k
    return fold_of


def _given_folds(column: pd.Series, folds: int) -> np.ndarray:
    try:
        values = column.astype(int).to_numpy()
    except ValueError as err:
        raise UserError("data.train_csv: the 'fold' column must hold integers") from err
    found = sorted(set(values.tolist()))
    if found != list(range(folds)):
        raise UserError(f"data.folds: the CSV's 'fold' column has folds {found}, but data.folds={folds} "
                        f"expects 0..{folds - 1}")
    return values


def _refuse_straddling(groups: pd.Series, parts: pd.Series, groups_from: tuple[str, str], what: str,
                       unit: str) -> None:
    """A ``UserError`` when a group lies in more than one of the given ``parts`` (folds, or train / val / test):
    its images would be trained on and validated on, the leak grouping exists to prevent."""
    per_group = parts.groupby(groups.astype(str).to_numpy()).agg(lambda v: [str(x) for x in sorted(set(v))])
    straddling = per_group[per_group.map(len) > 1]
    if straddling.empty:
        return
    key, origin = groups_from
    label = "folds " if unit == "fold" else ""
    shown = ", ".join(f"{g} ({label}{', '.join(p)})" for g, p in straddling.head(3).items())
    more = f" and {len(straddling) - 3} more" if len(straddling) > 3 else ""
    raise UserError(f"{key}: {len(straddling)} group(s) straddle {what}, e.g. {shown}{more}; groups: {origin}; give "
                    f"every image of a group the same {unit}, or drop the data's {unit} column to let vistrain "
                    "assign grouped ones")


def splits_table(items: pd.DataFrame, fold_of: np.ndarray) -> pd.DataFrame:
    """What ``splits.csv`` holds: every item with its fold."""
    cols = [c for c in ("id", "path", "label", "group", "domain", "camera", "split") if c in items.columns]
    out = items[cols].copy()
    out["fold"] = fold_of
    return out


def assign_ratio_split(items: pd.DataFrame, train: float, val: float, test: float, seed: int) -> np.ndarray:
    """``"train" / "val" / "test"`` per row: whole groups, stratified by class (each group counts for its
    most frequent label), in the given proportions of each class's groups. Deterministic for the same seed.

    Every class keeps at least one group for training; a class with a single group is train-only.
    """
    rng = np.random.default_rng(seed)
    group_label = items.groupby("group")["label"].agg(lambda s: s.astype(str).value_counts().idxmax())
    split_of_group: dict[str, str] = {}
    for _, groups in group_label.groupby(group_label):
        names = rng.permutation(groups.index.to_numpy())
        n = len(names)
        n_val = int(round(n * val)) if n > 1 else 0
        n_test = int(round(n * test)) if n > 2 else 0
        while n_val + n_test >= n:  # keep a training group
            if n_test > 0:
                n_test -= 1
            else:
                n_val -= 1
        for i, g in enumerate(names):
            split_of_group[g] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return items["group"].map(split_of_group).to_numpy()


def assign_class_split(items: pd.DataFrame, val: float, test: float, seed: int) -> np.ndarray:
    """``data.split_classes``: ``"train" / "val" / "test"`` per row with every class's images in one part, as the
    retrieval benchmarks split (CUB, SOP): round(C * val) classes for validation, round(C * test) for test, the
    rest for training, drawn at random with the seed. A class too few for a part is a ``UserError``."""
    classes = np.array(sorted(items["label"].astype(str).unique()))
    n = len(classes)
    n_val, n_test = int(round(n * val)), int(round(n * test))
    if n_val < 1:
        raise UserError(f"data.val_ratio: {val} of the {n} classes is no class, and data.split_classes: true "
                        "validates on whole classes; raise data.val_ratio or add classes")
    if n - n_val - n_test < 2:
        raise UserError(f"data.val_ratio + data.test_ratio: {val} + {test} of the {n} classes leave "
                        f"{n - n_val - n_test} class(es) to train on (data.split_classes: true), at least 2 are "
                        "needed; lower the ratios or add classes")
    order = np.random.default_rng(seed).permutation(classes)
    part = dict.fromkeys(order[:n_val], "val") | dict.fromkeys(order[n_val:n_val + n_test], "test")
    split = items["label"].astype(str).map(lambda c: part.get(c, "train")).to_numpy()
    check_class_disjoint(items, split, "the class split")
    return split


def check_class_disjoint(items: pd.DataFrame, split: np.ndarray, what: str) -> None:
    """``data.split_classes``: a ``UserError`` naming the classes in two parts of ``split``, or the groups (the same
    object) whose images have classes in two parts, which would put the object on both sides."""
    parts = pd.Series(split, index=items.index)
    for unit, counted, key in (("class", "class(es)", items["label"]), ("group", "group(s)", items["group"])):
        per = parts.groupby(key.astype(str).to_numpy()).agg(lambda v: ", ".join(sorted(set(map(str, v)))))
        shared = per[per.str.contains(",")]
        if not shared.empty:
            shown = "; ".join(f"{name} ({p})" for name, p in shared.head(3).items())
            more = f" and {len(shared) - 3} more" if len(shared) > 3 else ""
            raise UserError(f"data.split_classes: {len(shared)} {counted} lie in two parts of {what}: {shown}"
                            f"{more}; true needs every {unit}'s images in one of train / val / test")


def classification_split(items: pd.DataFrame, train: float, val: float, test: float, seed: int,
                         groups_from: tuple[str, str] = GROUPS) -> np.ndarray:
    """``data.split: ratio`` for a classifier: the data's own ``split`` column when it has one (train / val /
    test; no group in two of them, see :func:`assign_folds`), else ``assign_ratio_split``. Either way there must
    be training and validation images."""
    if "split" in items.columns:
        values = items["split"].astype(str)
        bad = values[~values.isin(SPLIT_VALUES)]
        if len(bad):
            raise UserError(f"data.split: ratio uses the data's split column, but item {items.loc[bad.index[0], 'id']} "
                            f"has split '{bad.iloc[0]}'; valid: {', '.join(SPLIT_VALUES)}")
        for needed in ("train", "val"):
            if not (values == needed).any():
                raise UserError(f"data.split: the data's split column has no '{needed}' rows; a classifier needs "
                                "train and val (test is optional)")
        _refuse_straddling(items["group"], values, groups_from, "the parts of the data's 'split' column", "split")
        return values.to_numpy()
    split = assign_ratio_split(items, train, val, test, seed)
    if not (split == "val").any():
        raise UserError(f"data.val_ratio: {val} of the {items['group'].nunique()} groups left no validation images "
                        "(a class keeps its only group for training); raise data.val_ratio or add images")
    return split

