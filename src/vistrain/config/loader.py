"""YAML -> ``--mode`` preset -> ``key.path=value`` overrides -> one validated ``Config``.

Layers are merged as plain dicts and validated once, so every problem in every layer is reported
together, one line each, naming its dotted key. Relative paths in the YAML file resolve against the
file's folder as the path names it (``..`` is taken before links are followed: the checkout's ``configs/``, a link
to the package's ``vistrain/configs/``, reads ``../data`` beside itself); relative paths given on the command line
resolve against the working directory.
"""

from __future__ import annotations

import copy
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from vistrain.config.presets import MODES
from vistrain.config.schema import Config
from vistrain.errors import ConfigError, UserError, did_you_mean


@dataclass(frozen=True)
class ModeInfo:
    """The ``--mode`` preset under a config, and which of its keys the layers above replaced."""

    name: str
    by_file: tuple[str, ...]  # dotted preset keys the config file sets too (the file wins)
    by_overrides: tuple[str, ...]  # ... and those given as key.path=value

    def line(self) -> str:
        """``mode=fast (preset keys overridden by the config file: model.name, train.lr)``."""
        parts = [f"{what}: {', '.join(keys)}" for what, keys in
                 (("by the config file", self.by_file), ("by the command line", self.by_overrides)) if keys]
        return f"mode={self.name}" + (f" (preset keys overridden {'; '.join(parts)})" if parts else "")


def mode_info(cfg: Config) -> ModeInfo | None:
    """The ``--mode`` of a config from ``load_config`` (None without one)."""
    return cfg._mode


def override_keys(cfg: Config) -> tuple[str, ...]:
    """The dotted keys a config from ``load_config`` was given as ``key.path=value`` (what a resume applies over
    the run's effective config, even a value equal to config.yaml's)."""
    return cfg._overrides


def load_config(
    path: str | Path | dict[str, Any] | None,
    mode: str | None = None,
    overrides: list[str] | None = None,
    run_file: bool = False,
) -> Config:
    """Build the validated config. ``path`` None means defaults only (tests, ``demo``); a dict is a config already
    read (the API's ``vistrain.load_config({...})``: relative paths resolve against the working directory). The
    mode, and which of its keys the file and overrides replaced, is attached for the log (``mode_info``).
    ``run_file``: ``path`` is a run's own config.yaml, written by vistrain (see ``_upgrade_run_file``)."""
    merged: dict[str, Any] = {}
    user: dict[str, Any] = {}
    if mode:
        if mode not in MODES:
            raise UserError(f"--mode: unknown mode '{mode}'; valid: {', '.join(MODES)}{did_you_mean(mode, MODES)}")
        merged = copy.deepcopy(MODES[mode])
    if isinstance(path, dict):
        user = copy.deepcopy(path)
        _resolve_paths(user, Path.cwd())
        merged = deep_merge(merged, user)
    elif path is not None:
        path = Path(path)
        user = read_yaml(path)
        if run_file:
            _upgrade_run_file(user)
        _resolve_paths(user, Path(os.path.abspath(path)).parent)
        merged = deep_merge(merged, user)
        merged.setdefault("project", {})
        if isinstance(merged["project"], dict):
            merged["project"].setdefault("name", path.stem)
    cli = parse_overrides(overrides or [])
    _resolve_paths(cli, Path.cwd())
    merged = deep_merge(merged, cli)
    cfg = validate(merged)
    cfg._overrides = tuple(sorted(_leaf_keys(cli)))
    if mode:
        preset = _leaf_keys(MODES[mode])
        cfg._mode = ModeInfo(mode, tuple(sorted(preset & _leaf_keys(user))), tuple(sorted(preset & _leaf_keys(cli))))
    return cfg


def _upgrade_run_file(saved: dict[str, Any]) -> None:
    """What older vistrain versions wrote into a run's config.yaml that this one refuses in a user's file: the
    default ``data.source`` beside ``data.sources`` (never read there), ``data.cache_scale`` (the cache now
    stores what ``data.cache: off`` decodes, so nothing reads it), and a retrieval ``train.monitor: recall@K``
    from before ``data.split_classes`` (that figure is now ``knn_recall@K``), so that their runs still evaluate,
    predict, resume and audit. A run written before ``preprocess.resize.shrink`` decoded in full and resized with
    its ``interpolation``: it resumes so (``shrink: interpolation``)."""
    pre = saved.get("preprocess")
    if isinstance(pre, dict) and isinstance(pre.get("resize"), dict):
        pre["resize"].setdefault("shrink", "interpolation")
    data = saved.get("data")
    if not isinstance(data, dict):
        return
    train = saved.get("train")
    monitor = train.get("monitor") if isinstance(train, dict) else None
    if "split_classes" not in data and isinstance(monitor, str) and monitor.startswith("recall@"):
        train["monitor"] = f"knn_{monitor}"  # closed-set recall, named recall@K before data.split_classes
    data.pop("cache_scale", None)
    if data.get("sources"):
        data.pop("source", None)


