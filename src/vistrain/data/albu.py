"""``augment.albumentations``: a pipeline file saved with ``albumentations.save`` (.yaml / .json) as one step of the
training transform (``transforms.TrainTransform``), on the preprocessed uint8 pixels after the policy's operations
and before the normalisation.

The file is read with ``albumentations.load``, which builds only the classes Albumentations registers (no code from
the file runs). Before that, every transform entry is checked here so that a mistake is one line naming the key,
the file and the transform: an unknown transform name, an argument the transform does not take (Albumentations
itself only warns and drops it), a value it refuses; then the pipeline runs once on a blank image of the training
size, which it must return as uint8 [H, W, 3] of that size (vistrain normalises afterwards).

Albumentations draws from generators of its own; ``AlbumentationsStep`` seeds them for each image from torch's
generator, which the dataset seeds per item (``dataset.item_rng``): an image's draws are the same in any loader
worker and in a resumed epoch.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from vistrain.config.schema import AugmentCfg
from vistrain.data.preprocess import size_hw
from vistrain.errors import UserError, did_you_mean

KEY = "augment.albumentations"
FORMATS = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}  # albumentations.save's two formats, by file suffix


def albumentations() -> Any:
    """The library, imported without its update check: on import it asks PyPI for a newer version unless told not to,
    and nothing vistrain runs downloads."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        import albumentations as A
    except ImportError:
        raise UserError(f"{KEY}: needs Albumentations: pip install 'vistrain[albumentations]'") from None
    return A


def load_pipeline(path: str | Path, hw: tuple[int, int]) -> Any:
    """The pipeline saved at ``path`` (an ``albumentations.Compose``), checked on a blank uint8 image of size ``hw``
    [H, W]; a mistake is a one-line ``UserError`` naming ``augment.albumentations`` and the file."""
    A = albumentations()
    path = Path(path)
    where = f"{KEY}: {path}"
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{where}: expected a .yaml, .yml or .json file written by albumentations.save")
    _check_entries(_read(path, fmt, where), where)
    pipeline = A.load(str(path), data_format=fmt)
    if not isinstance(pipeline, A.BaseCompose):
        pipeline = A.Compose([pipeline])
    _check_output(pipeline, hw, where)
    return pipeline


def _read(path: Path, fmt: str, where: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{where}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
    try:
        return yaml.safe_load(text) if fmt == "yaml" else json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{where}: not valid YAML ({getattr(err, 'problem', None) or 'syntax error'}{at})") from None


def _entries(node: Any, where: str) -> Iterator[dict[str, Any]]:
    """Every transform entry of a saved pipeline (``{"transform": {...}}``, composes holding ``transforms``)."""
    if not (isinstance(node, dict) and isinstance(node.get("__class_fullname__"), str)):
        raise UserError(f"{where}: not an albumentations pipeline (each transform needs its '__class_fullname__'; "
                        "write the file with albumentations.save)")
    yield node
    children = node.get("transforms", [])
    if not isinstance(children, list):
        raise UserError(f"{where}: not an albumentations pipeline ('transforms' of {node['__class_fullname__']} is "
                        "not a list)")
    for child in children:
        yield from _entries(child, where)


def _check_entries(data: Any, where: str) -> None:
    """Each transform's name is one Albumentations knows, each argument one its class takes, each value accepted."""
    from albumentations.core.serialization import (
        NON_SERIALIZABLE_REGISTRY,
        SERIALIZABLE_REGISTRY,
        register_additional_transforms,
        shorten_class_name,
    )

    if not isinstance(data, dict) or "transform" not in data:
        raise UserError(f"{where}: not an albumentations pipeline (no 'transform' entry; write the file with "
                        "albumentations.save)")
    register_additional_transforms()  # albumentations.load does the same: ToTensorV2 and the like
    for entry in _entries(data["transform"], where):
        name = shorten_class_name(entry["__class_fullname__"])
        if name in NON_SERIALIZABLE_REGISTRY:
            raise UserError(f"{where}: transform {name} holds code and cannot be loaded from a file")
        cls = SERIALIZABLE_REGISTRY.get(name)
        if cls is None:
            raise UserError(f"{where}: unknown transform '{name}'{did_you_mean(name, SERIALIZABLE_REGISTRY)}")
        _check_arguments(cls, name, entry, where)


def _check_arguments(cls: type, name: str, entry: dict[str, Any], where: str) -> None:
    """A transform entry builds, and names no argument its class would drop (Albumentations only warns)."""
    if "transforms" in entry:  # a compose: its children are checked as entries of their own
        return
    args = {k: v for k, v in entry.items() if k != "__class_fullname__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unknown argument Albumentations warns about is refused below
        try:
            transform = cls(**args)
        except (TypeError, ValueError) as err:
            raise UserError(f"{where}: transform {name}: {_reason(err)}") from None
    # what albumentations.save writes for the class (a parent's arguments too) and what its constructor takes
    known = set(transform.to_dict()["transform"]) | set(inspect.signature(cls.__init__).parameters) - {"self"}
    for arg in args:
        if arg not in known:
            raise UserError(f"{where}: transform {name}: unknown argument '{arg}'{did_you_mean(arg, known)}; "
                            f"valid: {', '.join(sorted(known - {'__class_fullname__'}))}")


def _reason(err: Exception) -> str:
    """A transform's refusal on one line (pydantic's errors as ``field: message``)."""
    errors = getattr(err, "errors", None)
    if callable(errors):
        try:
            return "; ".join(f"{'.'.join(map(str, e['loc'][:1]))}: {e['msg']}" for e in errors())
        except (TypeError, KeyError):
            pass
    return " ".join(str(err).split())


def _check_output(pipeline: Any, hw: tuple[int, int], where: str) -> None:
    """The pipeline on a blank training-size image: it must give uint8 [H, W, 3] of that size back."""
    blank = np.full((*hw, 3), 128, dtype=np.uint8)
    try:
        out = pipeline(image=blank)["image"]
    except Exception as err:  # noqa: BLE001 - any transform's refusal of the image is the file's mistake
        raise UserError(f"{where}: the pipeline fails on a {hw[0]}x{hw[1]} training image: {_reason(err)}") from None
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if not (isinstance(out, np.ndarray) and dtype == np.uint8 and tuple(shape) == (*hw, 3)):
        raise UserError(f"{where}: the pipeline must return uint8 [H, W, 3] pixels of the training size "
                        f"{hw[0]}x{hw[1]} (vistrain normalises afterwards: leave out Normalize and ToTensorV2); it "
                        "returned "
                        f"{type(out).__name__} {dtype} {tuple(shape) if shape is not None else ''}".rstrip())


def check_pipeline(aug: AugmentCfg, img_size: int | Sequence[int]) -> None:
    """``augment.albumentations``' file loads and works at the training size: a one-line user error before a
    command builds anything (and before a run directory exists), not an error in a loader worker later."""
    if aug.albumentations is not None:
        load_pipeline(aug.albumentations, size_hw(img_size))


class AlbumentationsStep:
    """The loaded pipeline as a step of ``TrainTransform``: uint8 [H, W, 3] -> uint8 [H, W, 3]. Its generators are
    seeded for every image from torch's, which the dataset seeds per item."""

    def __init__(self, path: str | Path, hw: tuple[int, int]):
        self.pipeline = load_pipeline(path, hw)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.pipeline.set_random_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        return np.ascontiguousarray(self.pipeline(image=pixels)["image"])
