"""data.class_map: the class order of a classifier, the file's checks, and train.class_weights: from_class_map."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_folders_dataset, write_yaml

from vistrain.config.loader import load_config
from vistrain.data.classmap import display_name, load_class_map
from vistrain.errors import ConfigError, UserError

METADATA = {"cat": {"display_name": "Cat (house)", "training_weight": 1.0},
            "dog": {"display_name": "Dog", "training_weight": 2.5},
            "fox": {"name": "Red fox", "training_weight": 4.0, "form": "wild"}}


def write_map(path: Path, classes: list[str], metadata: dict | None = None, **extra: object) -> Path:
    data = {"class_to_idx": {c: i for i, c in enumerate(classes)},
            "idx_to_class": {str(i): c for i, c in enumerate(classes)}, **extra}
    if metadata is not None:
        data["metadata"] = metadata
    path.write_text(json.dumps(data))
    return path


def config(tmp_path: Path, train: dict | None = None, **data: object) -> object:
    """Folders data: 4 images each of cat, dog, fox."""
    write_folders_dataset(tmp_path / "img", classes=("cat", "dog", "fox"), objects=4, views=1, size=16)
    raw = {"data": {"source": "folders", "image_dir_train": "img", "folds": 2, **data},
           "model": {"name": "resnet10t"}, "augment": {"policy": "none"},
           "train": {"img_size": 32, "batch_size": 4, "num_workers": 0, "device": "cpu", **(train or {})}}
    return load_config(write_yaml(tmp_path / "config.yaml", raw))


def test_the_class_map_fixes_the_class_order(tmp_path):
    from vistrain.data.prepare import prepare_data

    order = ["fox", "cat", "dog"]  # not the sorted order the data alone would give
    data = prepare_data(config(tmp_path, class_map=str(write_map(tmp_path / "map.json", order, METADATA))))
    assert data.classes == order
    assert [order[t] for t in data.targets] == data.items["label"].tolist()
    assert data.class_map.run_file() == METADATA


def test_from_class_map_weights_go_into_the_cross_entropy_in_class_order(tmp_path):
    from vistrain.data.prepare import prepare_data
    from vistrain.engine.setup import classification_setup

    map_path = write_map(tmp_path / "map.json", ["dog", "fox", "cat"], METADATA)
    cfg = config(tmp_path, class_map=str(map_path), train={"class_weights": "from_class_map"})
    setup = classification_setup(cfg, prepare_data(cfg), 0, torch.device("cpu"))
    assert setup.task.criterion.weight.tolist() == [2.5, 4.0, 1.0]


def test_from_class_map_without_a_weight_names_the_class(tmp_path):
    from vistrain.data.prepare import prepare_data
    from vistrain.engine.setup import classification_setup

    meta = {k: dict(v) for k, v in METADATA.items()}
    del meta["fox"]["training_weight"]
    cfg = config(tmp_path, class_map=str(write_map(tmp_path / "map.json", ["cat", "dog", "fox"], meta)),
                 train={"class_weights": "from_class_map"})
    with pytest.raises(UserError, match=r"^train.class_weights: from_class_map needs metadata.<class>.training_weight "
                                        r"for every class of .*; missing for fox$"):
        classification_setup(cfg, prepare_data(cfg), 0, torch.device("cpu"))


def test_a_class_in_the_data_but_not_in_the_map_is_an_error_naming_it(tmp_path):
    from vistrain.data.prepare import prepare_data

    map_path = write_map(tmp_path / "map.json", ["cat", "dog"])
    with pytest.raises(UserError) as err:
        prepare_data(config(tmp_path, class_map=str(map_path)))
    assert str(err.value).startswith(f"data.class_map: class 'fox' is in the data (4 image(s), e.g. fox/obj0_0.png) "
                                     f"but not in {map_path}")


def test_a_map_class_without_images_is_an_error_naming_it(tmp_path):
    from vistrain.data.prepare import prepare_data

    map_path = write_map(tmp_path / "map.json", ["cat", "dog", "fox", "owl"])
    with pytest.raises(UserError, match=r"^data.class_map: class\(es\) of .* with no image in the data: owl;"):
        prepare_data(config(tmp_path, class_map=str(map_path)))


@pytest.mark.parametrize(("content", "needle"), [
    ("[1, 2]", 'needs a non-empty "class_to_idx" object'),
    ("{not json", "is not valid JSON"),
    ({"class_to_idx": {"a": 0, "b": 2}}, "class_to_idx indices must be 0..1, each once; got [0, 2]"),
    ({"class_to_idx": {"a": 0, "b": "1"}}, "class_to_idx['b'] = '1' is not an integer index"),
    ({"class_to_idx": {"a": 0, "b": 1}, "idx_to_class": {"0": "b", "1": "a"}}, "idx_to_class is not the inverse"),
    ({"class_to_idx": {"a": 0}, "metadata": {"z": {}}}, "metadata names class(es) not in class_to_idx: z"),
    ({"class_to_idx": {"a": 0}, "metadata": {"a": {"training_weight": 0}}},
     "metadata['a'].training_weight = 0; must be a number > 0"),
])
def test_a_malformed_class_map_is_a_user_error(tmp_path, content, needle):
    path = tmp_path / "map.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(UserError) as err:
        load_class_map(path)
    assert str(err.value).startswith(f"data.class_map: {path}") and needle in str(err.value)


def test_display_name_convention():
    assert display_name(METADATA, "cat") == "Cat (house)"
    assert display_name(METADATA, "fox") == "Red fox"  # `name` when there is no display_name
    assert display_name(METADATA, "owl") is None and display_name(None, "cat") is None


@pytest.mark.parametrize(("data", "train", "task", "needle"), [
    ({}, {"class_weights": "from_class_map"}, "classification", "train.class_weights: from_class_map reads"),
    ({"class_map": "m.json", "class_names": ["a"]}, {}, "classification", "data.class_map and data.class_names"),
    ({"class_map": "m.json"}, {}, "embedding", "data.class_map: fixes a classifier's classes"),
])
def test_class_map_config_mistakes(tmp_path, data, train, task, needle):
    raw = {"task": task, "data": data, "train": train}
    if task == "embedding":
        raw["sampler"] = {"name": "random"}
        raw["loss"] = {"terms": [{"name": "ce"}]}
    with pytest.raises(ConfigError) as err:
        load_config(write_yaml(tmp_path / "c.yaml", raw))
    assert needle in str(err.value)


def test_weights_in_map_order():
    from vistrain.data.classmap import ClassMap

    cm = ClassMap(Path("x.json"), ["b", "a"], {"a": {"training_weight": 3}, "b": {"training_weight": 0.5}})
    np.testing.assert_array_equal(cm.weights(), [0.5, 3.0])
