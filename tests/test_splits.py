"""Fold assignment: stratified, grouped when groups hold several images, deterministic per seed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import write_csv_dataset

from vistrain.config.schema import DataCfg
from vistrain.data.sources import load_items
from vistrain.data.splits import assign_folds, classification_split, splits_table
from vistrain.errors import UserError


def ungrouped(counts: dict[str, int]) -> pd.DataFrame:
    labels = [c for c, n in counts.items() for _ in range(n)]
    ids = [f"id{i}" for i in range(len(labels))]
    return pd.DataFrame({"path": ids, "id": ids, "label": labels, "group": ids})


def grouped(n_groups: int, per_group: int | list[int], classes: tuple[str, ...] = ("a", "b", "c")) -> pd.DataFrame:
    sizes = per_group if isinstance(per_group, list) else [per_group] * n_groups
    rows = []
    for g, size in enumerate(sizes):
        for s in range(size):
            rows.append((f"g{g}_{s}", f"g{g}_{s}", classes[g % len(classes)], f"g{g}"))
    return pd.DataFrame(rows, columns=["path", "id", "label", "group"])


def test_every_item_gets_one_of_the_folds():
    items = ungrouped({"a": 10, "b": 7, "c": 13})
    fold_of = assign_folds(items, 5, seed=0)
    assert fold_of.shape == (30,)
    assert set(fold_of.tolist()) == set(range(5))


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_stratified_per_class_counts_differ_by_at_most_one(folds):
    items = ungrouped({"a": 23, "b": 11, "c": 7, "d": 40})
    fold_of = assign_folds(items, folds, seed=3, stratify=True)
    table = pd.crosstab(items["label"], fold_of)
    assert table.shape == (4, folds)
    spread = table.max(axis=1) - table.min(axis=1)
    assert (spread <= 1).all(), f"per-class counts per fold:\n{table}"


@pytest.mark.parametrize("stratify", [True, False])
def test_no_group_on_both_sides(stratify):
    items = grouped(n_groups=30, per_group=[1, 2, 3, 4, 5] * 6)
    fold_of = assign_folds(items, 4, seed=1, stratify=stratify)
    per_group = pd.Series(fold_of).groupby(items["group"]).nunique()
    assert (per_group == 1).all(), f"groups split across folds: {per_group[per_group > 1].index.tolist()}"
    assert set(fold_of.tolist()) == set(range(4))


def test_grouped_stratified_keeps_every_class_in_every_fold():
    items = grouped(n_groups=36, per_group=2)  # 12 groups per class, 3 folds
    fold_of = assign_folds(items, 3, seed=0, stratify=True)
    table = pd.crosstab(items["label"], fold_of)
    assert (table > 0).all().all(), table


@pytest.mark.parametrize("make, stratify", [
    (lambda: ungrouped({"a": 20, "b": 20, "c": 20}), True),
    (lambda: ungrouped({"a": 20, "b": 20, "c": 20}), False),
    (lambda: grouped(30, 2), True),
    (lambda: grouped(30, 2), False),
], ids=["stratified", "plain", "grouped-stratified", "grouped-plain"])
def test_same_seed_same_folds_other_seed_other_folds(make, stratify):
    items = make()
    first = assign_folds(items, 5, seed=11, stratify=stratify)
    again = assign_folds(make(), 5, seed=11, stratify=stratify)
    other = assign_folds(items, 5, seed=12, stratify=stratify)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other), "another project.seed must give another assignment"


def test_existing_fold_column_is_used_as_is():
    items = ungrouped({"a": 4, "b": 4})
    given = ["1", "0", "2", "2", "0", "1", "1", "0"]  # strings, as read from the CSV
    items["fold"] = given
    fold_of = assign_folds(items, 3, seed=0)
    assert fold_of.tolist() == [int(f) for f in given]


def test_fold_column_from_the_csv_is_used(tmp_path):
    folds = [2, 0, 1, 1, 2, 0]
    ds = write_csv_dataset(tmp_path / "d", classes=("a", "b"), per_class=3, size=8, extra_columns={"fold": folds})
    items = load_items(DataCfg(train_csv=ds.train_csv, image_dir_train=ds.image_dir, image_ext=".png"))
    assert assign_folds(items, 3, seed=99).tolist() == folds


def test_fold_column_that_does_not_match_data_folds_is_a_user_error():
    items = ungrouped({"a": 3, "b": 3})
    items["fold"] = [0, 1, 2, 0, 1, 2]
    with pytest.raises(UserError, match="data.folds"):
        assign_folds(items, 5, seed=0)


@pytest.mark.parametrize("items, what", [
    (ungrouped({"a": 2, "b": 1}), "images"),
    (grouped(3, 4), "groups"),
], ids=["images", "groups"])
def test_too_few_items_for_the_folds_names_data_folds(items, what):
    with pytest.raises(UserError) as excinfo:
        assign_folds(items, 5, seed=0)
    msg = str(excinfo.value)
    assert msg.startswith("data.folds"), msg
    assert what in msg


def test_class_rarer_than_the_folds_is_a_user_error():
    items = ungrouped({"a": 10, "b": 2})
    with pytest.raises(UserError, match="data.stratify|data.folds"):
        assign_folds(items, 5, seed=0, stratify=True)
    assert len(assign_folds(items, 5, seed=0, stratify=False)) == 12  # without stratification it is fine


def test_splits_table_has_every_item_and_its_fold():
    items = ungrouped({"a": 5, "b": 5})
    fold_of = assign_folds(items, 2, seed=0)
    table = splits_table(items, fold_of)
    assert table["id"].tolist() == items["id"].tolist()
    assert table["fold"].tolist() == fold_of.tolist()
    assert {"id", "path", "label", "group", "fold"} <= set(table.columns)


# ------------------------------------------------------------------------- groups against a given split

def with_given_folds(groups: list[str], folds: list[int]) -> pd.DataFrame:
    ids = [f"id{i}" for i in range(len(groups))]
    return pd.DataFrame({"path": ids, "id": ids, "label": ["a", "b"] * (len(ids) // 2), "group": groups,
                         "fold": [str(f) for f in folds]})  # text, as read from the CSV


def test_a_group_straddling_the_fold_column_is_refused_naming_the_groups():
    # p1, p3 and p4 each lie in two folds; p0 and p2 in one
    items = with_given_folds(["p0", "p0", "p1", "p1", "p2", "p2", "p3", "p3", "p4", "p4"],
                             [0, 0, 0, 1, 1, 1, 2, 0, 1, 2])
    with pytest.raises(UserError) as err:
        assign_folds(items, 3, seed=0, groups_from=("data.group_col", "column 'patient' (data.group_col)"))
    msg = str(err.value)
    assert msg.startswith("data.group_col: 3 group(s) straddle the folds of the 'fold' column, e.g. p1 (folds 0, 1), "
                          "p3 (folds 0, 2), p4 (folds 1, 2); groups: column 'patient' (data.group_col); give every "
                          "image of a group the same fold"), msg
    assert "\n" not in msg


def test_a_fold_column_that_keeps_every_group_in_one_fold_is_used_as_is():
    folds = [0, 0, 1, 1, 2, 2, 0, 0]
    items = with_given_folds(["p0", "p0", "p1", "p1", "p2", "p2", "p3", "p3"], folds)
    assert assign_folds(items, 3, seed=0).tolist() == folds


def test_many_straddling_groups_are_counted_and_a_few_named():
    groups = [f"g{i // 2:02d}" for i in range(40)]
    items = with_given_folds(groups, [i % 2 for i in range(40)])  # every group in folds 0 and 1
    with pytest.raises(UserError) as err:
        assign_folds(items, 2, seed=0)
    msg = str(err.value)
    assert "20 group(s)" in msg and "g00 (folds 0, 1)" in msg and "and 17 more" in msg and "g19" not in msg, msg


def test_a_group_in_two_parts_of_the_data_split_column_is_refused():
    items = pd.DataFrame({"id": [f"i{k}" for k in range(6)], "label": list("aabbcc"),
                          "group": ["p0", "p0", "p1", "p1", "p2", "p2"],
                          "split": ["train", "val", "train", "train", "val", "test"]})
    with pytest.raises(UserError) as err:
        classification_split(items, 0.8, 0.1, 0.1, seed=0)
    assert str(err.value).startswith("data.group_col: 2 group(s) straddle the parts of the data's 'split' column, "
                                     "e.g. p0 (train, val), p2 (test, val); groups: the 'group' column; give every "
                                     "image of a group the same split"), str(err.value)
