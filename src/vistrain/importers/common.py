"""What every importer shares: the timm model's own defaults (what the source resolved when it left a key unset),
and the report of the source keys the mapping did not use."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from vistrain.importers.draft import Draft
from vistrain.importers.source import Source, is_unset

UNKNOWN_KEY = "no vistrain equivalent (a key this importer does not know; docs/migrating.md lists the known ones)"


@lru_cache(maxsize=8)
def model_defaults(name: str) -> dict[str, Any] | None:
    """timm's pretrained_cfg of ``name`` (input_size, interpolation, mean, std): what timm resolves for a model when
    the preprocessing keys are unset. None for a name timm does not know."""
    import timm
    from timm.models import get_pretrained_cfg

    if not isinstance(name, str) or not timm.is_model(name):
        return None
    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    return cfg.to_dict() if cfg is not None else None


def report_rest(src: Source, draft: Draft, reasons: dict[str, str]) -> None:
    """Every key the mapping left: one note with its reason (``reasons``, or that it is unknown), or, when the file
    gives it no value, a name on the one "nothing to carry" line."""
    for key, value in src.left().items():
        if is_unset(value):
            src.unset.append(key)
        else:
            draft.note(key, value, reasons.get(key, UNKNOWN_KEY))
    draft.unset = list(src.unset)
    draft.not_read = dict(src.not_read)


def same_floats(a: Any, b: Any, tol: float = 1e-6) -> bool:
    """Two lists of numbers equal to ``tol`` (a mean written with 3 decimals is ImageNet's mean)."""
    try:
        return len(a) == len(b) and all(abs(float(x) - float(y)) <= tol for x, y in zip(a, b))
    except (TypeError, ValueError):
        return False
