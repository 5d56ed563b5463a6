"""Every value a user can write unquoted means what the README says, in a config file and as ``key=value``.

YAML 1.1 (PyYAML's default) reads ``off / on / yes / no`` as booleans, so ``data.cache: off`` reached the schema
as ``False``. The config reader resolves only ``true`` / ``false`` as booleans (YAML 1.2); bool fields still take
the words (pydantic reads ``'off'`` as False). The schema is walked, so a new ``Literal`` field is covered too.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from conftest import write_yaml
from pydantic import BaseModel

from vistrain.config import config_to_dict, load_config
from vistrain.config.schema import Config
from vistrain.errors import ConfigError
from vistrain.tracking.files import write_yaml as write_result_yaml

# Values that need other keys to form a valid config (cross-checks), by dotted key and value.
CONTEXT: dict[tuple[str, Any], dict[str, Any]] = {
    ("data.source", "reid"): {"task": "embedding"},
    ("model.last_stride", 1): {"task": "embedding"},
    ("model.last_stride", 2): {"task": "embedding"},
    ("model.head", "arcface"): {"task": "embedding"},
    ("model.head", "cosface"): {"task": "embedding"},
    ("train.class_weights", "from_class_map"): {"data": {"class_map": "/nowhere/class_map.json"}},
    ("data.split_classes", True): {"task": "embedding"},  # a retrieval run's protocol; refused for a classifier
    ("model.use_ema_weights", True): {"model": {"pretrained_path": "/nowhere/w.safetensors"}},  # whose EMA weights
}


def _literals(ann: Any) -> tuple[list[Any], bool]:
    """(the Literal values inside an annotation, whether they are items of a list)."""
    if typing.get_origin(ann) is Literal:
        return list(typing.get_args(ann)), False
    if typing.get_origin(ann) is list:
        values, _ = _literals(typing.get_args(ann)[0])
        return values, True
    found: list[Any] = []
    listed = False
    for arg in typing.get_args(ann):
        values, in_list = _literals(arg)
        found += values
        listed = listed or in_list
    return found, listed


def _sub_model(ann: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the section type of a field, whether it is a list of sections)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann, False
    for arg in typing.get_args(ann):
        model, _ = _sub_model(arg)
        if model is not None:
            return model, typing.get_origin(ann) is list or any(typing.get_origin(a) is list
                                                                 for a in typing.get_args(ann))
    return None, False


def _fields(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(path, annotation) of every leaf field; a list of sections contributes its item's fields under ``*``."""
    out = []
    for name, field in model.model_fields.items():
        sub, is_list = _sub_model(field.annotation)
        if sub is not None and sub.__name__ != "LossTerm":
            out += _fields(sub, prefix + ((name, "*") if is_list else (name,)))
        else:
            out.append((prefix + (name,), field.annotation))
    return out


def literal_cases() -> list[tuple[tuple[str, ...], Any, bool]]:
    cases = []
    for path, ann in _fields(Config):
        values, listed = _literals(ann)
        cases += [(path, value, listed) for value in values if not isinstance(value, bool)]
    return cases


def bool_fields() -> list[tuple[str, ...]]:
    return [path for path, ann in _fields(Config) if ann is bool]


def _nest(path: tuple[str, ...], text: str) -> str:
    """YAML text setting ``path`` to ``text`` written as is (unquoted); ``*`` is one item of a list of sections."""
    if path[0] == "data" and path[1] == "*":
        raise AssertionError(path)
    if len(path) >= 3 and path[2] == "*":  # data.sources[*].source: one source entry that names itself
        section, key, leaf = path[0], path[1], path[3]
        return f"{section}:\n  {key}:\n    - name: s\n      {leaf}: {text}\n"
    lines, indent = [], ""
    for part in path[:-1]:
        lines.append(f"{indent}{part}:")
        indent += "  "
    lines.append(f"{indent}{path[-1]}: {text}")
    return "\n".join(lines) + "\n"


def _override(path: tuple[str, ...], text: str) -> str:
    if "*" in path:
        i = path.index("*")
        return f"{'.'.join(path[:i])}=[{{name: s, {path[i + 1]}: {text}}}]"
    return f"{'.'.join(path)}={text}"


def _value(cfg: Config, path: tuple[str, ...]) -> Any:
    node: Any = cfg
    for part in path:
        node = node[0] if part == "*" else getattr(node, part)
    return node


def _context(path: tuple[str, ...], value: Any) -> tuple[str, list[str]]:
    extra = CONTEXT.get((".".join(path), value), {})
    flat = [f"{k}.{sk}={sv}" for k, v in extra.items() if isinstance(v, dict) for sk, sv in v.items()]
    flat += [f"{k}={v}" for k, v in extra.items() if not isinstance(v, dict)]
    return yaml.safe_dump(extra) if extra else "", flat


