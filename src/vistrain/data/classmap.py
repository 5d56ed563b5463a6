"""``data.class_map``: a class_map.json (seed 003's format) that fixes a classifier's class order and carries free
metadata per class.

    {"class_to_idx": {"K-001": 0, "K-002": 1},          # required: every class, indices 0..C-1
     "idx_to_class": {"0": "K-001", "1": "K-002"},      # optional; must be the inverse when given
     "metadata": {"K-001": {"display_name": "Aspirin 100 mg", "training_weight": 1.5}, ...}}   # optional

``metadata.<class>.training_weight`` is what ``train.class_weights: from_class_map`` uses. The run's own
class_map.json keeps ``class_to_idx``, ``idx_to_class`` and this ``metadata`` block; ``predict``, the report and
``serve`` show ``metadata.<class>.display_name`` (else ``.name``) beside the class (``display_name``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vistrain.errors import UserError

KEY = "data.class_map"
DISPLAY_KEYS = ("display_name", "name")  # metadata fields shown beside a class, first found wins


@dataclass(frozen=True)
class ClassMap:
    path: Path
    classes: list[str]  # in index order
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)  # class -> free fields

    def weights(self, key: str = "train.class_weights") -> np.ndarray:
        """``metadata.<class>.training_weight`` in class order [C]; every class needs one."""
        missing = [c for c in self.classes if "training_weight" not in self.metadata.get(c, {})]
        if missing:
            raise UserError(f"{key}: from_class_map needs metadata.<class>.training_weight for every class of "
                            f"{self.path}; missing for {_listed(missing)}")
        return np.array([float(self.metadata[c]["training_weight"]) for c in self.classes], dtype=np.float64)

    def run_file(self) -> dict[str, Any]:
        """The metadata block the run's class_map.json carries (classes without metadata are left out)."""
        return {c: self.metadata[c] for c in self.classes if c in self.metadata}


def load_class_map(path: Path, key: str = KEY) -> ClassMap:
    """Read and check a class_map.json; every problem is a ``UserError`` naming ``key``, the file and the entry."""
    if not path.is_file():
        raise UserError(f"{key}: file not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{key}: {path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("class_to_idx"), dict) or not raw["class_to_idx"]:
        raise UserError(f"{key}: {path} needs a non-empty \"class_to_idx\" object ({{class: index}})")
    to_idx = raw["class_to_idx"]
    bad = [c for c, i in to_idx.items() if not isinstance(i, int) or isinstance(i, bool)]
    if bad:
        raise UserError(f"{key}: {path} class_to_idx[{bad[0]!r}] = {to_idx[bad[0]]!r} is not an integer index")
    if sorted(to_idx.values()) != list(range(len(to_idx))):
        raise UserError(f"{key}: {path} class_to_idx indices must be 0..{len(to_idx) - 1}, each once; got "
                        f"{sorted(to_idx.values())[:10]}{' ...' if len(to_idx) > 10 else ''}")
    classes = sorted(to_idx, key=to_idx.get)
    given = raw.get("idx_to_class")
    if given is not None:
        if not isinstance(given, dict) or {str(k): v for k, v in given.items()} != \
                {str(i): c for i, c in enumerate(classes)}:
            raise UserError(f"{key}: {path} idx_to_class is not the inverse of class_to_idx; fix it or remove it")
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict) or any(not isinstance(v, dict) for v in metadata.values()):
        raise UserError(f"{key}: {path} metadata must map each class to an object of fields")
    unknown = [c for c in metadata if c not in to_idx]
    if unknown:
        raise UserError(f"{key}: {path} metadata names class(es) not in class_to_idx: {_listed(unknown)}")
    for c, fields in metadata.items():
        w = fields.get("training_weight")
        if w is not None and (not isinstance(w, int | float) or isinstance(w, bool) or not math.isfinite(w)
                              or w <= 0):
            raise UserError(f"{key}: {path} metadata[{c!r}].training_weight = {w!r}; must be a number > 0")
    return ClassMap(path, classes, metadata)


def check_against(class_map: ClassMap, items: pd.DataFrame) -> list:
    """The class list in the map's order (labels as the data holds them); a class in the data that the map lacks,
    or one of the map's classes with no image, is a ``UserError`` naming the class."""
    labels = items["label"]
    by_name = {str(v): v for v in labels.unique().tolist()}
    extra = [n for n in sorted(by_name) if n not in set(class_map.classes)]
    if extra:
        first = items[labels.astype(str) == extra[0]]
        raise UserError(f"{KEY}: class '{extra[0]}' is in the data ({len(first)} image(s), e.g. "
                        f"{first['id'].iloc[0]}) but not in {class_map.path}"
                        f"{f' (nor {len(extra) - 1} other(s): {_listed(extra[1:])})' if len(extra) > 1 else ''}; "
                        "add it to class_to_idx")
    absent = [c for c in class_map.classes if c not in by_name]
    if absent:
        raise UserError(f"{KEY}: class(es) of {class_map.path} with no image in the data: {_listed(absent)}; "
                        "a classifier cannot learn a class it never sees (remove them from the map)")
    return [by_name[c] for c in class_map.classes]


def display_name(metadata: dict[str, Any] | None, cls: Any) -> str | None:
    """The display name of ``cls`` from a class_map.json metadata block (``display_name``, else ``name``)."""
    fields = (metadata or {}).get(str(cls)) or {}
    return next((str(fields[k]) for k in DISPLAY_KEYS if fields.get(k) not in (None, "")), None)


def _listed(names: list[str], most: int = 10) -> str:
    return ", ".join(map(str, names[:most])) + (f" ... ({len(names) - most} more)" if len(names) > most else "")
