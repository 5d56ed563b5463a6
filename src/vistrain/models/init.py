"""Starting weights from a file: ``model.init_from`` (a vistrain run or checkpoint: fine-tuning from one's own
run, the strong baseline's PRETRAIN_CHOICE 'self') and ``model.pretrained_path`` (a vistrain checkpoint, a
checkpoint of timm's train.py, or a plain timm / torchvision state_dict in a .pth / .bin / .safetensors file; read
by ``models.weights.read_weights``, ``model.use_ema_weights`` choosing a training checkpoint's EMA weights).

Every tensor whose name and shape match is copied; the rest are listed in the log. The head of a vistrain checkpoint
trained on other classes (other names, or another order) is not copied even when its shape matches: its rows would
score classes they were never trained on. A source trained with other preprocessing is warned about, since its
weights expect other pixels. A file that matches under
half of the backbone's tensors is another architecture or layout, and starting from random weights anyway
would waste the run: it is a UserError naming the file. Names are aligned on the backbone, so a classifier's
timm names (``conv1.weight``) and the ``backbone.`` prefix of embedding and GeM models map onto each other:
an embedding run can start a classifier and the other way round.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vistrain.data.preprocess import Preprocessor
from vistrain.errors import UserError
from vistrain.models.weights import read_weights

log = logging.getLogger(__name__)

MIN_BACKBONE_MATCH = 0.5  # below this share of the backbone's tensors a file is refused
BACKBONE = "backbone."  # where EmbeddingModel and PooledClassifier keep their timm backbone


@dataclass
class LoadReport:
    loaded: int  # tensors copied into the model
    total: int  # tensors (parameters and buffers) of the model
    backbone_loaded: int
    backbone_total: int
    skipped: list[str]  # "name (why)": other shape, not in the file, not in the model
    held_back: int = 0  # of them: tensors that matched but were left out on purpose (a head of other classes)

    def summary(self, limit: int = 10) -> str:
        shown = ", ".join(self.skipped[:limit]) or "none"
        more = f" ... ({len(self.skipped) - limit} more)" if len(self.skipped) > limit else ""
        return f"loaded {self.loaded}/{self.total} tensors; skipped: {shown}{more}"


def init_weights(model: nn.Module, m: Any, fold: int, classes: Sequence[Any] | None = None,
                 preprocessor: Preprocessor | None = None) -> str:
    """Load ``m.init_from`` or ``m.pretrained_path`` (the ``model`` config section) into ``model``, built
    without them; returns what the ``[MODEL]`` line says about the starting weights. ``classes`` (this run's, in
    output order) and ``preprocessor`` (this run's) are compared with a vistrain checkpoint's: other classes leave
    its head out, other preprocessing is a warning; None skips the comparison."""
    if m.init_from is not None:
        key, path = "model.init_from", m.init_from
    elif m.pretrained_path is not None:
        key, path = "model.pretrained_path", m.pretrained_path
    elif m.pretrained:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return f"timm pretrained ({cfg.get('hf_hub_id') or cfg.get('url') or 'downloaded'})"
    else:
        return "random init"
    source = resolve_source(path, fold, key)
    weights = read_weights(source, key, ema=m.use_ema_weights)
    meta = weights.fields
    theirs = _other_classes(meta, classes)
    skip = dict.fromkeys(_head_names(model), "other classes") if theirs is not None else {}
    report = load_matching(model, weights.tensors, source, key, skip)
    held = report.held_back > 0  # a head of the same shape as ours, trained on other classes
    note = f"; the source's classes {_preview(theirs)} are not this run's {_preview(classes)}" if held else ""
    log.info("[MODEL] %s=%s %s%s", key.removeprefix("model."), source, report.summary(), note)
    _warn_other_preprocessing(meta, preprocessor, source, key)
    counts = f"{report.loaded}/{report.total} tensors" + ("; head not loaded: other classes" if held else "")
    if weights.kind == "training":  # timm train.py's (or another script's): its arch, epoch and the entry taken
        return f"{key.removeprefix('model.')} {source} ({weights.origin()}; {counts})"
    if key == "model.init_from":
        return f"init_from {source} ({counts})"
    return f"pretrained_path {source} (a vistrain checkpoint; {counts})" if weights.kind == "vistrain" else \
        f"timm pretrained (file {source}; {counts})"


def require_source(path: Path | None, key: str) -> None:
    """Stop before anything is written when ``path`` is neither a file nor a run directory with a best checkpoint."""
    if path is not None and not path.is_file() and not any((path / "ckpt").glob("best_fold*.pth")):
        what = "a directory without ckpt/best_fold*.pth" if path.is_dir() else "not found"
        raise UserError(f"{key}: {path}: {what}; give a vistrain run directory, a checkpoint file "
                        "(RUN/ckpt/best_fold0.pth) or a weights file (.pth, .safetensors)")


def resolve_source(path: Path, fold: int, key: str) -> Path:
    """A file as is; a run directory: its ``ckpt/best_fold{fold}.pth``, else its ``ckpt/best_fold0.pth``."""
    require_source(path, key)
    if path.is_file():
        return path
    own = path / "ckpt" / f"best_fold{fold}.pth"
    if own.is_file():
        return own
    first = path / "ckpt" / "best_fold0.pth"
    if not first.is_file():
        raise UserError(f"{key}: {path} has neither ckpt/best_fold{fold}.pth nor ckpt/best_fold0.pth; "
                        "name a checkpoint file instead")
    log.warning("[MODEL] %s: %s has no best_fold%d.pth; fold %d starts from best_fold0.pth (if both runs share "
                "the data, that model has seen this fold's validation images)", key, path, fold, fold)
    return first


def _other_classes(meta: dict[str, Any] | None, classes: Sequence[Any] | None) -> list[str] | None:
    """The source checkpoint's classes when they are not ``classes`` (as text, in order); None when they are the
    same or either is unknown (a plain state_dict, or no classes given)."""
    theirs = (meta or {}).get("classes")
    if classes is None or not isinstance(theirs, list):
        return None
    theirs = [str(c) for c in theirs]
    return theirs if theirs != [str(c) for c in classes] else None


def _preview(classes: Sequence[Any] | None, limit: int = 6) -> str:
    names = [str(c) for c in classes or []]
    return ", ".join(names) if len(names) <= limit else f"{', '.join(names[:limit])}, ... ({len(names)} classes)"


def _warn_other_preprocessing(meta: dict[str, Any] | None, ours: Preprocessor | None, source: Path, key: str) -> None:
    """A warning listing each preprocessing setting in which the source checkpoint differs from this run."""
    spec = (meta or {}).get("preprocess")
    if ours is None or spec is None:
        return
    try:
        theirs = Preprocessor.from_dict(spec)
    except ValueError:  # a checkpoint from before preprocess was recorded, or an edited one: nothing to compare
        return

    def clahe(p: Preprocessor) -> str:
        return f"{p.clip_limit}/{p.grid}" if p.clahe else "off"

    settings = {
        "input": lambda p: f"{p.size[0]}x{p.size[1]}", "crop": lambda p: p.crop,
        "resize": lambda p: p.interpolation, "shrink": lambda p: p.shrink, "clahe": clahe,
        "mean": lambda p: str([round(x, 3) for x in p.mean]), "std": lambda p: str([round(x, 3) for x in p.std]),
    }
    diffs = [f"{name} {show(theirs)} (this config: {show(ours)})" for name, show in settings.items()
             if show(theirs) != show(ours)]
    if diffs:
        log.warning("[WARN] %s: %s was trained with other preprocessing: %s; its weights start from the pixels it "
                    "saw, this run trains on this config's", key, source, ", ".join(diffs))


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: Path, key: str,
                  skip: dict[str, str] | None = None) -> LoadReport:
    """Copy the tensors of ``state`` whose name and shape match ``model``'s, except those of ``skip`` (model
    tensor name -> why); refuse a file matching under ``MIN_BACKBONE_MATCH`` of the backbone's tensors (parameters
    and buffers, the head left out)."""
    target = model.state_dict()
    state = _align(state, target, BACKBONE if _has_backbone(model) else "")
    skip = skip or {}
    matched: dict[str, torch.Tensor] = {}
    refused, other_shape, not_in_file = [], [], []
    for name, tensor in target.items():
        if name not in state:
            not_in_file.append(f"{name} (not in file)")
        elif state[name].shape != tensor.shape:
            other_shape.append(f"{name} (shape {list(state[name].shape)} vs {list(tensor.shape)})")
        elif name in skip:
            refused.append(f"{name} ({skip[name]})")
        else:
            matched[name] = state[name]
    not_in_model = [f"{name} (not in model)" for name in state if name not in target]
    backbone = _backbone_names(model, target)
    report = LoadReport(len(matched), len(target), sum(n in matched for n in backbone), len(backbone),
                        refused + other_shape + not_in_file + not_in_model, len(refused))
    if report.backbone_loaded < MIN_BACKBONE_MATCH * report.backbone_total:
        raise UserError(f"{key}: {source} matches {report.backbone_loaded} of {report.backbone_total} backbone "
                        f"tensors by name and shape (at least half must): a checkpoint of another architecture "
                        f"or layout? first skipped: {', '.join(report.skipped[:3])}")
    model.load_state_dict(matched, strict=False)
    return report


def _has_backbone(model: nn.Module) -> bool:
    return isinstance(getattr(model, "backbone", None), nn.Module)


def _align(state: dict[str, torch.Tensor], target: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    """The file's names as they are, or with the backbone prefix added (a plain timm file into an embedding
    model) or removed (an embedding run into a timm classifier): whichever matches more of the model's names."""
    if prefix:
        other = {prefix + k: v for k, v in state.items()}
    else:
        other = {k.removeprefix(BACKBONE): v for k, v in state.items()}
    return max((state, other), key=lambda s: len(target.keys() & s.keys()))


def _backbone_names(model: nn.Module, target: dict[str, Any]) -> list[str]:
    """The model's tensors that are not its head: under ``backbone.``, or outside a timm classifier's
    ``get_classifier()`` module (its name differs per model: fc, head, classifier, head.fc ...)."""
    if _has_backbone(model):
        return [n for n in target if n.startswith(BACKBONE)]
    prefixes = _classifier_prefixes(model)
    return [n for n in target if not n.startswith(prefixes)] if prefixes else list(target)


def _head_names(model: nn.Module) -> list[str]:
    """The tensors that hold one row per class: the ``head.`` of EmbeddingModel and PooledClassifier (not their
    projection, neck or pooling), or a timm classifier's ``get_classifier()`` module."""
    prefixes = ("head.",) if _has_backbone(model) else _classifier_prefixes(model)
    return [n for n in model.state_dict() if prefixes and n.startswith(prefixes)]


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    heads = model.get_classifier() if hasattr(model, "get_classifier") else ()
    heads = heads if isinstance(heads, tuple) else (heads,)
    return tuple(f"{name}." for name, module in model.named_modules() if any(module is h for h in heads))