def _leaf_keys(layer: dict[str, Any], prefix: str = "") -> set[str]:
    """The dotted keys a layer sets: ``{"train": {"lr": 1}}`` -> ``{"train.lr"}``."""
    keys: set[str] = set()
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        keys |= _leaf_keys(value, f"{dotted}.") if isinstance(value, dict) and value else {dotted}
    return keys


class ConfigYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose plain booleans are YAML 1.2's: ``true`` / ``false`` (any of the three cases).

    PyYAML follows YAML 1.1, which also reads ``off / on / yes / no`` as booleans, so ``data.cache: off`` reached
    the schema as ``False`` while the README documents the word. Here those words stay strings: a string field
    (``data.cache``, ``project.name``) keeps them as written, and a bool field still takes them, because pydantic
    reads ``'off'`` / ``'yes'`` ... as booleans. Files written by ``yaml.safe_dump`` quote such strings, so a run's
    config.yaml reads back the same with either loader.
    """


_BOOL_TAG = "tag:yaml.org,2002:bool"
ConfigYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigYamlLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml(text: str) -> Any:
    """Parse config text (a file, or a ``key=value`` value) with ``ConfigYamlLoader``: safe, YAML 1.2 booleans."""
    return yaml.load(text, Loader=ConfigYamlLoader)  # a SafeLoader subclass: builds plain values only


# What PyYAML raises for text it cannot read: its own errors, and a few plain ones from its constructors
# (``!!float`` with no value is an IndexError, ``!!int 'x'`` a ValueError; very deep nesting a RecursionError).
YAML_ERRORS = (yaml.YAMLError, ValueError, IndexError, TypeError, RecursionError)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"--config: file not found: {path}")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from err
    except YAML_ERRORS as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]  # a ReaderError has no 'problem'
        raise UserError(f"{path}:{where} not valid YAML: {what}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (data:, model:, train: ...)")
    return data


# What `evaluate` and `predict` take as key=value: options that change what is scored or how it is computed,
# never the trained model (a training key there would describe a run that did not happen).
EVAL_OVERRIDES = ("eval.*", "data.test_csv", "data.image_dir_test", "data.max_image_pixels", "train.device",
                  "train.num_workers", "train.num_threads")


def restrict_overrides(items: list[str], allowed: tuple[str, ...], what: str) -> list[str]:
    """The dotted keys of ``items``, each of which must be in ``allowed`` (``section.*``: any key of it)."""
    parse_overrides(items)  # malformed items are reported as for train
    keys = [item.partition("=")[0] for item in items]
    refused = [key for key in keys if not any(key == a or (a.endswith(".*") and key.startswith(a[:-1]))
                                              for a in allowed)]
    if refused:  # every refused key at once, as a config file's problems are
        raise UserError(f"{', '.join(dict.fromkeys(refused))}: cannot be changed by {what}; valid keys: "
                        f"{', '.join(allowed)} (other keys describe the training: train a new run)")
    return keys


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=3e-4", "data.valid_fold=all"]`` -> nested dict; values are parsed as YAML (``load_yaml``, as a
    config file is: ``data.cache=off`` is the word)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part or any(c.isspace() for c in part) for part in key.split(".")):
            raise UserError(f"override '{item}': expected key.path=value, e.g. train.lr=3e-4")
        try:
            value = load_yaml(raw) if raw != "" else None
        except YAML_ERRORS as err:
            raise UserError(f"override '{item}': value is not valid YAML") from err
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}': '{part}' was already given a value")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate(raw: dict[str, Any]) -> Config:
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_merge_problems([_format_error(e) for e in err.errors()])) from None
    _absolute_defaults(cfg)
    return cfg


def _merge_problems(lines: list[str]) -> list[str]:
    """A value that fails every member of a union (``int > 0`` or ``'auto'``) is one mistake: one line."""
    merged: dict[str, list[str]] = {}
    for line in lines:
        key, sep, msg = line.partition(": ")
        merged.setdefault(key if sep else line, []).append(msg if sep else "")
    out = []
    for key, msgs in merged.items():
        got = {m[m.rfind(" (got "):] for m in msgs if " (got " in m}
        if len(msgs) > 1 and len(got) == 1:
            suffix = got.pop()
            out.append(f"{key}: " + " or ".join(m.removesuffix(suffix) for m in msgs) + suffix)
        else:
            out += [f"{key}: {m}" if m else key for m in msgs]
    return out


def _absolute_defaults(cfg: Config) -> None:
    """Relative paths left at their defaults (``experiments``, ``logs``) mean the working directory, so the
    saved config.yaml reloads to the same folders from anywhere."""
    for key in _path_keys():
        if "*" in key:  # list items have no path defaults
            continue
        section = cfg
        for part in key[:-1]:
            section = getattr(section, part)
        value = getattr(section, key[-1])
        if isinstance(value, Path) and not value.is_absolute():
            setattr(section, key[-1], (Path.cwd() / value).resolve())


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain YAML-safe dict (paths as strings, tuples as lists): what config.yaml holds. Without ``data.source``
    when ``data.sources`` is given: each source names its own, and a config naming both is refused."""
    out = cfg.model_dump(mode="json")
    if cfg.data.sources:
        del out["data"]["source"]
    return out


