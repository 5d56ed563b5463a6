"""configs/recipes/: published training recipes as vistrain configs. Each one loads as it ships and trains one epoch
on a few hundred of the scikit-learn digits (tiny overrides: resnet10t at 32 px on the CPU); the packaged wheel holds
them (tests/test_package.py); the re-ID recipe stays the one configs/reid_market.yaml trains."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from vistrain.api import train
from vistrain.config import load_config
from vistrain.config.bundled import bundled_config
from vistrain.data.demo import write_digits

RECIPES = sorted(bundled_config("recipes").glob("*.yaml"))
PER_CLASS = 30  # 300 digits
# What a one-epoch CPU run on the digits changes, whatever the recipe: data, model, size, length, machine.
TINY = ["model.name=resnet10t", "model.pretrained=false", "train.img_size=32", "train.epochs=1",
        "train.batch_size=32", "train.target_batch_size=null", "train.warmup_epochs=0", "train.num_workers=0",
        "train.device=cpu", "train.log_interval=0", "data.folds=2", "data.valid_fold=0", "output.logs_dir=null"]
# The re-ID recipe's Market-1501 folders become the digits as identities (retrieval: knn recall, P=10 x K=4).
EMBEDDING = ["data.source=csv", "data.root=null", "sampler.p=10", "sampler.k=4", "train.monitor=knn_recall@1"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    paths = write_digits(root)
    table = pd.read_csv(paths["train_csv"], dtype=str)
    table.groupby("target").head(PER_CLASS).to_csv(root / "subset.csv", index=False)
    return root


def test_the_recipes_folder_holds_the_three_published_recipes() -> None:
    assert [p.name for p in RECIPES] == ["documents.yaml", "reid_strong_baseline.yaml", "resnet_strikes_back_a3.yaml"]


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_a_recipe_trains_one_epoch_on_the_digits(recipe: Path, digits: Path, tmp_path: Path) -> None:
    shipped = load_config(recipe)  # as shipped: every key valid
    data = [f"data.train_csv={digits / 'subset.csv'}", f"data.image_dir_train={digits / 'train'}",
            "data.image_ext=.png", f"output.exp_dir={tmp_path / 'exp'}"]
    overrides = TINY + data + (EMBEDDING if shipped.task == "embedding" else [])
    run = train(recipe, overrides=overrides, progress=False)
    trained = load_config(run.path / "config.yaml").augment.model_dump(exclude={"device"})  # device: auto -> cpu
    assert trained == shipped.augment.model_dump(exclude={"device"}), "the run trained with the recipe's augmentation"
    assert len(run.metrics) == 1 and run.metrics["train_loss"].iloc[0] > 0


def test_the_reid_market_config_is_the_strong_baseline_recipe() -> None:
    recipe = yaml.safe_load(bundled_config("recipes/reid_strong_baseline.yaml").read_text())
    market = yaml.safe_load(bundled_config("reid_market.yaml").read_text())
    for section in ("task", "model", "loss", "sampler", "train", "augment", "eval"):
        assert market[section] == recipe[section], section
