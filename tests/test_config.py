"""Config validation: YAML -> --mode preset -> key=value overrides -> one validated Config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import write_yaml

from vistrain.config import config_to_dict, load_config
from vistrain.config.bundled import bundled_configs
from vistrain.errors import ConfigError, UserError

CONFIG_FILES = bundled_configs()


def problems_of(excinfo: pytest.ExceptionInfo) -> list[str]:
    err = excinfo.value
    assert isinstance(err, ConfigError)
    assert str(err) == "\n".join(err.problems), "the message must be the problems, one per line"
    return err.problems


def one_problem(excinfo: pytest.ExceptionInfo) -> str:
    problems = problems_of(excinfo)
    assert len(problems) == 1, problems
    return problems[0]


# ------------------------------------------------------------------------------------------- bad input

def test_unknown_key_names_the_dotted_key_and_suggests_the_close_one(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"train": {"lrr": 0.1}})
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    msg = one_problem(excinfo)
    assert msg.startswith("train.lrr:"), msg
    assert "did you mean 'lr'" in msg, msg


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=["trian.lr=0.1"])
    assert one_problem(excinfo).startswith("trian:")


def test_config_error_is_a_user_error():
    # The CLI maps UserError to exit code 2; ConfigError must be one of them.
    with pytest.raises(UserError):
        load_config(None, overrides=["train.nope=1"])


def test_wrong_type_names_the_key_and_shows_the_value():
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=["train.epochs=many"])
    msg = one_problem(excinfo)
    assert msg.startswith("train.epochs:"), msg
    assert "many" in msg


@pytest.mark.parametrize("override, key", [
    ("train.lr=-0.1", "train.lr"),
    ("train.lr=0", "train.lr"),
    ("train.batch_size=0", "train.batch_size"),
    ("data.folds=1", "data.folds"),
    ("augment.hflip=1.5", "augment.hflip"),
    ("train.img_size=4", "train.img_size"),
])
def test_impossible_value_names_the_key(override, key):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=[override])
    problems = problems_of(excinfo)
    assert problems and all(p.startswith(f"{key}:") for p in problems), problems


def test_valid_fold_outside_the_folds_names_data_valid_fold():
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=["data.folds=5", "data.valid_fold=7"])
    msg = one_problem(excinfo)
    assert msg.startswith("data.valid_fold:"), msg
    assert "7" in msg and "data.folds=5" in msg


def test_valid_fold_accepts_an_index_or_all():
    assert load_config(None, overrides=["data.folds=3", "data.valid_fold=2"]).data.valid_fold == 2
    cfg = load_config(None, overrides=["data.folds=3", "data.valid_fold=all"])
    assert cfg.data.valid_fold == "all"
    assert cfg.folds_to_train() == [0, 1, 2]


def test_literal_choice_lists_the_valid_values():
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=["train.optimizer=adamx"])
    msg = one_problem(excinfo)
    assert msg.startswith("train.optimizer:"), msg
    for choice in ("adamw", "adam", "sgd"):
        assert choice in msg


def test_every_problem_is_reported_at_once(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"train": {"lrr": 0.1, "epochs": 0}, "data": {"source": "sql"}})
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    keys = sorted(p.split(":")[0] for p in problems_of(excinfo))
    assert keys == ["data.source", "train.epochs", "train.lrr"]


def test_malformed_override_is_a_user_error():
    with pytest.raises(UserError, match="train.lr"):
        load_config(None, overrides=["train.lr"])


def test_missing_config_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--config"):
        load_config(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------------------------ layering

def test_mode_preset_is_the_base_layer_file_and_overrides_win(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"model": {"name": "resnet10t"}, "train": {"lr": 0.01, "img_size": 64}})
    fast = load_config(path, mode="fast")
    assert fast.model.name == "resnet10t"  # file beats preset
    assert fast.train.lr == 0.01  # file beats preset
    assert fast.train.img_size == 64  # file beats preset
    assert fast.train.epochs == 10  # preset beats the schema default (10 is fast's value)
    assert fast.augment.policy == "light"

    both = load_config(path, mode="fast", overrides=["train.epochs=3", "train.lr=0.5", "model.name=test_resnet"])
    assert both.train.epochs == 3  # override beats preset
    assert both.train.lr == 0.5  # override beats file
    assert both.model.name == "test_resnet"


def test_highperf_preset_applies_where_the_file_is_silent(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"train": {"epochs": 2}})
    cfg = load_config(path, mode="highperf")
    assert cfg.train.img_size == 384
    assert cfg.augment.policy == "hard"
    assert cfg.train.epochs == 2
    assert load_config(path, mode="highperf", overrides=["train.img_size=96"]).train.img_size == 96


def test_no_mode_means_file_and_defaults_only(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"train": {"epochs": 2}})
    assert config_to_dict(load_config(path)) == config_to_dict(load_config(path, mode="basic"))
    assert load_config(path).train.img_size == 224


def test_unknown_mode_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--mode"):
        load_config(write_yaml(tmp_path / "c.yaml", {}), mode="turbo")


def test_yaml_paths_resolve_against_the_yaml_folder_and_cli_paths_against_cwd(tmp_path, monkeypatch):
    path = write_yaml(tmp_path / "configs" / "c.yaml", {
        "data": {"train_csv": "../data/train.csv", "image_dir_train": "images"},
        "output": {"exp_dir": "../exp"},
    })
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path, overrides=["data.image_dir_test=test_images", "output.logs_dir=../logs"])
    assert cfg.data.train_csv == (tmp_path / "data" / "train.csv").resolve()
    assert cfg.data.image_dir_train == (tmp_path / "configs" / "images").resolve()
    assert cfg.output.exp_dir == (tmp_path / "exp").resolve()
    assert cfg.data.image_dir_test == (elsewhere / "test_images").resolve()
    assert cfg.output.logs_dir == (tmp_path / "somewhere" / "logs").resolve()
    # An override of a key the file also sets resolves against cwd, not the file.
    again = load_config(path, overrides=["data.train_csv=mine.csv"])
    assert again.data.train_csv == (elsewhere / "mine.csv").resolve()


def test_absolute_paths_are_kept(tmp_path):
    target = tmp_path / "abs" / "train.csv"
    path = write_yaml(tmp_path / "c.yaml", {"data": {"train_csv": str(target)}})
    assert load_config(path).data.train_csv == target


@pytest.mark.parametrize("value, expected", [(96, 96), ([64, 128], (64, 128))])
def test_img_size_accepts_int_and_height_width(tmp_path, value, expected):
    cfg = load_config(write_yaml(tmp_path / "c.yaml", {"train": {"img_size": value}}))
    assert cfg.train.img_size == expected
    assert load_config(None, overrides=[f"train.img_size={value}"]).train.img_size == expected


@pytest.mark.parametrize("value", [[64], [64, 64, 64], [4, 64], "big"])
def test_img_size_rejects_other_shapes(value):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=[f"train.img_size={value}"])
    assert all(p.startswith("train.img_size") for p in problems_of(excinfo))


@pytest.mark.parametrize("value, expected", [("true", "auto"), ("false", "fp32"), ("bf16", "bf16"),
                                             ("fp32", "fp32")])
def test_amp_booleans_map_to_auto_and_fp32(value, expected):
    assert load_config(None, overrides=[f"train.amp={value}"]).train.amp == expected


def test_amp_rejects_unknown_precision():
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=["train.amp=fp8"])
    assert all(p.startswith("train.amp") for p in problems_of(excinfo))


def test_project_name_defaults_to_the_file_stem(tmp_path):
    assert load_config(write_yaml(tmp_path / "leaf_disease.yaml", {})).project.name == "leaf_disease"
    named = write_yaml(tmp_path / "x.yaml", {"project": {"name": "mine"}})
    assert load_config(named).project.name == "mine"


# --------------------------------------------------------------------------------- saved config round-trip

def test_saved_config_reloads_to_the_same_settings(tmp_path, monkeypatch):
    """What a run writes as config.yaml must load back, from the run directory, to the same settings."""
    monkeypatch.chdir(tmp_path)
    src = write_yaml(tmp_path / "configs" / "c.yaml", {
        "data": {"train_csv": "../d/train.csv", "image_dir_train": "../d/train", "class_names": ["a", "b"]},
        "train": {"img_size": [48, 64], "amp": False, "epochs": 3},
        "output": {"exp_dir": "../exp", "logs_dir": "../logs"},
    })
    cfg = load_config(src, mode="fast", overrides=["train.lr=0.02", "data.valid_fold=all"])
    saved = write_yaml(tmp_path / "exp" / "20250101" / "run" / "config.yaml", config_to_dict(cfg))
    assert config_to_dict(load_config(saved)) == config_to_dict(cfg)


def test_relative_paths_resolve_beside_the_folder_as_named_even_when_it_is_a_link(tmp_path):
    """The checkout's configs/ is a link to the package's folder: ``../data`` in configs/train.yaml is the
    checkout's data/, where the user reads it from, not a folder inside the package."""
    root = tmp_path.resolve()
    write_yaml(root / "pkg" / "configs" / "c.yaml", {"data": {"train_csv": "../data/train.csv"}})
    (root / "proj").mkdir()
    (root / "proj" / "configs").symlink_to(root / "pkg" / "configs", target_is_directory=True)
    assert load_config(root / "proj" / "configs" / "c.yaml").data.train_csv == root / "proj" / "data" / "train.csv"
    assert load_config(root / "pkg" / "configs" / "c.yaml").data.train_csv == root / "pkg" / "data" / "train.csv"


