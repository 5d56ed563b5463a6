"""Weight files: the tensors a model starts from, out of a vistrain checkpoint, a checkpoint of timm's ``train.py``
or a plain state dict (.pth / .pth.tar / .bin / .safetensors); ``convert_checkpoint`` (``vistrain
convert-checkpoint``) writes them as one .safetensors file.

Reading runs no code from the file: safetensors holds none, and a pickle goes through the safe unpickler
(``engine.checkpoint.load_checkpoint``). timm's train.py (``timm.utils.CheckpointSaver``) saves ``state_dict``,
``state_dict_ema`` (with --model-ema), ``optimizer``, ``epoch``, ``arch``, ``metric`` and its arguments as an
``argparse.Namespace``, which only the full unpickler reads: such a file is refused with the one command that extracts
its weights (``convert_checkpoint(trust=True)``, for a file the user trusts), and read directly once ``args`` is gone.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vistrain.engine.checkpoint import SAFETENSORS_META, UnsafePickle, load_checkpoint, write_safetensors
from vistrain.errors import UserError

log = logging.getLogger(__name__)

# Where a checkpoint keeps its weights, first found wins: timm train.py's state_dict (also the common wrapper),
# and "model" (DeiT-style scripts); the EMA weights under the names timm's own load_state_dict(use_ema=True) reads.
WEIGHT_ENTRIES = ("state_dict", "model")
EMA_ENTRIES = ("state_dict_ema", "model_ema")
# Entries only a training script's checkpoint has beside its weights: the [MODEL] line describes such a file.
TRAINING_ENTRIES = ("arch", "epoch", "optimizer", *EMA_ENTRIES)
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")  # left out of the name of the .safetensors suggested
TRUST_FIX = "only --trust reads it, for a file you trust"


@dataclass
class Weights:
    """The tensors of a weight file and what the file is."""

    tensors: dict[str, torch.Tensor]  # DDP's module. and torch.compile's _orig_mod. prefixes removed
    kind: str  # vistrain (a run's checkpoint), training (timm train.py's or another script's) or plain (a state dict)
    entry: str | None = None  # the checkpoint entry they come from: state_dict, state_dict_ema, ema, model ...
    arch: str | None = None
    epoch: int | None = None
    fields: dict[str, Any] | None = None  # a vistrain checkpoint's plain fields (classes, preprocess ...)

    def origin(self) -> str:
        """'a timm train.py checkpoint: resnet10t, epoch 3, state_dict_ema', 'a vistrain checkpoint', 'a state dict'."""
        if self.kind == "vistrain":
            return "a vistrain checkpoint"
        if self.kind == "plain":
            return "a state dict"
        what = "a timm train.py checkpoint" if self.entry in ("state_dict", "state_dict_ema") else \
            "a training checkpoint"
        epoch = f"epoch {self.epoch}" if self.epoch is not None else "epoch unknown"
        return f"{what}: {self.arch or 'arch unknown'}, {epoch}, {self.entry}"


def read_weights(path: Path, key: str, ema: bool = False, ema_key: str = "model.use_ema_weights",
                 fix: str | None = None) -> Weights:
    """The weights of ``path`` read without running code from it. ``ema``: a training checkpoint's EMA weights
    (``state_dict_ema``), an error naming ``ema_key`` when it has none; a vistrain checkpoint always gives its
    evaluated weights, the EMA ones when the run kept them. A pickle that the safe unpickler refuses is an
    ``UnsafePickle`` ending in ``fix`` (default: the convert-checkpoint command that extracts its weights)."""
    try:
        if path.suffix == ".safetensors":
            return _read_safetensors(path, ema, ema_key)
        obj = load_checkpoint(path)
    except UnsafePickle as err:
        fix = fix or f"for a file you trust, extract its weights with: {convert_command(path, ema)}"
        raise UnsafePickle(_refusal(path, key, err.found, fix), err.found) from err
    except UserError as err:
        raise UserError(f"{key}: {err}") from err
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{key}: cannot read {path}: {first}") from err
    return pick_weights(obj, path, key, ema, ema_key)


def pick_weights(obj: Any, path: Path, key: str, ema: bool = False, ema_key: str = "model.use_ema_weights"
                 ) -> Weights:
    """The weights inside an unpickled file: a vistrain checkpoint's evaluated ones, a training checkpoint's
    ``state_dict`` (``state_dict_ema`` with ``ema``: an error naming ``ema_key`` and the file's keys when it has
    none), else the dict itself (a state dict)."""
    if not isinstance(obj, dict):
        raise UserError(f"{key}: {path} holds a {type(obj).__name__}; expected a state_dict or a checkpoint")
    if "model" in obj and "vistrain_version" in obj:  # a last_fold{k}.pth holds both: the EMA ones were evaluated
        entry = "ema" if obj.get("ema") is not None else "model"
        fields = {k: obj[k] for k in SAFETENSORS_META if k in obj}
        return Weights(_tensors(obj[entry], path, key), "vistrain", entry, epoch=obj.get("epoch"), fields=fields)
    entry = next((n for n in (EMA_ENTRIES if ema else WEIGHT_ENTRIES) if isinstance(obj.get(n), dict)), None)
    if ema and entry is None:
        raise UserError(f"{ema_key}: {path} has no EMA weights (no {' or '.join(EMA_ENTRIES)}); its keys: "
                        f"{_preview(list(obj))}")
    if entry is None or not any(k in obj for k in TRAINING_ENTRIES):
        return Weights(_tensors(obj[entry] if entry else obj, path, key), "plain")
    arch, epoch = obj.get("arch"), obj.get("epoch")
    return Weights(_tensors(obj[entry], path, key), "training", entry, arch if isinstance(arch, str) else None,
                   epoch if isinstance(epoch, int) else None)


def _tensors(state: dict[str, Any], path: Path, key: str) -> dict[str, torch.Tensor]:
    from timm.models import clean_state_dict  # DDP's and torch.compile's prefixes, as timm removes them

    tensors = clean_state_dict({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    if not tensors:
        raise UserError(f"{key}: {path} holds no tensors; expected a state_dict or a vistrain checkpoint")
    return tensors


def _read_safetensors(path: Path, ema: bool, ema_key: str) -> Weights:
    """A .safetensors file, described by its metadata: a vistrain run's (``save_weights``), one that
    ``convert_checkpoint`` wrote (its source, kind, entry, arch, epoch), or none (a plain state dict)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            fields = _json_fields(fh.metadata() or {})
        tensors = load_file(str(path))
    except SafetensorError as err:
        raise ValueError(str(err)) from err
    if "vistrain_version" in fields:
        return Weights(tensors, "vistrain", fields.get("weights"), epoch=fields.get("epoch"), fields=fields)
    kind = fields.get("kind") if fields.get("kind") in ("training", "plain") else "plain"
    weights = Weights(tensors, kind, fields.get("weights"), fields.get("arch"), fields.get("epoch"))
    if ema and weights.entry not in EMA_ENTRIES:
        source = fields.get("source")
        has = f"it holds the {weights.entry} of {source}; convert that file again with --ema" \
            if weights.entry and source else f"it is a plain state dict ({len(tensors)} tensors)"
        raise UserError(f"{ema_key}: {path} has no EMA weights (no {' or '.join(EMA_ENTRIES)}); {has}")
    return weights