def _file(path: tuple[str, ...], value: Any, text: str) -> tuple[str, list[str]]:
    """(the YAML file setting ``path`` to ``text`` with its context, the context as overrides); a context in the
    same section (model.pretrained_path beside model.use_ema_weights) shares that section's block."""
    head, extra = _context(path, value)
    body, section = _nest(path, text), f"{path[0]}:\n"
    if [ln for ln in head.splitlines() if not ln.startswith(" ")] == [section.strip()] and body.startswith(section):
        return head + body[len(section):], extra
    return head + body, extra


@pytest.mark.parametrize(("path", "value", "listed"), literal_cases(),
                         ids=lambda x: ".".join(x) if isinstance(x, tuple) else str(x))
def test_every_literal_value_unquoted_in_a_file_and_as_an_override_means_itself(
        tmp_path: Path, path: tuple[str, ...], value: Any, listed: bool) -> None:
    text = f"[{value}]" if listed else str(value)
    want = [value] if listed else value
    content, extra = _file(path, value, text)
    config = tmp_path / "c.yaml"
    config.write_text(content)
    assert _value(load_config(config), path) == want, config.read_text()
    assert _value(load_config(None, overrides=[*extra, _override(path, text)]), path) == want


def test_the_walk_covers_the_words_yaml_1_1_turned_into_booleans() -> None:
    """The schema walk finds the fields this issue is about (so the parametrised test is not vacuous)."""
    cases = {(".".join(p), v) for p, v, _ in literal_cases()}
    assert {("data.cache", "off"), ("train.device", "cpu"), ("model.neck", "none"), ("eval.tta", "vflip"),
            ("data.sources.*.source", "folders"), ("task", "embedding")} <= cases
    assert len(cases) > 60


@pytest.mark.parametrize("path", bool_fields(), ids=".".join)
@pytest.mark.parametrize(("word", "want"), [("yes", True), ("no", False), ("on", True), ("off", False),
                                             ("y", True), ("n", False), ("true", True), ("False", False),
                                             ("ON", True), ("Off", False)])
def test_bool_fields_take_the_yes_no_on_off_words(tmp_path: Path, path: tuple[str, ...], word: str,
                                                  want: bool) -> None:
    content, extra = _file(path, want, word)
    config = tmp_path / "c.yaml"
    config.write_text(content)
    assert _value(load_config(config), path) is want
    assert _value(load_config(None, overrides=[*extra, _override(path, word)]), path) is want


@pytest.mark.parametrize(("key", "word", "want"), [
    ("train.amp", "off", "fp32"), ("train.amp", "on", "auto"), ("train.amp", "no", "fp32"),
    ("train.compile", "yes", True), ("train.compile", "off", False), ("train.compile", "max-autotune", "max-autotune"),
    ("train.channels_last", "no", False), ("train.channels_last", "auto", "auto"),
])
def test_bool_or_word_fields_read_the_words_as_their_bool(tmp_path: Path, key: str, word: str, want: Any) -> None:
    path = tuple(key.split("."))
    config = tmp_path / "c.yaml"
    config.write_text(_nest(path, word))
    assert _value(load_config(config), path) == want
    assert _value(load_config(None, overrides=[f"{key}={word}"]), path) == want


def test_a_string_field_keeps_the_word_as_written() -> None:
    cfg = load_config(None, overrides=["project.name=yes", "data.class_names=[no, yes, off]", "data.id_col=on"])
    assert (cfg.project.name, cfg.data.class_names, cfg.data.id_col) == ("yes", ["no", "yes", "off"], "on")


def test_a_run_config_yaml_rereads_to_the_same_values(tmp_path: Path) -> None:
    """config.yaml (written by the run, read by evaluate / resume / reports) round-trips 'off' and booleans."""
    cfg = load_config(None, overrides=["data.cache=off", "train.ema=yes", "data.class_names=[no, yes]"])
    write_result_yaml(tmp_path / "config.yaml", config_to_dict(cfg))
    again = load_config(tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert (again.data.cache, again.train.ema, again.data.class_names) == ("off", True, ["no", "yes"])
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["cache"] == "off"


def test_tune_space_reads_the_words_too(tmp_path: Path) -> None:
    from vistrain.tuning.space import parse_space

    config = write_yaml(tmp_path / "c.yaml", {})
    config.write_text("tune:\n  space:\n    data.cache: {type: categorical, choices: [off, memory]}\n"
                      "    train.lr: {type: float, low: 0.0001, high: 0.01, log: no}\n"
                      "    train.weight_decay: {type: float, low: 0.0001, high: 0.1, log: yes}\n")
    cfg = load_config(config)
    params = {p.key: p for p in parse_space(cfg)}
    assert params["data.cache"].choices == ("off", "memory")
    assert (params["train.lr"].log, params["train.weight_decay"].log) == (False, True)


def test_a_value_that_is_no_bool_word_is_still_refused() -> None:
    with pytest.raises(ConfigError, match=r"^train\.ema: .*\(got 'maybe'\)$"):
        load_config(None, overrides=["train.ema=maybe"])
