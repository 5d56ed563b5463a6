"""The search space of ``vistrain tune``: ``tune.space`` (dotted config key -> distribution) parsed and checked
against the schema, one line per problem, before any trial runs; and the helpers that apply sampled values to
a config dict."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from vistrain.config.loader import config_to_dict, deep_merge, validate
from vistrain.config.schema import Config
from vistrain.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    import optuna

SPACE_TYPES = ("float", "int", "categorical")
SPEC_KEYS = {"float": ("type", "low", "high", "log", "step"), "int": ("type", "low", "high", "log", "step"),
             "categorical": ("type", "choices")}
# The default space, per task: few keys that matter for almost every model, with ranges wide enough to be
# safe for pretrained fine-tuning and training from scratch alike.
DEFAULT_SPACES: dict[str, dict[str, dict[str, Any]]] = {
    "classification": {
        "train.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
        "train.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-1, "log": True},
        "augment.mixup_alpha": {"type": "float", "low": 0.0, "high": 0.4},
    },
}
GENERIC_SPACE = {k: v for k, v in DEFAULT_SPACES["classification"].items() if k.startswith("train.")}


@dataclass(frozen=True)
class Param:
    """One searched config key: ``type`` float / int with ``low``..``high`` (``log``, ``step``), or
    categorical ``choices``."""

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def project(self, value: Any) -> Any:
        """The allowed value nearest ``value`` (the config's own), for the baseline trial."""
        if self.type == "categorical":
            return _nearest_choice(self.choices, value)
        lo, hi = self.low, self.high
        if not _is_number(value):  # "auto", None: start from the middle of the range
            value = math.sqrt(lo * hi) if self.log else (lo + hi) / 2
        value = min(max(value, lo), hi)
        if self.step:
            value = lo + round((value - lo) / self.step) * self.step
            value = min(value, lo + math.floor((hi - lo) / self.step + 1e-9) * self.step)
        return int(round(value)) if self.type == "int" else float(value)


# ------------------------------------------------------------------------------------------ search space

def config_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema (``train.lr``, ``tracking.wandb.mode``, ...)."""
    keys = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += config_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def default_space(cfg: Config) -> dict[str, dict[str, Any]]:
    """The space used when ``tune.space`` is empty. Mixup needs an even batch, so it is left out otherwise."""
    space = copy.deepcopy(DEFAULT_SPACES.get(cfg.task, GENERIC_SPACE))
    batch = cfg.train.batch_size if cfg.train.batch_size != "auto" else cfg.train.batch_size_cpu
    if "augment.mixup_alpha" in space and batch % 2:
        del space["augment.mixup_alpha"]
    return space


def parse_space(cfg: Config) -> list[Param]:
    """``tune.space`` (or the default) as ``Param`` objects; every problem raises one ``ConfigError`` line."""
    raw = cfg.tune.space or default_space(cfg)
    keys = config_keys()
    params, problems = [], []
    for key, spec in raw.items():
        param, errors = _parse_param(str(key), spec, keys)
        problems += errors
        if param is not None:
            params.append(param)
    params, value_problems = _check_values(cfg, params)  # the well-formed ones: report everything at once
    problems += value_problems
    if problems:
        raise ConfigError(problems)
    return params


def _parse_param(key: str, spec: Any, keys: list[str]) -> tuple[Param | None, list[str]]:
    where = f"tune.space.{key}"
    if key not in keys:
        sections = sorted({k.split(".")[0] for k in keys})
        hint = f"; name a key inside it, e.g. {key}.{_first_leaf(keys, key)}" if key in sections else \
            did_you_mean(key, keys)
        return None, [f"{where}: not a config key{hint}"]
    if key.startswith("tune."):
        return None, [f"{where}: the tune section configures the search and cannot be searched itself"]
    if not isinstance(spec, dict):
        return None, [f"{where}: expected a mapping like {{type: float, low: 1e-5, high: 1e-2, log: true}} "
                      f"or {{type: categorical, choices: [a, b]}}; got {spec!r}"]
    kind = spec.get("type")
    if kind not in SPACE_TYPES:
        what = "missing 'type'" if kind is None else f"unknown type {kind!r}"
        return None, [f"{where}: {what}; valid: {', '.join(SPACE_TYPES)}{did_you_mean(str(kind), SPACE_TYPES)}"]
    unknown = [f"{where}: unknown field '{k}' for type {kind}; valid: {', '.join(SPEC_KEYS[kind])}"
               f"{did_you_mean(str(k), SPEC_KEYS[kind])}" for k in spec if k not in SPEC_KEYS[kind]]
    param, errors = _parse_choices(key, spec) if kind == "categorical" else _parse_range(key, kind, spec)
    return (param if not unknown and not errors else None), unknown + errors


def _first_leaf(keys: list[str], section: str) -> str:
    return next(k for k in keys if k.startswith(section + ".")).split(".", 1)[1]


def _parse_choices(key: str, spec: dict[str, Any]) -> tuple[Param | None, list[str]]:
    choices = spec.get("choices")
    where = f"tune.space.{key}"
    if not isinstance(choices, list) or not choices:
        return None, [f"{where}: categorical needs a non-empty list 'choices', e.g. choices: [adamw, sgd]"]
    bad = [c for c in choices if not (c is None or isinstance(c, bool | int | float | str))]
    if bad:
        return None, [f"{where}: choices must be numbers, strings, booleans or null; got {bad[0]!r}"]
    return Param(key, "categorical", choices=tuple(choices)), []


def _parse_range(key: str, kind: str, spec: dict[str, Any]) -> tuple[Param | None, list[str]]:
    where = f"tune.space.{key}"
    missing = [k for k in ("low", "high") if spec.get(k) is None]
    if missing:
        return None, [f"{where}: type {kind} needs {' and '.join(missing)} (e.g. low: 1e-5, high: 1e-2)"]
    values, problems = {}, []
    for name in ("low", "high", "step"):
        if spec.get(name) is None:
            continue
        number = _as_number(spec[name], kind)
        if number is None:
            problems.append(f"{where}: {name} must be {'an integer' if kind == 'int' else 'a number'}; "
                            f"got {spec[name]!r}")
        values[name] = number
    log_ = _as_bool(spec.get("log", False))
    if log_ is None:
        problems.append(f"{where}: log must be true or false; got {spec['log']!r}")
    if problems:
        return None, problems
    low, high, step = values["low"], values["high"], values.get("step")
    if low >= high:
        problems.append(f"{where}: low ({low}) must be less than high ({high})")
    if log_ and low <= 0:
        problems.append(f"{where}: log: true needs low > 0; got low={low}")
    if step is not None and step <= 0:
        problems.append(f"{where}: step must be positive; got {step}")
    if step is not None and log_ and (kind == "float" or step != 1):
        problems.append(f"{where}: step and log: true cannot be combined")
    return (None if problems else Param(key, kind, low, high, log_, step)), problems


def _as_number(value: Any, kind: str) -> float | int | None:
    """YAML reads ``1e-5`` (no dot) as a string: accept numeric strings, reject anything else."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if kind == "int":
        return int(number) if number.is_integer() else None
    return number


def _as_bool(value: Any) -> bool | None:
    """A bool as a config field reads it (pydantic: true / false, yes / no, on / off ... as the config loader
    leaves them strings); None when it is none of them. ``bool('no')`` would be True."""
    try:
        return TypeAdapter(bool).validate_python(value)
    except ValidationError:
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _nearest_choice(choices: tuple[Any, ...], value: Any) -> Any:
    """``value`` when it is a choice; else the numerically nearest (in log scale for positive numbers)."""
    if value in choices:
        return value
    numeric = [c for c in choices if _is_number(c)]
    if not _is_number(value) or not numeric:
        return choices[0]
    use_log = value > 0 and all(c > 0 for c in numeric)

    def distance(c: float) -> float:
        return abs(math.log(c) - math.log(value)) if use_log else abs(c - value)

    return min(numeric, key=distance)


def _check_values(cfg: Config, params: list[Param]) -> tuple[list[Param], list[str]]:
    """Validate each bound and choice as a config value; choices come back in the key's own type
    (``"1e-9"`` -> ``1e-09``), so the study, best_params.yaml and the trials agree."""
    base = config_to_dict(cfg)
    checked, problems = [], []
    for p in params:
        values = {"choice": list(p.choices)} if p.type == "categorical" else {"low": [p.low], "high": [p.high]}
        converted: list[Any] = []
        for label, items in values.items():
            for value in items:
                try:
                    converted.append(get_key(config_to_dict(validate(with_values(base, {p.key: value}))), p.key))
                except ConfigError as err:
                    problems.append(f"tune.space.{p.key}: {label} {value!r} is not a valid value: {err.problems[0]}")
        if p.type == "categorical" and len(converted) == len(p.choices):
            p = Param(p.key, p.type, choices=tuple(dict.fromkeys(converted)))
        checked.append(p)
    return checked, problems


# ----------------------------------------------------------------------------------------- config helpers

def nest(values: dict[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 1e-3}`` -> ``{"train": {"lr": 1e-3}}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def with_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    return deep_merge(base, nest(values))


def get_key(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node
