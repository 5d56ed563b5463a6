"""Array helpers every metric module shares: conversion to numpy (any tensor, any device) and the argument checks
(shapes, whole-number class indices or ids, finite scores), so the public metrics reject bad input alike."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | Sequence


def _np(x: ArrayLike) -> np.ndarray:
    """A numpy view / copy of ``x`` on the CPU. float16 / bfloat16 tensors become float32 (numpy has no bfloat16);
    float32 / float64 keep their precision, so near-ties in float64 logits are not merged by rounding."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def _positive_int(value: object, name: str) -> int:
    """``value`` as an int >= 1. Python and numpy integers only: a bool, a float (even 2.0) or a string is refused,
    since ``True`` or ``1.5`` as a count of neighbours or classes is a mistake, not a value to round."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _int_vector(x: ArrayLike, n: int, name: str, what: str = "integers") -> np.ndarray:
    """int64 [n]; a float array is accepted only when it holds whole numbers (``what``: the error's noun)."""
    a = _np(x)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {a.shape}")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a) & (a == np.round(a))):
            raise ValueError(f"{name} must be whole numbers{'' if what == 'integers' else f' ({what})'}")
    elif a.dtype.kind not in "iub":
        raise ValueError(f"{name} must be {'integers' if what == 'integers' else f'integer {what}'}, "
                         f"got dtype {a.dtype}")
    return a.astype(np.int64)


def _as_targets(targets: ArrayLike, n: int, n_classes: int, name: str = "targets") -> np.ndarray:
    """Class indices as int64 [n] in ``0..n_classes-1``."""
    y = _int_vector(targets, n, name, "class indices")
    if n and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{name} must lie in [0, {n_classes - 1}] (n_classes={n_classes}), "
                         f"got range [{y.min()}, {y.max()}]")
    return y


def _as_logits_targets(logits: ArrayLike, targets: ArrayLike, name: str = "logits") -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 scores [N, C] (N, C >= 1, all finite) and int64 targets [N] in ``0..C-1``."""
    z = np.asarray(_np(logits), dtype=np.float64)  # float32 -> float64 is exact, so rankings are unchanged
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"{name} must have shape [N, C] with N, C >= 1, got {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError(f"{name} contain NaN or inf")
    return z, _as_targets(targets, n=z.shape[0], n_classes=z.shape[1])