def _json_fields(metadata: dict[str, str]) -> dict[str, Any]:
    """.safetensors metadata written by vistrain (JSON strings) as values; others left out."""
    out = {}
    for k, v in metadata.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            continue
    return out


def _preview(names: list[Any], limit: int = 12) -> str:
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f" ... ({len(names)} keys)" if len(names) > limit else "")


def _refusal(path: Path, key: str, found: str, fix: str) -> str:
    """One line: the object the safe unpickler refused (from its error), why reading it is unsafe, what to do."""
    match = re.search(r"GLOBAL (\S+)", found)
    what = f"a pickled {match.group(1)}" if match else f"Python objects ({found})"
    why = " (timm's train.py saves its arguments as one)" if match and match.group(1) == "argparse.Namespace" else ""
    return (f"{key}: {path}: refused: the file holds {what}{why}, not only tensors and plain values, so reading it "
            f"would need the full unpickler, which can run code from the file; {fix}")


def convert_command(path: Path, ema: bool = False) -> str:
    """The command that extracts the weights of ``path``: the .safetensors file beside it."""
    ema_flag = " --ema" if ema else ""
    return f"vistrain convert-checkpoint {shlex.quote(str(path))} {shlex.quote(str(safetensors_name(path)))} " \
           f"--trust{ema_flag}"


def safetensors_name(path: Path) -> Path:
    """``model_best.pth.tar`` -> ``model_best.safetensors`` in the same folder."""
    name = path.name
    while Path(name).suffix in CHECKPOINT_SUFFIXES and Path(name).stem:
        name = Path(name).stem
    return path.with_name(f"{name}.safetensors")


def convert_checkpoint(src: Path, dst: Path, *, trust: bool = False, ema: bool = False, force: bool = False) -> Path:
    """Write the weights of ``src`` (a timm train.py, vistrain or plain checkpoint; ``ema``: its EMA weights) to
    ``dst`` as .safetensors, with the source file, its kind, entry, arch and epoch (and a vistrain checkpoint's plain
    fields) as metadata. The safe unpickler reads ``src``; a file it refuses is read by the full one only with
    ``trust``. An existing ``dst`` is kept unless ``force``: the suggested name beside a run's checkpoint is the
    run's own weights file."""
    if dst.suffix != ".safetensors":
        raise UserError(f"OUT: {dst}: the weights are written as .safetensors; name a file ending in .safetensors "
                        f"(e.g. {safetensors_name(dst)})")
    if not src.is_file():
        raise UserError(f"IN: {src}: not found; give a checkpoint file (.pth, .pth.tar, .bin, .safetensors)")
    if dst.exists() and not force:
        raise UserError(f"OUT: {dst} exists and is kept; name another file, or add --force to replace it")
    try:
        weights = read_weights(src, "IN", ema, "--ema", TRUST_FIX)
    except UnsafePickle:
        if not trust:
            raise
        weights = pick_weights(_full_unpickle(src), src, "IN", ema, "--ema")
    meta = {"source": str(src.absolute()), "kind": weights.kind, "weights": weights.entry, "arch": weights.arch,
            "epoch": weights.epoch}
    if weights.kind == "vistrain":
        meta |= {k: v for k, v in (weights.fields or {}).items() if k in SAFETENSORS_META}
    write_safetensors(weights.tensors, dst, {k: json.dumps(v, default=str) for k, v in meta.items() if v is not None})
    log.info("[CONVERT] %s -> %s: %d tensors of %s", src, dst, len(weights.tensors), weights.origin())
    return dst


def _full_unpickle(src: Path) -> Any:
    """``torch.load(weights_only=False)``: any code in the file runs; said in a warning line."""
    try:
        obj = torch.load(src, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - the file's own objects raise anything (a class of a missing module ...)
        first = str(err).splitlines()[0] if str(err) else ""
        raise UserError(f"IN: cannot read {src} with the full unpickler: {type(err).__name__}: {first}") from err
    log.warning("[WARN] %s was fully unpickled (--trust): any code it holds has run", src)
    return obj
