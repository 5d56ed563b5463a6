"""Query-to-gallery distances a block of query rows at a time, with numpy (CPU) or torch (any device).

The matrix product is issued in tiles of ``GEMM_TILE_ROWS`` rows aligned to absolute query indices, so a distance does
not depend on the chunk it was computed in: a chunked evaluation is bit-identical to an unchunked one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from vistrain.metrics._common import ArrayLike
from vistrain.metrics.retrieval._common import GEMM_TILE_ROWS, Metric, _chunk_rows, _features, _l2_normalise


def _prepare_features(q: np.ndarray, g: np.ndarray, metric: Metric
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(q, g, q_sq, g_sq): normalised rows for cosine; squared norms [Q] / [G] for squared euclidean."""
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query and gallery features differ in dimension: {q.shape[1]} vs {g.shape[1]}")
    if metric == "cosine":
        return _l2_normalise(q), _l2_normalise(g), None, None
    if metric == "euclidean":
        return q, g, np.einsum("nd,nd->n", q, q, dtype=np.float32), np.einsum("nd,nd->n", g, g, dtype=np.float32)
    raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")


def _fill_distances(out: np.ndarray, q: np.ndarray, g: np.ndarray, start: int, q_sq: np.ndarray | None,
                    g_sq: np.ndarray | None) -> None:
    """Distances of queries ``start : start + len(out)`` to the whole gallery into ``out`` [B, G] float32.

    ``start`` must be a multiple of ``GEMM_TILE_ROWS``: the product is issued in tiles aligned to absolute query
    indices, so each row's values are the same whatever chunk it belongs to.
    """
    gt = g.T
    for lo in range(0, len(out), GEMM_TILE_ROWS):
        hi = min(lo + GEMM_TILE_ROWS, len(out))
        np.matmul(q[start + lo: start + hi], gt, out=out[lo:hi])
    if q_sq is None:  # cosine distance 1 - cos; elementwise, so exactly reproducible
        np.subtract(np.float32(1.0), out, out=out)
    else:  # squared euclidean |q|^2 + |g|^2 - 2 q.g, clipped at 0 (rounding can make it slightly negative)
        out *= np.float32(-2.0)
        out += g_sq[None, :]
        out += q_sq[start: start + len(out), None]
        np.maximum(out, np.float32(0.0), out=out)


def distance_matrix_chunks(q_feats: ArrayLike, g_feats: ArrayLike, metric: Metric = "euclidean",
                           memory_budget_mb: float = 512) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield ``(rows, dist)``: the query-to-gallery distances, a block of query rows at a time.

    q_feats [Q, D], g_feats [G, D] (cast to float32). ``dist`` is float32 [len(rows), G]: cosine distance
    ``1 - cos`` of L2-normalised features for ``metric="cosine"``, squared euclidean distance (clipped at 0) for
    ``"euclidean"`` (on L2-normalised features it ranks like cosine). Each block holds at most
    ``memory_budget_mb`` (but at least ``GEMM_TILE_ROWS`` rows); a fresh array is yielded each time. The values do not
    depend on the budget: concatenating the blocks gives the same matrix for any budget.
    """
    q, g, q_sq, g_sq = _prepare_features(_features(q_feats, "q_feats"), _features(g_feats, "g_feats"), metric)
    rows = _chunk_rows(len(q), memory_budget_mb, 4 * len(g), tile=GEMM_TILE_ROWS)
    for start in range(0, len(q), rows):
        out = np.empty((min(rows, len(q) - start), len(g)), dtype=np.float32)
        _fill_distances(out, q, g, start, q_sq, g_sq)
        yield slice(start, start + len(out)), out


def _distance_matrix(q_feats: ArrayLike, g_feats: ArrayLike, metric: Metric) -> np.ndarray:
    """The full float32 [Q, G] matrix (used by re-ranking, which needs it whole)."""
    return np.concatenate([d for _, d in distance_matrix_chunks(q_feats, g_feats, metric, memory_budget_mb=1 << 20)])


@contextmanager
def _ieee_fp32_matmul(dev: torch.device) -> Iterator[None]:
    """Full float32 matrix products on a CUDA device while the block runs.

    ``configure_backends`` enables TF32 for training; TF32 keeps 10 mantissa bits, so distances would be off by about
    1e-3 relative and the "exact" ranking would change. The previous setting is restored afterwards.
    """
    if dev.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _prepare_features_torch(q: torch.Tensor, g: torch.Tensor, metric: Metric
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``_prepare_features`` on tensors: normalised rows for cosine; squared norms [Q] / [G] for squared euclidean."""
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query and gallery features differ in dimension: {q.shape[1]} vs {g.shape[1]}")
    if metric == "cosine":  # x / max(|x|, 1e-12), as _l2_normalise: an all-zero row stays zero
        return torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1), None, None
    if metric == "euclidean":
        return q, g, (q * q).sum(dim=1), (g * g).sum(dim=1)
    raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")


def _fill_distances_torch(out: torch.Tensor, q: torch.Tensor, g: torch.Tensor, start: int,
                          q_sq: torch.Tensor | None, g_sq: torch.Tensor | None) -> None:
    """``_fill_distances`` on a device: queries ``start : start + len(out)`` against the gallery into ``out`` [B, G].

    The same tiling by ``GEMM_TILE_ROWS`` aligned to absolute query indices (``start`` is a multiple of it): every
    distance comes from a product of the same shape whatever the chunk size, so chunking changes no value.
    """
    gt = g.T  # a view: the product reads the gallery transposed, nothing is copied
    for lo in range(0, len(out), GEMM_TILE_ROWS):
        hi = min(lo + GEMM_TILE_ROWS, len(out))
        torch.mm(q[start + lo: start + hi], gt, out=out[lo:hi])
    if q_sq is None:  # 1 - cos: -x + 1 rounds exactly as 1 - x
        out.neg_().add_(1.0)
    else:  # |q|^2 + |g|^2 - 2 q.g in the numpy path's order, clipped at 0 (rounding can make it slightly negative)
        out.mul_(-2.0).add_(g_sq[None, :]).add_(q_sq[start: start + len(out), None]).clamp_(min=0.0)
