"""Person re-identification metrics under the Market-1501 protocol (public: ``reid_cmc_map``,
``reid_cmc_map_detailed``, ``reid_evaluate``); the protocol is described in the package docstring."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from vistrain.metrics._common import ArrayLike, _np
from vistrain.metrics.retrieval._common import GEMM_TILE_ROWS, Metric, _as_tensor, _chunk_rows, _features, _threads
from vistrain.metrics.retrieval.distances import _fill_distances, _prepare_features
from vistrain.metrics.retrieval.ranking import (
    NO_VALID_QUERY,
    ReidResult,
    _check_reid_ids,
    _GalleryGroups,
    _junk_columns,
    _rank_chunk,
    _summarise,
    _warn_short_gallery,
)
from vistrain.metrics.retrieval.ranking_torch import _eval_device, _reid_torch
from vistrain.metrics.retrieval.rerank import rerank_features


def reid_cmc_map_detailed(distmat: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike,
                          g_camids: ArrayLike, max_rank: int = 50, *, memory_budget_mb: float = 256
                          ) -> ReidResult:
    """Market-1501 CMC, mAP and mINP from a distance matrix, with per-query values and the skipped-query count.

    distmat [Q, G] (smaller = closer; any real dtype, NaN rejected), q_pids / q_camids [Q], g_pids / g_camids [G]
    (integers). The protocol is in the module docstring. ``distmat`` is read a block of rows at a time; each block
    costs about ``2 * G * itemsize`` bytes per row (a converted copy where needed, and a sorted copy), kept within
    ``memory_budget_mb``. Raises ``ValueError`` when no query has a valid match.
    """
    dist = _np(distmat)
    if dist.ndim != 2:
        raise ValueError(f"distmat must have shape [Q, G], got {dist.shape}")
    if dist.dtype.kind not in "fiu":
        raise ValueError(f"distmat must hold real numbers, got dtype {dist.dtype}")
    # float16 / integers become a type numpy and torch both sort; converted a block at a time, never all at once
    work_dtype = dist.dtype if dist.dtype.kind == "f" and dist.dtype.itemsize >= 4 else (
        np.dtype(np.float32) if dist.dtype.kind == "f" else np.dtype(np.float64))
    qp, gp, qc, gc = _check_reid_ids(dist.shape[0], dist.shape[1], q_pids, g_pids, q_camids, g_camids, max_rank)
    keep = _junk_columns(gp)
    if keep is not None:
        gp, gc = gp[keep], gc[keep]
    _warn_short_gallery(len(gp), max_rank)
    groups = _GalleryGroups(gp)
    n_q, n_gal = dist.shape[0], len(gp)
    width = groups.max_count(qp)
    rows = _chunk_rows(n_q, memory_budget_mb, 2 * n_gal * work_dtype.itemsize + 64 * width)
    ap, inp, first = np.empty(n_q), np.empty(n_q), np.empty(n_q, np.int64)
    threads = _threads()
    with ThreadPoolExecutor(threads) as pool:
        for lo in range(0, n_q, rows):
            block = np.asarray(dist[lo: lo + rows], dtype=work_dtype)
            if keep is not None:
                block = block[:, keep]
            if np.isnan(block).any():
                raise ValueError("distmat contains NaN")
            sl = slice(lo, lo + len(block))
            ap[sl], inp[sl], first[sl] = _rank_chunk(block, qp[sl], qc[sl], groups, gc, pool, threads)
    return _summarise(ap, inp, first, max_rank)


def reid_cmc_map(distmat: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike,
                 g_camids: ArrayLike, max_rank: int = 50) -> tuple[np.ndarray, float, float]:
    """``(cmc, mAP, mINP)`` under the Market-1501 protocol; see ``reid_cmc_map_detailed`` and the module docstring.

    distmat [Q, G]; q_pids, q_camids [Q]; g_pids, g_camids [G]. ``cmc`` is float64 [max_rank] of fractions in
    [0, 1]; mAP and mINP are fractions over the valid queries (queries whose only matches share their camera are
    skipped; ``reid_cmc_map_detailed`` reports how many).
    """
    res = reid_cmc_map_detailed(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    return res.cmc, res.mAP, res.mINP


def reid_evaluate(q_feats: ArrayLike, g_feats: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike,
                  q_camids: ArrayLike, g_camids: ArrayLike, max_rank: int = 50, memory_budget_mb: float = 512,
                  rerank: bool = False, *, metric: Metric = "euclidean", k1: int = 20, k2: int = 6,
                  lambda_value: float = 0.3, device: str | torch.device | None = None, per_query: bool = False
                  ) -> dict[str, Any]:
    """Market-1501 metrics straight from features, computing distances a block of query rows at a time.

    q_feats [Q, D], g_feats [G, D] (cast to float32); q_pids, q_camids [Q]; g_pids, g_camids [G]. Distances are
    those of ``distance_matrix_chunks`` (``metric="euclidean"``: squared euclidean, the strong-baseline choice; on
    L2-normalised features it ranks like cosine; ``"cosine"`` normalises the features first), in float32. Each
    block's distances and their sorted copy (8 bytes per query-gallery pair) are kept within ``memory_budget_mb``,
    with a floor of ``GEMM_TILE_ROWS`` query rows. No float64 [Q, G] matrix is ever formed, and the result is
    exactly the same for every budget (and equals ``reid_cmc_map_detailed`` on the concatenated blocks).

    ``device`` (e.g. ``"cuda"``; ``"cpu"`` runs the same torch code on the CPU) evaluates with torch on that device
    instead of numpy; a CUDA ``q_feats`` tensor selects its device when ``device`` is None. The features are moved
    there as float32, the distances are the same formulas (full float32 products: TF32 is switched off meanwhile),
    each row of a chunk is fully ranked by a stable ``torch.sort`` and AP / CMC / INP are computed there; only [Q]
    per-query results come back to the CPU. A chunk holds about ``TORCH_PAIR_BYTES`` (48) bytes per query-gallery
    pair within ``memory_budget_mb`` (same floor and budget-independence as above). Results equal the numpy path's
    up to the rounding of the products (bit-for-bit on integer-valued features, where every distance is exact).

    ``rerank=True`` applies ``k_reciprocal_rerank`` (k1, k2, lambda_value), which needs the full query-gallery,
    query-query and gallery-gallery matrices: O((Q + G)^2) memory, ignoring the budget. It always runs on the CPU
    (numpy), whatever ``device`` says.

    Returns ``mAP``, ``rank1``, ``rank5``, ``rank10``, ``mINP`` (fractions in [0, 1] over the valid queries; rank-k
    does not depend on ``max_rank``) and ``num_valid_queries``, ``num_skipped``. Raises ``ValueError`` when no query
    has a valid match. ``per_query=True`` adds the [Q] arrays ``ap``, ``inp`` and ``first_match_rank`` (0 for a
    skipped query) behind them, for a bootstrap over queries.
    """
    dev = None if rerank else _eval_device(device, q_feats)  # re-ranking falls back to the numpy implementation
    if dev is None:
        q, g = _features(q_feats, "q_feats"), _features(g_feats, "g_feats")
    else:  # a tensor already on ``dev`` is not copied through the CPU
        q, g = _as_tensor(q_feats, "q_feats", dev), _as_tensor(g_feats, "g_feats", dev)
    qp, gp, qc, gc = _check_reid_ids(len(q), len(g), q_pids, g_pids, q_camids, g_camids, max_rank)
    keep = _junk_columns(gp)
    if keep is not None:
        g, gp, gc = g[keep if dev is None else torch.from_numpy(keep).to(dev)], gp[keep], gc[keep]
        if len(g) == 0:
            raise ValueError(NO_VALID_QUERY)
    if rerank:
        res = reid_cmc_map_detailed(rerank_features(q, g, metric, k1=k1, k2=k2, lambda_value=lambda_value),
                                    qp, gp, qc, gc, max_rank, memory_budget_mb=memory_budget_mb)
    elif dev is not None:
        _warn_short_gallery(len(g), max_rank)
        with torch.no_grad():
            ap, inp, first = _reid_torch(q, g, qp, gp, qc, gc, metric, memory_budget_mb)
        res = _summarise(ap, inp, first, max_rank)
    else:
        _warn_short_gallery(len(g), max_rank)
        q, g, q_sq, g_sq = _prepare_features(q, g, metric)
        groups = _GalleryGroups(gp)
        rows = _chunk_rows(len(q), memory_budget_mb, 8 * len(g) + 64 * groups.max_count(qp), tile=GEMM_TILE_ROWS)
        ap, inp, first = np.empty(len(q)), np.empty(len(q)), np.empty(len(q), np.int64)
        buf = np.empty((rows, len(g)), dtype=np.float32)  # reused by every block
        threads = _threads()
        with ThreadPoolExecutor(threads) as pool:
            for lo in range(0, len(q), rows):
                block = buf[: min(rows, len(q) - lo)]
                _fill_distances(block, q, g, lo, q_sq, g_sq)
                sl = slice(lo, lo + len(block))
                ap[sl], inp[sl], first[sl] = _rank_chunk(block, qp[sl], qc[sl], groups, gc, pool, threads)
        res = _summarise(ap, inp, first, max_rank)
    out: dict[str, Any] = {"mAP": res.mAP, "rank1": res.rank(1), "rank5": res.rank(5), "rank10": res.rank(10),
                           "mINP": res.mINP, "num_valid_queries": res.num_valid_queries, "num_skipped": res.num_skipped}
    if per_query:
        out.update(ap=res.ap, inp=res.inp, first_match_rank=res.first_match_rank)
    return out