def test_saved_default_output_paths_reload_to_the_same_folders(tmp_path, monkeypatch):
    """With output.exp_dir / output.logs_dir left at their defaults, config.yaml must still name the
    folders the run used, not folders inside the run directory once it is loaded back from there."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write_yaml(tmp_path / "c.yaml", {"train": {"epochs": 1}}))
    saved = write_yaml(tmp_path / "exp" / "20250101" / "run" / "config.yaml", config_to_dict(cfg))
    reloaded = load_config(saved)
    assert Path(reloaded.output.exp_dir).resolve() == Path(cfg.output.exp_dir).resolve()
    assert Path(reloaded.output.logs_dir).resolve() == Path(cfg.output.logs_dir).resolve()


# ------------------------------------------------------------------------------------ shipped configs

def test_configs_folder_is_not_empty():
    assert CONFIG_FILES, "configs/*.yaml: no config files found"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_every_shipped_config_validates(path):
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict)
    cfg = load_config(path)
    assert cfg.model.name
    # The file itself must be the source of every section it sets (nothing silently dropped).
    dumped = config_to_dict(cfg)
    for section, values in raw.items():
        assert section in dumped, f"{path.name}: section {section} not in the validated config"
        if isinstance(values, dict):
            for key in values:
                assert key in dumped[section], f"{path.name}: {section}.{key} not in the validated config"


# ------------------------------------------------------------------------------------- embedding checks

REID = ["task=embedding", "data.source=reid", "data.root=/data/market"]
FOLDERS = ["task=embedding", "data.source=folders", "data.image_dir_train=/data/products"]


@pytest.mark.parametrize("overrides, monitor, valid", [
    (REID, "recall@1", "valid: mAP, rank1, rank5, rank10, mINP"),
    (FOLDERS, "mAP", "valid: knn_recall@1, knn_recall@5, knn_acc, knn_macro_f1"),
    ([*FOLDERS, "data.split_classes=true"], "knn_acc", "valid: recall@1, recall@5"),
    ([], "mAP", "valid: macro_f1, accuracy, valid_loss"),
])
def test_monitor_must_be_a_metric_this_kind_of_run_reports(overrides, monitor, valid):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=[*overrides, f"train.monitor={monitor}"])
    msg = one_problem(excinfo)
    assert msg.startswith("train.monitor:") and valid in msg, msg


def test_recall_ks_set_the_retrieval_monitors():
    cfg = load_config(None, overrides=[*FOLDERS, "eval.recall_ks=[10, 1, 20]", "train.monitor=knn_recall@10"])
    assert cfg.eval.recall_ks == [1, 10, 20] and cfg.train.monitor == "knn_recall@10"
    assert load_config(None, overrides=FOLDERS).eval.recall_ks == [1, 5]
    assert load_config(None, overrides=[*FOLDERS, "eval.recall_ks=[5, 10]"]).train.monitor == "knn_recall@5"
    disjoint = [*FOLDERS, "data.split_classes=true", "eval.recall_ks=[5, 10]"]
    assert load_config(None, overrides=disjoint).train.monitor == "recall@5"


def test_monitor_recall_at_a_k_not_in_recall_ks_is_an_error():
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=[*FOLDERS, "train.monitor=knn_recall@10"])
    msg = one_problem(excinfo)
    assert msg.startswith("train.monitor:") and "eval.recall_ks" in msg and "[1, 5]" in msg, msg
    assert "valid: knn_recall@1, knn_recall@5, knn_acc, knn_macro_f1" in msg, msg


def test_monitor_recall_at_k_of_a_closed_set_run_is_refused_naming_knn_recall():
    # recall@K is the class-disjoint figure (data.split_classes: true); the closed-set one is knn_recall@K. A user's
    # recall@1 on a closed-set run is refused (exit 2) rather than silently monitoring another figure.
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=[*FOLDERS, "train.monitor=recall@1"])
    msg = one_problem(excinfo)
    assert msg.startswith("train.monitor: 'recall@1'") and "'knn_recall@1'" in msg, msg
    assert "data.split_classes: true" in msg, msg
    cfg = load_config(None, overrides=[*FOLDERS, "data.split_classes=true", "train.monitor=recall@1"])
    assert cfg.train.monitor == "recall@1" and cfg.data.split_classes is True


def test_a_run_file_from_before_split_classes_monitors_knn_recall(tmp_path):
    # Runs written before data.split_classes existed named their closed-set figure recall@K: their config.yaml
    # still loads (evaluate, predict, resume), with the figure's present name.
    saved = load_config(None, overrides=[*FOLDERS, "train.monitor=knn_recall@5"]).model_dump(mode="json")
    del saved["data"]["split_classes"]
    saved["train"]["monitor"] = "recall@5"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    assert load_config(path, run_file=True).train.monitor == "knn_recall@5"
    with pytest.raises(ConfigError):
        load_config(path)  # a user's file is refused, as above


@pytest.mark.parametrize("overrides, needle", [
    (REID, "data.source: reid"),
    ([], "task: embedding"),
    ([*FOLDERS, "eval.rerank=true"], "eval.rerank"),
])
def test_split_classes_is_refused_where_it_has_no_meaning(overrides, needle):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=[*overrides, "data.split_classes=true"])
    msg = one_problem(excinfo)
    assert msg.startswith("data.split_classes") and needle in msg, msg


@pytest.mark.parametrize("value, text", [("[]", "at least one"), ("[1, 5, 1]", "repeated: 1"),
                                          ("[0, 5]", "greater than 0"), ("[1.5]", "integer")])
def test_recall_ks_must_be_distinct_positive_integers(value, text):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=[*FOLDERS, f"eval.recall_ks={value}"])
    msg = one_problem(excinfo)
    assert msg.startswith("eval.recall_ks") and text in msg, msg


def test_default_monitor_follows_the_kind_of_run():
    assert load_config(None, overrides=REID).train.monitor == "mAP"
    assert load_config(None, overrides=FOLDERS).train.monitor == "knn_recall@1"
    assert load_config(None, overrides=[*FOLDERS, "data.split_classes=true"]).train.monitor == "recall@1"
    assert load_config(None).train.monitor == "macro_f1"


@pytest.mark.parametrize("override, key", [
    ("model.head=arcface", "model.head"),
    ("model.embedding_dim=256", "model.embedding_dim"),
    ("loss.terms=[{name: triplet}]", "loss.terms"),
])
def test_embedding_keys_in_a_classification_config_are_an_error(override, key):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=[override])
    msg = one_problem(excinfo)
    assert msg.startswith(f"{key}:") and "task: embedding" in msg, msg


def test_a_saved_classification_config_with_every_default_written_out_reloads(tmp_path):
    cfg = load_config(None)
    path = write_yaml(tmp_path / "saved.yaml", config_to_dict(cfg))
    assert load_config(path).model.head == "linear"


def test_triplet_term_gets_pk_batches_unless_told_otherwise():
    assert load_config(None, overrides=FOLDERS).sampler.name == "pk"  # default terms: ce + triplet
    assert load_config(None, overrides=[*FOLDERS, "loss.terms=[{name: ce}]"]).sampler.name == "random"
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=[*FOLDERS, "sampler.name=random"])
    msg = one_problem(excinfo)
    assert msg.startswith("sampler.name:") and "use sampler.name: pk" in msg, msg
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=[*FOLDERS, "sampler.k=1"])
    msg = one_problem(excinfo)
    assert msg.startswith("sampler.k:") and "k >= 2" in msg, msg


def test_loss_term_problems_name_the_key_inside_the_term():
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=[*FOLDERS, "loss.terms=[{name: ce}, {name: tripplet}]"])
    assert one_problem(excinfo).startswith("loss.terms[1].name: unknown loss term 'tripplet'")
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=[*FOLDERS, "loss.terms=[{name: triplet, marg: 0.3}]"])
    msg = one_problem(excinfo)
    assert msg.startswith("loss.terms[0].marg: not a parameter of the triplet term") and "did you mean 'margin'" in msg


# ------------------------------------------------------------------------------------------- data.sources

SOURCES = {"sources": [{"name": "studio", "source": "folders", "image_dir_train": "/data/studio"},
                       {"name": "real", "source": "csv", "train_csv": "/data/real.csv", "image_dir_train": "/data/r"}]}


@pytest.mark.parametrize("source", ["csv", "folders"])
def test_data_source_beside_data_sources_is_an_error_naming_both(tmp_path, source):
    """data.sources replaces data.source (each entry names its own): writing both is a mistake, not a no-op."""
    path = write_yaml(tmp_path / "c.yaml", {"data": {"source": source, **SOURCES}})
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    msg = one_problem(excinfo)
    assert msg.startswith("data.source and data.sources:"), msg
    assert "source: csv | folders | manifest" in msg and "remove data.source" in msg, msg
    with pytest.raises(ConfigError):
        load_config(write_yaml(tmp_path / "d.yaml", {"data": SOURCES}), overrides=[f"data.source={source}"])


def test_a_saved_config_with_data_sources_reloads_and_hashes_the_same(tmp_path):
    """config.yaml (and a tune trial's config) is written from config_to_dict: it must reload as it was."""
    cfg = load_config(write_yaml(tmp_path / "c.yaml", {"data": SOURCES}))
    assert "source" not in config_to_dict(cfg)["data"]
    again = load_config(write_yaml(tmp_path / "saved.yaml", config_to_dict(cfg)))
    assert config_to_dict(again) == config_to_dict(cfg)


def test_a_run_written_before_the_rule_still_loads_its_config(tmp_path):
    """Older versions wrote the default ``data.source: csv`` beside ``data.sources`` into every run's config.yaml;
    evaluate / predict / --resume / audit of such a run read it as a run file, not as a user's config."""
    cfg = load_config(write_yaml(tmp_path / "c.yaml", {"data": SOURCES}))
    old = config_to_dict(cfg)
    old["data"]["source"] = "csv"
    saved = write_yaml(tmp_path / "run" / "config.yaml", old)
    with pytest.raises(UserError, match="data.source and data.sources"):
        load_config(saved)
    assert config_to_dict(load_config(saved, run_file=True)) == config_to_dict(cfg)


def test_a_run_written_with_data_cache_scale_still_loads_its_config(tmp_path):
    """Runs before issue 20 saved ``data.cache_scale`` (the cache then stored hard-policy training pixels larger); the
    cache now stores what ``data.cache: off`` decodes, the key is gone, and such a run still evaluates and resumes."""
    cfg = load_config(write_yaml(tmp_path / "c.yaml", {"data": {"cache": "disk"}}))
    old = config_to_dict(cfg)
    old["data"]["cache_scale"] = 1.15
    saved = write_yaml(tmp_path / "run" / "config.yaml", old)
    with pytest.raises(UserError, match="data.cache_scale: removed: "):
        load_config(saved)
    assert config_to_dict(load_config(saved, run_file=True)) == config_to_dict(cfg)


@pytest.mark.parametrize("key", ["data.cache_scale=1.15", "audit.near_dup_threshold=0.9", "audit.hash_threshold=6"])
def test_a_removed_key_says_why_it_went_in_one_line(key: str) -> None:
    with pytest.raises(UserError) as err:
        load_config(None, overrides=[key])
    message = str(err.value)
    assert f"{key.split('=')[0]}: removed: " in message and "delete the key" in message, message
