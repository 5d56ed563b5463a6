"""data.sources: several named sources in one item table (domain = source name), the domain-ratio sampler,
data.min_images_per_class and the config checks of the ratios."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_csv_dataset, write_folders_dataset, write_yaml

from vistrain.config.loader import load_config
from vistrain.data.samplers import DomainRatioSampler, balanced_cell_shares
from vistrain.data.sources import load_items
from vistrain.engine.distributed import RankShare
from vistrain.errors import ConfigError, UserError


def two_sources(root: Path, studio_objects: int = 10, real_objects: int = 2) -> dict:
    """studio: 3 classes x studio_objects objects x 2 views; real: the same classes, 5x fewer by default."""
    write_folders_dataset(root / "studio", classes=("a", "b", "c"), objects=studio_objects, views=2, size=16)
    write_folders_dataset(root / "real", classes=("a", "b", "c"), objects=real_objects, views=2, size=16, seed=1)
    return {"sources": [{"name": "studio", "source": "folders", "image_dir_train": "studio", "ratio": 0.3},
                        {"name": "real", "source": "folders", "image_dir_train": "real", "ratio": 0.7}]}


def config(root: Path, data: dict, **sections: dict) -> object:
    """A tiny classification config in root/config.yaml (paths relative to it), loaded like `--config`."""
    raw = {"data": {"folds": 2, **data}, "model": {"name": "resnet10t"},
           "train": {"img_size": 32, "batch_size": 8, "num_workers": 0, "device": "cpu"},
           "augment": {"policy": "none"}, "output": {"exp_dir": str(root / "exp"), "logs_dir": None}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return load_config(write_yaml(root / "config.yaml", raw))


# ------------------------------------------------------------------------------------------------ config

def problems(tmp_path: Path, data: dict, **sections: dict) -> str:
    with pytest.raises(ConfigError) as err:
        config(tmp_path, data, **sections)
    return str(err.value)


def test_ratios_that_do_not_sum_to_one_are_a_config_error(tmp_path):
    msg = problems(tmp_path, {"sources": [{"name": "studio", "ratio": 0.3}, {"name": "real", "ratio": 0.6}]})
    assert msg.startswith("data.sources: the ratios must sum to 1") and "0.3 (studio) + 0.6 (real) = 0.9" in msg


@pytest.mark.parametrize(("sources", "needle"), [
    ([{"name": "a", "ratio": 0.5}, {"name": "a", "ratio": 0.5}], "data.sources: names must be unique; repeated: a"),
    ([{"name": "a", "ratio": 1.0}, {"name": "b"}], "data.sources: give every source a ratio or none; without one: b"),
    ([{"name": "a", "ratio": 0}], "data.sources[0].ratio: Input should be greater than 0"),
    ([{"name": "a", "sorce": "csv"}], "data.sources[0].sorce: unknown key"),
    ([{"name": "a", "source": "reid"}], "data.sources[0].source"),
])
def test_bad_source_lists_name_the_entry(tmp_path, sources, needle):
    assert needle in problems(tmp_path, {"sources": sources})


def test_top_level_files_with_sources_are_a_config_error(tmp_path):
    msg = problems(tmp_path, {"image_dir_train": "x", "sources": [{"name": "a", "source": "folders"}]})
    assert msg.startswith("data.image_dir_train: not read when data.sources is given")


def test_ratios_with_a_pk_sampler_are_a_config_error(tmp_path):
    msg = problems(tmp_path, {"sources": [{"name": "a", "ratio": 1.0}]}, sampler={"name": "pk"})
    assert msg.startswith("data.sources: ratios need sampler.name random or weighted")


def test_source_paths_resolve_against_the_config_file(tmp_path):
    cfg = config(tmp_path, two_sources(tmp_path))
    assert [s.image_dir_train for s in cfg.data.sources] == [tmp_path / "studio", tmp_path / "real"]
    assert cfg.data.domain_ratios() == {"studio": 0.3, "real": 0.7}


# ------------------------------------------------------------------------------------------------ items

def test_every_item_keeps_its_source_name_as_domain_and_ids_stay_unique(tmp_path):
    cfg = config(tmp_path, two_sources(tmp_path, studio_objects=3, real_objects=3))
    items = load_items(cfg.data)
    assert items["domain"].value_counts().to_dict() == {"studio": 18, "real": 18}
    assert items["id"].is_unique
    assert items.loc[0, "id"] == "studio/a/obj0_0.png"
    assert all(Path(p).is_file() for p in items["path"])


def test_the_same_object_in_two_sources_is_one_group_by_default(tmp_path):
    # the same <class>/<ID> in both folders (obj0 of class a photographed in the studio and for real) is one group
    cfg = config(tmp_path, two_sources(tmp_path, studio_objects=3, real_objects=3))
    assert cfg.data.group_across_sources is True
    items = load_items(cfg.data)
    objects = {f"{c}/obj{j}" for c in "abc" for j in range(3)}
    for dom in ("studio", "real"):
        assert set(items.loc[items["domain"] == dom, "group"]) == objects
    apart = load_items(config(tmp_path, {**two_sources(tmp_path), "group_across_sources": False}).data)
    assert set(apart.loc[apart["domain"] == "real", "group"]) == {f"real/{o}" for o in objects}  # as before


@pytest.mark.parametrize("split", ["kfold", "ratio"])
def test_an_object_in_two_sources_sits_on_one_side_of_the_split(tmp_path, split):
    from vistrain.data.prepare import prepare_data

    cfg = config(tmp_path, {**two_sources(tmp_path, studio_objects=8, real_objects=8), "split": split,
                            "val_ratio": 0.3, "test_ratio": 0.2, "train_ratio": 0.5})
    data = prepare_data(cfg)
    part = data.items["split"] if split == "ratio" else pd.Series(data.fold_of)
    obj = data.items["id"].str.split("/").str[1:3].str.join("/")  # studio/a/obj3_1.png -> a/obj3
    obj = obj.str.replace(r"_\d+\.png$", "", regex=True)
    sides = part.groupby(obj.to_numpy()).nunique()
    assert (sides == 1).all(), f"objects on two sides: {sides[sides > 1].index.tolist()}"


def test_csv_sources_join_their_group_col_values_but_not_their_image_ids(tmp_path):
    # both CSVs name their images img_0_000 ...: unrelated images, so without a group column they stay apart
    a = write_csv_dataset(tmp_path / "a", classes=("x", "y"), per_class=2, size=8,
                          extra_columns={"pill": ["p1", "p2", "p3", "p4"]})
    b = write_csv_dataset(tmp_path / "b", classes=("x", "y"), per_class=2, size=8,
                          extra_columns={"pill": ["p1", "p1", "p3", "p5"]})
    entries = [{"name": "a", "train_csv": str(a.train_csv), "image_dir_train": str(a.image_dir)},
               {"name": "b", "train_csv": str(b.train_csv), "image_dir_train": str(b.image_dir)}]
    plain = load_items(config(tmp_path, {"image_ext": ".png", "sources": entries}).data)
    assert plain["group"].is_unique and plain["group"].tolist() == plain["id"].tolist()
    grouped = load_items(config(tmp_path, {"image_ext": ".png", "group_col": "pill", "sources": entries}).data)
    assert grouped["group"].tolist() == ["p1", "p2", "p3", "p4", "p1", "p1", "p3", "p5"]


def test_a_group_the_sources_fold_columns_put_in_two_folds_is_refused(tmp_path):
    from vistrain.data.prepare import prepare_data

    a = write_csv_dataset(tmp_path / "a", classes=("x", "y"), per_class=2, size=8,
                          extra_columns={"pill": ["p1", "p2", "p3", "p4"], "fold": [0, 1, 0, 1]})
    b = write_csv_dataset(tmp_path / "b", classes=("x", "y"), per_class=2, size=8,
                          extra_columns={"pill": ["p1", "p2", "p3", "p4"], "fold": [1, 1, 0, 1]})
    entries = [{"name": "studio", "train_csv": str(a.train_csv), "image_dir_train": str(a.image_dir)},
               {"name": "real", "train_csv": str(b.train_csv), "image_dir_train": str(b.image_dir),
                "group_col": "pill"}]
    cfg = config(tmp_path, {"image_ext": ".png", "group_col": "pill", "sources": entries})
    with pytest.raises(UserError) as err:
        prepare_data(cfg)
    msg = str(err.value)
    assert msg.startswith("data.sources: 1 group(s) straddle the folds of the 'fold' column, e.g. p1 (folds 0, 1); "
                          "groups: column 'pill' (data.group_col, data.sources[1].group_col); one group in every "
                          "source (data.group_across_sources: true)"), msg
    cfg = config(tmp_path, {"image_ext": ".png", "group_col": "pill", "sources": entries,
                            "group_across_sources": False})
    assert prepare_data(cfg).fold_of.tolist() == [0, 1, 0, 1, 1, 1, 0, 1]  # per source, as before


def test_csv_entry_takes_the_data_sections_column_and_extension_keys(tmp_path):
    a = write_csv_dataset(tmp_path / "a", classes=("x", "y"), per_class=3, size=8)
    b = write_csv_dataset(tmp_path / "b", classes=("x", "y"), per_class=2, size=8)
    (b.root / "labels.csv").write_text("name,cls\n" + "".join(f"{i},{t}\n" for i, t in zip(b.ids, b.labels)))
    cfg = config(tmp_path, {"image_ext": ".png", "sources": [
        {"name": "a", "source": "csv", "train_csv": str(a.train_csv), "image_dir_train": str(a.image_dir)},
        {"name": "b", "source": "csv", "train_csv": str(b.root / "labels.csv"), "image_dir_train": str(b.image_dir),
         "id_col": "name", "target_col": "cls"}]})
    items = load_items(cfg.data)
    assert items.groupby("domain")["label"].apply(list).to_dict() == {"a": a.labels, "b": b.labels}
    assert (items["path"] != "").all()


def test_a_missing_file_of_a_source_names_that_entry(tmp_path):
    cfg = config(tmp_path, {"sources": [{"name": "a", "source": "folders", "image_dir_train": "nope"}]})
    with pytest.raises(UserError, match=r"^data.sources\[0\].image_dir_train: folder not found"):
        load_items(cfg.data)


def test_a_split_column_in_some_sources_only_is_a_user_error(tmp_path):
    a = write_csv_dataset(tmp_path / "a", classes=("x", "y"), per_class=2, size=8,
                          extra_columns={"split": ["train", "val"] * 2})
    b = write_csv_dataset(tmp_path / "b", classes=("x", "y"), per_class=2, size=8)
    cfg = config(tmp_path, {"image_ext": ".png", "sources": [
        {"name": "a", "train_csv": str(a.train_csv), "image_dir_train": str(a.image_dir)},
        {"name": "b", "train_csv": str(b.train_csv), "image_dir_train": str(b.image_dir)}]})
    with pytest.raises(UserError, match="source 'a' has a split column but 'b' has none"):
        load_items(cfg.data)


def test_min_images_per_class_counts_all_domains_and_names_the_classes_below(tmp_path):
    from vistrain.data.prepare import prepare_data

    # a and b: 2 objects x 2 views in each domain = 8 images; c only in studio (4 images)
    write_folders_dataset(tmp_path / "studio", classes=("a", "b", "c"), objects=2, views=2, size=16)
    write_folders_dataset(tmp_path / "real", classes=("a", "b"), objects=2, views=2, size=16)
    data = {"sources": [{"name": "studio", "source": "folders", "image_dir_train": "studio"},
                        {"name": "real", "source": "folders", "image_dir_train": "real"}]}
    assert len(prepare_data(config(tmp_path, {**data, "min_images_per_class": 4})).items) == 20
    with pytest.raises(UserError) as err:
        prepare_data(config(tmp_path, {**data, "min_images_per_class": 9}))
    assert str(err.value).startswith("data.min_images_per_class: 3 class(es) have fewer than 9 readable images "
                                     "(all domains together): c (4), a (8), b (8)")


# ---------------------------------------------------------------------------------------------- sampler

def epoch(sampler, seed: int) -> np.ndarray:
    sampler.generator.manual_seed(seed)
    return np.array(list(sampler))


def test_domain_shares_follow_the_ratios_when_the_real_domain_is_five_times_smaller():
    n_studio, n_real = 1000, 200
    domains = np.array(["studio"] * n_studio + ["real"] * n_real)
    labels = np.arange(n_studio + n_real) % 4
    sampler = DomainRatioSampler(labels, domains, {"studio": 0.3, "real": 0.7}, torch.Generator())
    assert len(sampler) == n_studio + n_real  # an epoch as long as an ordinary one
    for seed in range(3):
        drawn = epoch(sampler, seed)
        assert len(drawn) == n_studio + n_real
        share = (domains[drawn] == "real").mean()
        assert abs(share - 0.7) <= 0.03, share
        real = drawn[domains[drawn] == "real"]
        studio = drawn[domains[drawn] == "studio"]
        assert set(real.tolist()) == set(range(n_studio, n_studio + n_real))  # every real image, some repeated
        assert len(set(studio.tolist())) == len(studio)  # studio: a subset without repeats, a new one each epoch
    assert not np.array_equal(epoch(sampler, 0), epoch(sampler, 1))
    assert np.array_equal(epoch(sampler, 5), epoch(sampler, 5))  # reseeded by the loop: same seed, same epoch


def test_weighted_balances_the_classes_within_the_domain_ratios():
    rng = np.random.default_rng(0)
    # studio: classes 0..2 skewed 60/25/15 %; real (5x fewer): 10/30/60 %
    studio = rng.choice(3, 5000, p=[0.6, 0.25, 0.15])
    real = rng.choice(3, 1000, p=[0.1, 0.3, 0.6])
    labels = np.concatenate([studio, real])
    domains = np.array(["studio"] * 5000 + ["real"] * 1000)
    sampler = DomainRatioSampler(labels, domains, {"studio": 0.3, "real": 0.7}, torch.Generator(),
                                 balance_classes=True)
    drawn = epoch(sampler, 0)
    assert abs((domains[drawn] == "real").mean() - 0.7) <= 0.03
    class_share = np.bincount(labels[drawn], minlength=3) / len(drawn)
    np.testing.assert_allclose(class_share, [1 / 3] * 3, atol=0.03)


def test_balanced_cell_shares_keep_the_ratios_when_a_class_is_in_one_domain_only():
    cells = np.array([[10, 5, 8], [3, 4, 0]])  # class 2 only in domain 0
    share = balanced_cell_shares(cells, np.array([0.3, 0.7]))
    np.testing.assert_allclose(share.sum(axis=1), [0.3, 0.7])
    assert share[1, 2] == 0
    # domain 0's 0.3 cannot give class 2 a third; it gets all of domain 0's share that the other classes spare
    assert share[:, 2].sum() == pytest.approx(0.3, abs=1e-6)


def test_ranks_share_the_domain_ratio_epoch_without_overlap():
    domains = np.array(["s"] * 60 + ["r"] * 12)
    labels = np.zeros(72, dtype=int)
    ranks = [RankShare(DomainRatioSampler(labels, domains, {"s": 0.3, "r": 0.7}, torch.Generator()), r, 2)
             for r in range(2)]
    whole = epoch(DomainRatioSampler(labels, domains, {"s": 0.3, "r": 0.7}, torch.Generator()), 3)
    for r in ranks:
        r.sampler.generator.manual_seed(3)
    parts = [list(r) for r in ranks]
    assert parts[0] == whole[0::2].tolist() and parts[1] == whole[1::2].tolist()


# ----------------------------------------------------------------------------------------- a real run

def test_a_two_source_run_trains_on_the_domain_ratios(tmp_path):
    """The loader classification_setup builds for a 0.3:0.7 run whose real domain holds 5x fewer images."""
    from vistrain.data.prepare import prepare_data
    from vistrain.engine.setup import classification_setup

    cfg = config(tmp_path, two_sources(tmp_path, studio_objects=20, real_objects=4))
    data = prepare_data(cfg)
    assert data.items["domain"].value_counts().to_dict() == {"studio": 120, "real": 24}
    setup = classification_setup(cfg, data, 0, torch.device("cpu"))
    train_idx, _ = data.fold_indices(0)
    domains = data.items["domain"].to_numpy()[train_idx]
    sampler = setup.train_loader.batch_sampler.source  # EpochBatches draws each epoch from it
    assert len(sampler) == len(train_idx)
    for seed in range(3):
        drawn = epoch(sampler, seed)
        assert abs((domains[drawn] == "real").mean() - 0.7) <= 0.03
