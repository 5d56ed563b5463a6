"""Shared helpers of the retrieval metrics: argument checks and conversions, chunk sizing, the distance metric."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from vistrain.metrics._common import ArrayLike, _int_vector, _np

Metric = Literal["cosine", "euclidean"]

# Query rows per matrix-product call in the feature path. BLAS results depend (by an ulp) on the shape of the call,
# so the tiling is fixed and aligned to absolute query indices: every distance is computed by the same call whatever
# the memory budget, which makes a chunked evaluation bit-identical to an unchunked one. 256 rows keep the product
# efficient (the gallery is re-packed by every call). It is also the floor of a chunk in that path.
GEMM_TILE_ROWS: int = 256

NO_VALID_QUERY = "no query has a valid match in the gallery (same-camera matches are excluded)"

_MB = 1 << 20


def _features(x: ArrayLike, name: str) -> np.ndarray:
    """Float32, C-contiguous [N, D] features, all finite. Float64 input is rounded to float32."""
    a = np.ascontiguousarray(_np(x), dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape [N, D], got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contain NaN or inf")
    return a


def _ids(x: ArrayLike, n: int, name: str) -> np.ndarray:
    """Integer ids as int64 [n]; a float array is accepted only when it holds whole numbers."""
    return _int_vector(x, n, name)


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32 [N, D]); an all-zero row stays zero (similarity 0 to everything)."""
    norms = np.sqrt(np.einsum("nd,nd->n", x, x, dtype=np.float32))
    return x / np.maximum(norms, np.float32(1e-12))[:, None]


def _threads() -> int:
    """The process's compute threads (``train.num_threads`` in a vistrain command; every core by default), at most 8."""
    return max(1, min(8, torch.get_num_threads()))


def _chunk_rows(n_rows: int, budget_mb: float, bytes_per_row: int, tile: int = 1) -> int:
    """Rows per chunk so that ``rows * bytes_per_row`` fits the budget; a multiple of ``tile``, at least one tile."""
    rows = int(budget_mb * _MB) // max(1, bytes_per_row)
    rows = max(tile, rows // tile * tile)
    return max(1, min(rows, n_rows))


def _as_tensor(x: ArrayLike, name: str, device: torch.device) -> torch.Tensor:
    """Float32 [N, D] on ``device``, all finite; a tensor already there is not copied through the CPU."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, dtype=np.float32))
    t = t.to(device=device, dtype=torch.float32)
    if t.ndim != 2:
        raise ValueError(f"{name} must have shape [N, D], got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contain NaN or inf")
    return t


def _np_shape(x: ArrayLike) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _length(x: ArrayLike) -> int:
    """Rows of an array, tensor or sequence without copying it to the CPU."""
    return int(x.shape[0]) if hasattr(x, "shape") else len(x)


def _labels(x: ArrayLike | Sequence, n: int, name: str) -> np.ndarray:
    a = _np(x) if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {a.shape}")
    return a