# Keys earlier versions documented, with why they went: a config that still sets one learns it in one line.
REMOVED_KEYS = {
    "data.cache_scale": "the cache stores exactly what data.cache: off decodes, so the cache no longer changes the "
                        "training pixels",
    "audit.near_dup_threshold": "near duplicates are the pairs that stand out from this data set's nearest "
                                "neighbours (audit.near_dup_z)",
    "audit.hash_threshold": "near duplicates are the pairs that stand out from this data set's nearest "
                            "neighbours (audit.near_dup_z)",
}


def _format_error(e: dict[str, Any]) -> str:
    loc = [str(p) for p in e["loc"] if not str(p).startswith(("function-after", "literal", "lax-or", "union"))]
    # pydantic appends the member type to a union's loc ("int", "tuple[int, int]"); drop those.
    loc = [p for p in loc if p not in {"int", "str", "bool", "float", "tuple[int,int]", "list[str]"}]
    loc = [p for p in loc if not p.startswith(("tuple[", "list[", "constrained-", "is-instance", "json-or"))]
    key = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", ".".join(loc))  # list items: data.sources[0].ratio
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        if key in REMOVED_KEYS:
            return f"{key}: removed: {REMOVED_KEYS[key]}; delete the key"
        parent = _section_model(loc[:-1])
        valid = sorted(parent.model_fields) if parent else []
        return f"{key}: unknown key; valid keys here: {', '.join(valid)}{did_you_mean(loc[-1], valid)}"
    if e["type"] in ("model_type", "model_attributes_type", "dict_type"):  # a section given as a non-mapping
        msg = "expected a mapping of keys (key: value lines indented under it)"
    if not key:
        return msg
    got = e.get("input")
    nested = isinstance(got, dict) or (isinstance(got, list) and any(isinstance(x, dict) for x in got))
    shown = "" if nested or got is None else f" (got {_short(got)})"
    return f"{key}: {msg}{shown}"


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` on one line and at most ``limit`` characters: a message names the value, it does not dump it."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _section_model(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        if part.isdigit():  # an item of a list of sections (data.sources[0])
            continue
        field = model.model_fields.get(part)
        inner = _list_model(field.annotation) if field is not None else None
        if inner is not None:
            model = inner
            continue
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _list_model(ann: Any) -> type[BaseModel] | None:
    """The section type of a ``list[Section]`` (or ``list[Section] | None``) field, else None."""
    for t in (ann, *typing.get_args(ann)):
        if typing.get_origin(t) is list:
            inner = typing.get_args(t)[0]
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def _path_keys(model: type[BaseModel] = Config, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Dotted keys whose type is a filesystem path (found from the schema, so new path keys need no list)."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _path_keys(ann, prefix + (name,))
        elif (inner := _list_model(ann)) is not None:  # "*": every item of the list (data.sources)
            keys += _path_keys(inner, prefix + (name, "*"))
        elif ann is Path or (isinstance(ann, types.UnionType) and Path in typing.get_args(ann)):
            keys.append(prefix + (name,))
    return keys


def _resolve_paths(layer: dict[str, Any], base: Path) -> None:
    for key in _path_keys():
        _resolve_at(layer, key, base)


def _resolve_at(node: Any, key: tuple[str, ...], base: Path) -> None:
    """Make the path at ``key`` (``*``: every list item) of a raw config layer absolute against ``base``."""
    part, rest = key[0], key[1:]
    if part == "*":
        for item in node if isinstance(node, list) else []:
            _resolve_at(item, rest, base)
    elif not isinstance(node, dict):
        return
    elif rest:
        _resolve_at(node.get(part), rest, base)
    elif isinstance(node.get(part), str) and node[part]:
        p = Path(node[part]).expanduser()
        node[part] = str(p if p.is_absolute() else Path(os.path.normpath(base / p)).resolve())
