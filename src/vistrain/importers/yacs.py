"""A yacs config of a re-ID baseline -> a vistrain re-ID config: the file read as yacs reads it (``_BASE_``
inheritance, string values decoded as Python literals), the project told from its keys (reid-strong-baseline or
fast-reid), and what both map the same way (the re-ID task, the P x K sampler, the evaluation)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from vistrain.errors import UserError
from vistrain.importers.common import model_defaults, same_floats
from vistrain.importers.draft import Draft, section_block
from vistrain.importers.source import Source, flatten, read_source

MAX_BASES = 10  # _BASE_ files deep: more is a loop
# Keys only fast-reid spells so (the strong baseline has MODEL.NAME, SOLVER.OPTIMIZER_NAME, SOLVER.MAX_EPOCHS ...)
FASTREID_SECTIONS = ("MODEL.BACKBONE.", "MODEL.HEADS.", "MODEL.LOSSES.", "INPUT.REA.", "INPUT.FLIP.", "INPUT.PADDING.")
FASTREID_KEYS = ("SOLVER.OPT", "SOLVER.MAX_EPOCH", "DATALOADER.SAMPLER_TRAIN", "_BASE_")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def read_yacs(data: dict[str, Any], path: Path) -> tuple[dict[str, Any], str]:
    """The keys of the yacs file ``path`` (already read as ``data``), flat and decoded, its ``_BASE_`` files merged
    under them, and which project wrote it: ``fastreid`` or ``strong_baseline``."""
    flat = {key: decode(value) for key, value in flatten(with_bases(data, path)).items()}
    is_fastreid = any(key.startswith(FASTREID_SECTIONS) or key in FASTREID_KEYS for key in flatten(data))
    return flat, "fastreid" if is_fastreid else "strong_baseline"


def with_bases(data: dict[str, Any], path: Path, depth: int = 0) -> dict[str, Any]:
    """``data`` over the files its ``_BASE_`` names (relative to ``path``'s folder), as fast-reid's CfgNode merges
    them: the base first, this file's keys on top."""
    base = data.get("_BASE_")
    if base is None:
        return data
    if depth >= MAX_BASES:
        raise UserError(f"{path}: _BASE_ files nest more than {MAX_BASES} deep (a file that names itself?)")
    base_path = (path.parent / str(base)).resolve()
    if not base_path.is_file():
        raise UserError(f"{path}: _BASE_: file not found: {base_path}")
    merged = with_bases(read_source(base_path), base_path, depth + 1)
    return _merge(merged, {k: v for k, v in data.items() if k != "_BASE_"})


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def decode(value: Any) -> Any:
    """A string value as yacs decodes it: a Python literal when it is one (``('market1501')`` is the string
    market1501, ``("CrossEntropyLoss", "TripletLoss",)`` a tuple), else the string."""
    if not isinstance(value, str):
        return value
    try:
        decoded = ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value
    return list(decoded) if isinstance(decoded, tuple) else decoded


def flag(value: Any) -> bool:
    """A yes/no key of these projects: ``'yes'`` / ``'on'`` / true (their strings or a YAML boolean)."""
    return value is True or str(value).lower() in ("yes", "on", "true", "1")


def names(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


def data_root(src: Source, d: Draft, key: str, found: str, root: Path, layouts: dict[str, tuple[str, ...]]) -> None:
    """``data.source: reid`` and its folders for the data set ``found`` (the first of ``key``) under ``root``."""
    d.set("data.source", "reid")
    layout = layouts.get(found)
    if layout is None:
        d.set("data.root", str(root / found))
        d.note(key, src.get(key), f"vistrain reads Market-1501-style folders (pid_cX names in train / query / gallery "
               f"folders); {found} is not one here: set data.root and data.*_folder", target="data.root")
        return
    folder, train, query, gallery = layout
    d.set("data.root", str(root / folder))
    for name, value, default in (("train_folder", train, "bounding_box_train"), ("query_folder", query, "query"),
                                 ("gallery_folder", gallery, "bounding_box_test")):
        if value != default:
            d.set(f"data.{name}", value)


def pk_sampler(src: Source, d: Draft, pk: bool, batch_key: str, k_key: str) -> None:
    """P identities x K images per batch (the baselines' identity samplers), or shuffled batches."""
    batch = int(src.get(batch_key))
    if not pk:
        d.set("sampler.name", "random")
        d.set("train.batch_size", batch)
        src.inactive(k_key, "no identity sampler")
        return
    k = int(src.get(k_key))
    d.set("sampler.name", "pk")
    d.set("sampler.p", max(batch // k, 1))
    d.set("sampler.k", k)
    d.set("train.batch_size", batch, "informational with the pk sampler: a batch is p * k images")
    if batch % k:
        d.note(batch_key, batch, f"not a multiple of K={k}: a batch is {batch // k} x {k} images, as in the source",
               target="sampler.p")


def normalisation(src: Source, d: Draft, model: str, keys: tuple[str, str], scale: float = 1.0) -> None:
    """The source's mean / std (``scale``: 255 for fast-reid's pixel values): left to the model (null) when they are
    the timm model's own, else written."""
    defaults = model_defaults(model) or {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    for key, name in zip(keys, ("mean", "std")):
        value = [float(v) / scale for v in src.get(key)]
        if not same_floats(value, defaults[name], tol=5e-4):
            d.set(f"preprocess.{name}", [round(v, 6) for v in value])


def reid_task(d: Draft, name: str, chain: str) -> None:
    """What both baselines are, whatever their keys say: a re-ID embedding model (avg pooling, linear classifier)
    trained every epoch and judged by mAP; its training transform (``chain``, in words) starts from the flip alone
    (the light policy without rotation or colour jitter); the mapping then sets its crop and erasing."""
    d.set("task", "embedding")
    d.set("project.name", name)
    d.set("model.pooling", "avg")
    d.set("model.head", "linear")
    d.set("train.monitor", "mAP", "the figure the baseline reports")
    d.set("train.early_stopping_patience", 0, "the baseline trains every epoch")
    d.set("eval.flip_feats", False)
    d.set("eval.max_rank", 50, "the baseline's CMC length")
    section_block(d, "augment", chain)
    d.set("augment.policy", "light", "the flip alone: rotate and color_jitter 0, the crop replaces shift and zoom")
    d.set("augment.rotate", 0)
    d.set("augment.color_jitter", 0.0)
