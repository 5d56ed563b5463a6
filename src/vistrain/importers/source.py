"""A file another project wrote (timm train.py's ``args.yaml``, a yacs config), read as that project reads it, and
the record of what a mapping did with each of its keys: every key the mapping did not use is reported, none is
dropped silently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vistrain.errors import UserError

MISSING = object()
# What PyYAML raises for text it cannot read (as config.loader.YAML_ERRORS, without importing the schema's loader).
YAML_ERRORS = (yaml.YAMLError, ValueError, IndexError, TypeError, RecursionError)


def read_source(path: Path) -> dict[str, Any]:
    """The file as ``yaml.safe_load`` reads it: timm writes ``args.yaml`` with ``yaml.safe_dump`` and yacs reads
    its files with ``yaml.safe_load`` (YAML 1.1: an unquoted ``yes`` is true there, and so it is here)."""
    if not path.is_file():
        raise UserError(f"SRC: file not found: {path} (timm train.py's args.yaml or a yacs config file)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from err
    except YAML_ERRORS as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}:{where} not valid YAML: {what}") from err
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys (timm train.py's args.yaml, or a yacs "
                        "config's sections MODEL, INPUT, SOLVER ...)")
    return data


def shown(value: Any) -> str:
    """A value as YAML writes it in flow style, on one line: ``0.65``, ``true``, ``null``, ``[0.08, 1.0]``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def is_unset(value: Any) -> bool:
    """A value that switches its key off: nothing to carry over (``null``, ``false``, ``''``, ``[]``, ``{}``, 0)."""
    return value is None or value is False or value in ("", 0) or (isinstance(value, list | dict) and not value)


class Source:
    """The source's keys (flat: ``SOLVER.BASE_LR`` for a yacs file) with the project's own defaults for the keys it
    leaves out, and what the mapping did with each: read (``get``), or left as not read by the source itself with
    its other settings (``inactive``). ``left()`` is the rest: the keys with no vistrain equivalent."""

    def __init__(self, path: Path, keys: dict[str, Any], defaults: dict[str, Any]):
        self.path = path
        self.keys = keys
        self.defaults = defaults
        self.used: set[str] = set()
        self.not_read: dict[str, str] = {}  # key -> why the source itself does not read it
        self.unset: list[str] = []  # keys the file gives no value (null, false, ''): nothing to carry

    def given(self, key: str) -> bool:
        return key in self.keys

    def get(self, key: str, default: Any = MISSING) -> Any:
        """The file's value, else the project's default (``default`` when given, else ``defaults``, else None)."""
        self.used.add(key)
        if key in self.keys:
            return self.keys[key]
        return self.defaults.get(key) if default is MISSING else default

    def peek(self, key: str) -> Any:
        """The value ``get`` would give, without counting the key as read."""
        return self.keys.get(key, self.defaults.get(key))

    def inactive(self, key: str, why: str) -> None:
        """``key`` changes nothing in the source with its other settings (``decay_rate`` under a cosine schedule)."""
        self.used.add(key)
        if key in self.keys:
            if is_unset(self.keys[key]):
                self.unset.append(key)
            else:
                self.not_read[key] = why

    def left(self) -> dict[str, Any]:
        return {k: v for k, v in self.keys.items() if k not in self.used}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"SOLVER": {"BASE_LR": 3e-4}}`` -> ``{"SOLVER.BASE_LR": 3e-4}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat
