"""Retrieval and person re-identification metrics (a public API).

Re-identification (``reid_cmc_map``, ``reid_evaluate``) follows the Market-1501 protocol:

* For each query, gallery items with the query's person id **and** its camera are removed from its ranking (the
  same person seen by the same camera is too easy a match). Gallery items with person id ``-1`` ("junk") are
  removed from every ranking (the caller should drop them; a warning says when they were found). Person id ``0``
  (distractors) is an ordinary id: never the id of a query, so always a non-match.
* A query left with no true match is skipped and counted (``num_skipped``); when every query is skipped a
  ``ValueError`` says so.
* The ranking sorts the gallery by increasing distance; equal distances are ranked by gallery index (a stable sort),
  so results never depend on the sort algorithm.
* CMC: ``cmc[k]`` is the fraction of valid queries whose first true match is at 1-based position ``<= k + 1`` of the
  filtered ranking; always length ``max_rank``. When the gallery has fewer than ``max_rank`` items a warning is
  issued and the tail repeats the last value (which is 1.0: every valid query has its match within the gallery).
* AP: the mean over a query's true matches of ``precision at that match``; mAP averages over valid queries.
* INP (Ye et al., 2021): ``(number of true matches) / (1-based position of the last true match)``; mINP averages it.

Speed: a ranking is never fully argsorted. Each chunk of distance rows is sorted *by value* (numpy's SIMD sort, a
block of rows per CPU thread), and the position of each of a query's few same-id gallery items is found by binary
search in its sorted row; the rare rows in which such an item ties with another value fall back to a stable argsort
of that row. AP, CMC and INP then come from these few positions, vectorised over the chunk.

On a torch device (``reid_evaluate(..., device="cuda")``, or a CUDA query tensor) the whole ranking is computed
instead: per chunk of queries one matrix product, a stable ``torch.sort`` of each row, a cumulative sum over the
kept items for their positions, and AP / CMC / INP from the match positions, all on the device; only per-query
results come back. Faiss cannot serve exact mAP there: its GPU search caps ``k`` at 2,048.

Retrieval: ``knn_search`` (Faiss on the CPU when installed, a chunked torch matrix product + ``topk`` otherwise or on
a CUDA device), ``recall_at_k`` and ``knn_classify``. ``k_reciprocal_rerank`` implements Zhong et al. (2017).

Array arguments may be numpy arrays, torch tensors (any device) or sequences. Faiss is imported inside the functions
that use it, so this module imports without it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from vistrain.metrics.classification import ArrayLike, _np

Metric = Literal["cosine", "euclidean"]

# Query rows per matrix-product call in the feature path. BLAS results depend (by an ulp) on the shape of the call,
# so the tiling is fixed and aligned to absolute query indices: every distance is computed by the same call whatever
# the memory budget, which makes a chunked evaluation bit-identical to an unchunked one. 256 rows keep the product
# efficient (the gallery is re-packed by every call). It is also the floor of a chunk in that path.
GEMM_TILE_ROWS: int = 256

NO_VALID_QUERY = "no query has a valid match in the gallery (same-camera matches are excluded)"

_MB = 1 << 20


# ------------------------------------------------------------------------------------------------ input helpers

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
    a = _np(x)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {a.shape}")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a) & (a == np.round(a))):
            raise ValueError(f"{name} must be whole numbers")
    elif a.dtype.kind not in "iub":
        raise ValueError(f"{name} must be integers, got dtype {a.dtype}")
    return a.astype(np.int64)


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32 [N, D]); an all-zero row stays zero (similarity 0 to everything)."""
    norms = np.sqrt(np.einsum("nd,nd->n", x, x, dtype=np.float32))
    return x / np.maximum(norms, np.float32(1e-12))[:, None]


def _threads() -> int:
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:  # not on Linux
        return max(1, min(8, os.cpu_count() or 1))


# -------------------------------------------------------------------------------------------------- distances

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


def _chunk_rows(n_rows: int, budget_mb: float, bytes_per_row: int, tile: int = 1) -> int:
    """Rows per chunk so that ``rows * bytes_per_row`` fits the budget; a multiple of ``tile``, at least one tile."""
    rows = int(budget_mb * _MB) // max(1, bytes_per_row)
    rows = max(tile, rows // tile * tile)
    return max(1, min(rows, n_rows))


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


# --------------------------------------------------------------------------------------------- re-id ranking core

@dataclass(frozen=True)
class ReidResult:
    """Market-1501 metrics. Arrays indexed by query have shape [Q]; skipped queries hold NaN / 0."""

    cmc: np.ndarray  # float64 [max_rank], cmc[k]: fraction of valid queries matched within the top k + 1
    mAP: float
    mINP: float
    num_valid_queries: int
    num_skipped: int  # queries with no true match once same-camera matches are removed
    ap: np.ndarray  # float64 [Q], average precision per query (NaN when skipped)
    inp: np.ndarray  # float64 [Q], inverse negative penalty per query (NaN when skipped)
    first_match_rank: np.ndarray  # int64 [Q], 1-based position of the first true match (0 when skipped)

    def rank(self, k: int) -> float:
        """Rank-k accuracy (CMC at k, for any k >= 1 even beyond ``max_rank``): a fraction of the valid queries."""
        valid = self.first_match_rank > 0
        return float(np.mean(self.first_match_rank[valid] <= k))


class _GalleryGroups:
    """The gallery indices of each person id, in increasing index order, looked up for a batch of queries."""

    def __init__(self, g_pids: np.ndarray):
        self.order = np.argsort(g_pids, kind="stable")
        self.pids, self.starts, self.counts = np.unique(g_pids[self.order], return_index=True, return_counts=True)

    def lookup(self, q_pids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start into ``order``, count) per query [B]; count 0 when the gallery lacks the query's id."""
        at = np.clip(np.searchsorted(self.pids, q_pids), 0, max(len(self.pids) - 1, 0))
        if len(self.pids) == 0:
            return np.zeros(len(q_pids), np.int64), np.zeros(len(q_pids), np.int64)
        found = self.pids[at] == q_pids
        return self.starts[at], np.where(found, self.counts[at], 0)

    def max_count(self, q_pids: np.ndarray) -> int:
        _, counts = self.lookup(q_pids)
        return int(counts.max(initial=0))


def _sort_rows(dist: np.ndarray, pool: ThreadPoolExecutor | None, threads: int) -> np.ndarray:
    """A row-wise value-sorted copy of ``dist`` [B, G]: numpy releases the GIL while sorting, so ``threads`` blocks
    of rows sort in parallel."""
    out = np.empty(dist.shape, dist.dtype)  # C order: a fancy-indexed block may not be, searchsorted wants rows

    def work(rows: slice) -> None:
        out[rows] = dist[rows]
        out[rows].sort(axis=1)

    n = min(threads, len(dist))
    if pool is None or n < 2:
        work(slice(None))
        return out
    bounds = np.linspace(0, len(dist), n + 1).astype(int)
    list(pool.map(work, [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]))
    return out


def _rank_chunk(dist: np.ndarray, q_pids: np.ndarray, q_cams: np.ndarray, groups: _GalleryGroups,
                g_cams: np.ndarray, pool: ThreadPoolExecutor | None, threads: int = 1
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AP, INP [B] (NaN when skipped) and first-match rank [B] (0 when skipped) for one chunk of queries.

    dist [B, G] (any real dtype, not modified), q_pids / q_cams [B]. Only the ``M`` gallery items sharing a query's
    id (true matches and same-camera junk) matter: their stable-sort positions ``pos`` are counted by binary search
    in the value-sorted row, and each match's position in the filtered ranking is ``pos`` minus the junk ranked
    before it.
    """
    n_rows, n_gal = dist.shape
    start, count = groups.lookup(q_pids)
    width = int(count.max(initial=0))
    if width == 0:  # no query of this chunk has its id in the gallery
        return np.full(n_rows, np.nan), np.full(n_rows, np.nan), np.zeros(n_rows, np.int64)
    slot = np.arange(width)
    valid = slot[None, :] < count[:, None]  # [B, M]
    cols = groups.order[np.minimum(start[:, None] + slot[None, :], len(groups.order) - 1)]  # gallery index [B, M]
    cols = np.where(valid, cols, 0)
    rows = np.arange(n_rows)[:, None]
    thresholds = np.ascontiguousarray(dist[rows, cols])  # [B, M]

    sorted_rows = _sort_rows(dist, pool, threads)
    sorted_t, thresholds_t = torch.from_numpy(sorted_rows), torch.from_numpy(thresholds)
    n_less = torch.searchsorted(sorted_t, thresholds_t).numpy()  # items strictly closer than the threshold
    n_less_eq = torch.searchsorted(sorted_t, thresholds_t, right=True).numpy()
    pos = n_less.copy()  # 0-based position in the stable ranking, exact when the value is unique in its row
    for b in np.flatnonzero(((n_less_eq - n_less > 1) & valid).any(axis=1)):
        # A tie with another item: only a stable argsort knows which of the equal values comes first.
        inverse = np.empty(n_gal, np.int64)
        inverse[np.argsort(dist[b], kind="stable")] = np.arange(n_gal)
        pos[b] = inverse[cols[b]]

    junk = valid & (g_cams[cols] == q_cams[:, None])
    match = valid & ~junk
    pos = np.where(valid, pos, n_gal + slot[None, :])  # padding sorts last; positions stay distinct
    order = np.argsort(pos, axis=1)
    pos = np.take_along_axis(pos, order, axis=1)
    junk = np.take_along_axis(junk, order, axis=1)
    match = np.take_along_axis(match, order, axis=1)
    junk_before = np.cumsum(junk, axis=1) - junk
    rank = (pos - junk_before + 1).astype(np.float64)  # 1-based position in the filtered ranking
    hits = np.cumsum(match, axis=1)
    n_rel = hits[:, -1]
    ok = n_rel > 0
    # Row sums via cumsum: sequential, so zero padding (whose width differs between chunks) cannot change rounding.
    precision_sum = np.cumsum(np.where(match, hits / rank, 0.0), axis=1)[:, -1]
    ap = np.where(ok, precision_sum / np.maximum(n_rel, 1), np.nan)
    first = np.take_along_axis(rank, np.argmax(match, axis=1)[:, None], axis=1)[:, 0]
    last = np.where(match, rank, 0.0).max(axis=1)
    inp = np.where(ok, n_rel / np.maximum(last, 1.0), np.nan)
    return ap, inp, np.where(ok, first, 0).astype(np.int64)


def _summarise(ap: np.ndarray, inp: np.ndarray, first: np.ndarray, max_rank: int) -> ReidResult:
    valid = first > 0
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ValueError(NO_VALID_QUERY)
    hist = np.bincount(np.minimum(first[valid], max_rank + 1), minlength=max_rank + 2)[1: max_rank + 1]
    cmc = np.cumsum(hist) / n_valid
    return ReidResult(cmc=cmc, mAP=float(np.mean(ap[valid])), mINP=float(np.mean(inp[valid])),
                      num_valid_queries=n_valid, num_skipped=int(len(first) - n_valid), ap=ap, inp=inp,
                      first_match_rank=first)


def _check_reid_ids(n_q: int, n_g: int, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike,
                    g_camids: ArrayLike, max_rank: int) -> tuple[np.ndarray, ...]:
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if n_q == 0 or n_g == 0:
        raise ValueError(f"need at least one query and one gallery item, got {n_q} and {n_g}")
    qp, gp = _ids(q_pids, n_q, "q_pids"), _ids(g_pids, n_g, "g_pids")
    qc, gc = _ids(q_camids, n_q, "q_camids"), _ids(g_camids, n_g, "g_camids")
    return qp, gp, qc, gc


def _junk_columns(g_pids: np.ndarray) -> np.ndarray | None:
    """Indices of the gallery items to keep when some have person id -1 (None when there are none)."""
    junk = g_pids == -1
    if not junk.any():
        return None
    warnings.warn(f"the gallery holds {int(junk.sum())} items with person id -1 (junk); they are left out of every "
                  "ranking (drop them before evaluating to silence this)", stacklevel=3)
    return np.flatnonzero(~junk)


def _warn_short_gallery(n_gal: int, max_rank: int) -> None:
    if n_gal < max_rank:
        warnings.warn(f"the gallery has {n_gal} items, fewer than max_rank={max_rank}; the CMC keeps length "
                      f"{max_rank} and repeats its last value", stacklevel=3)


# ------------------------------------------------------------------------------------ re-id on a torch device

# Bytes per query-gallery pair that one chunk of the torch path may hold. Every [B, G] temporary is counted as if all
# were alive at once (several are freed before the next is made, so this is an upper bound of the peak):
#   distances float32 (4) + sort values float32 (4) + sort indices int64 (8) + the sort's own workspace (20: on CUDA
#   a stable row sort allocates int64 initial indices plus cub's alternate key / index buffers) + same-id /
#   same-camera / removed masks (3 x 1) + the per-pair code in gallery order and in ranked order (2 x 1 int8) +
#   keep / match / not-match masks (3 x 1) + the int32 cumulative sum of positions (4).
TORCH_PAIR_BYTES: int = 4 + 4 + 8 + 20 + 3 + 2 + 3 + 4


def _eval_device(device: str | torch.device | None, q_feats: ArrayLike) -> torch.device | None:
    """The torch device of ``reid_evaluate``: ``device`` when given, a CUDA query tensor's device, else None (numpy)."""
    if device is not None:
        return torch.device(device)
    if isinstance(q_feats, torch.Tensor) and q_feats.device.type == "cuda":
        return q_feats.device
    return None


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


def _rank_chunk_torch(dist: torch.Tensor, q_pids: torch.Tensor, q_cams: torch.Tensor, g_pids: torch.Tensor,
                      g_cams: torch.Tensor, width: int) -> torch.Tensor:
    """AP, INP and first-match rank of one chunk of queries from the full stable ranking, on ``dist``'s device.

    dist [B, G] float32 (not modified), q_pids / q_cams [B], g_pids / g_cams [G] (int64, junk already dropped),
    ``width``: an upper bound of any query's number of true matches (its id's gallery count). Returns float64 [3, B]:
    AP and INP (NaN when skipped) and the 1-based first-match rank (0 when skipped), as ``_rank_chunk``.
    """
    n_rows, n_gal = dist.shape
    if width == 0:  # no query of this chunk has its id in the gallery
        nan = torch.full((n_rows,), float("nan"), dtype=torch.float64, device=dist.device)
        return torch.stack([nan, nan, torch.zeros_like(nan)])
    # Stable: equal distances stay in gallery order, the protocol's tie rule. Only the permutation is needed.
    order = torch.sort(dist, dim=1, stable=True).indices  # int64 [B, G]
    # One int8 code per pair, computed in gallery order and gathered once (1 byte per pair instead of gathering the
    # pids and cameras): 0 another id, 1 a true match, 2 same id and camera (removed from the ranking).
    same_id = g_pids[None, :] == q_pids[:, None]
    code = same_id.to(torch.int8)
    code += same_id & (g_cams[None, :] == q_cams[:, None])
    del same_id
    code = code.gather(1, order)
    del order
    keep = code != 2
    match = code == 1
    del code
    pos = keep.cumsum(dim=1, dtype=torch.int32)  # 1-based position in the filtered ranking (where keep)
    del keep
    pos.masked_fill_(~match, n_gal + 1)  # only the matches' positions stay; the rest sort last
    del match
    # The (at most ``width``) match positions of each row in increasing order; padding is n_gal + 1.
    top = pos.topk(width, dim=1, largest=False, sorted=True).values.to(torch.float64)  # [B, W]
    del pos
    valid = top <= n_gal
    n_rel = valid.sum(dim=1)
    hits = torch.arange(1, width + 1, dtype=torch.float64, device=dist.device)  # the j-th match has j hits
    ok = n_rel > 0
    # Row sums via cumsum, as the numpy path: sequential, so the result does not depend on the number of rows.
    precision_sum = torch.where(valid, hits[None, :] / top, 0.0).cumsum(dim=1)[:, -1]
    ap = torch.where(ok, precision_sum / n_rel.clamp(min=1), float("nan"))
    last = torch.where(valid, top, 0.0).amax(dim=1)
    inp = torch.where(ok, n_rel / last.clamp(min=1.0), float("nan"))
    first = torch.where(ok, top[:, 0], 0.0)
    return torch.stack([ap, inp, first])


def _reid_torch(q: torch.Tensor, g: torch.Tensor, qp: np.ndarray, gp: np.ndarray, qc: np.ndarray, gc: np.ndarray,
                metric: Metric, memory_budget_mb: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-query AP, INP [Q] (float64) and first-match rank [Q] (int64) on the features' device.

    q [Q, D], g [G, D] float32 on one device (junk already dropped); ids as int64 numpy arrays [Q] / [G]. Queries go
    in chunks of ``TORCH_PAIR_BYTES`` per pair within ``memory_budget_mb`` (at least ``GEMM_TILE_ROWS`` rows). Nothing
    waits for the device until the end, when the [3, Q] results are copied back at once.
    """
    dev = q.device
    q, g, q_sq, g_sq = _prepare_features_torch(q, g, metric)
    n_q, n_gal = len(q), len(g)
    width = _GalleryGroups(gp).max_count(qp)  # ids are on the CPU already: no device round trip for this
    rows = _chunk_rows(n_q, memory_budget_mb, TORCH_PAIR_BYTES * n_gal + 64 * width, tile=GEMM_TILE_ROWS)
    qp_t, gp_t, qc_t, gc_t = (torch.from_numpy(a).to(dev) for a in (qp, gp, qc, gc))
    buf = torch.empty((rows, n_gal), dtype=torch.float32, device=dev)  # reused by every chunk (same stream: ordered)
    parts = []
    with _ieee_fp32_matmul(dev):
        for lo in range(0, n_q, rows):
            block = buf[: min(rows, n_q - lo)]
            _fill_distances_torch(block, q, g, lo, q_sq, g_sq)
            sl = slice(lo, lo + len(block))
            parts.append(_rank_chunk_torch(block, qp_t[sl], qc_t[sl], gp_t, gc_t, width))
    out = torch.cat(parts, dim=1).cpu().numpy()  # the only device-to-host copy (and the only wait)
    return out[0], out[1], out[2].astype(np.int64)


# ---------------------------------------------------------------------------------------- re-id: public functions

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
                  lambda_value: float = 0.3, device: str | torch.device | None = None) -> dict[str, float | int]:
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
    has a valid match.
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
        qg = _distance_matrix(q, g, metric)
        qq = _distance_matrix(q, q, metric)
        gg = _distance_matrix(g, g, metric)
        res = reid_cmc_map_detailed(k_reciprocal_rerank(qg, qq, gg, k1=k1, k2=k2, lambda_value=lambda_value),
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
    return {"mAP": res.mAP, "rank1": res.rank(1), "rank5": res.rank(5), "rank10": res.rank(10), "mINP": res.mINP,
            "num_valid_queries": res.num_valid_queries, "num_skipped": res.num_skipped}


# ------------------------------------------------------------------------------------------------- re-ranking

def _reciprocal_neighbours(nearest: np.ndarray, k: int) -> list[np.ndarray]:
    """R(p, k) for every item: the p-nearest ``k + 1`` (p itself included) that also hold p among their own.

    nearest [N, >= k + 1]: each row's items by increasing distance. Returns N int arrays (in rank order).
    """
    forward = nearest[:, : k + 1]  # [N, k + 1]
    backward = nearest[forward, : k + 1]  # [N, k + 1, k + 1]
    reciprocal = (backward == np.arange(len(nearest))[:, None, None]).any(axis=2)
    return [forward[i][reciprocal[i]] for i in range(len(nearest))]


def k_reciprocal_rerank(q_g_dist: ArrayLike, q_q_dist: ArrayLike, g_g_dist: ArrayLike, k1: int = 20, k2: int = 6,
                        lambda_value: float = 0.3) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017): a [Q, G] distance matrix to feed ``reid_cmc_map``.

    q_g_dist [Q, G], q_q_dist [Q, Q], g_g_dist [G, G]: non-negative distances (any metric). Queries and gallery are
    pooled into N = Q + G items and, following the paper:

    1. ``N(p, k1)``: the ``k1 + 1`` items nearest to p (p first), ties by index; ``R(p, k1)``: those of them holding
       p in their own ``N(., k1)`` (k-reciprocal neighbours).
    2. ``R*(p)``: R(p, k1) joined with R(q, round(k1 / 2)) of each q in R(p, k1) whose own set shares at least two
       thirds of its members with R(p, k1).
    3. ``V_p``: weights ``exp(-d(p, g))`` on R*(p), zero elsewhere, scaled to sum 1; then local query expansion
       replaces V_p by the mean of V over the k2 nearest items of p (p included; skipped when ``k2 == 1``).
    4. Jaccard distance ``1 - sum_j min(V_p[j], V_g[j]) / sum_j max(V_p[j], V_g[j])``; final distance
       ``(1 - lambda_value) * jaccard + lambda_value * d``.

    Scale choice (the paper leaves it open): every row of the pooled distance matrix is divided by its maximum before
    the exp weights and the final mix, so the result does not depend on the units of the distances.

    Memory: this materialises the pooled [N, N] distance matrix and the dense [N, N] weights V before and after query
    expansion (float32): about 12 N^2 bytes, e.g. 4.5 GB for Market-1501 (N = 19,281); the memory budget of
    ``reid_evaluate`` does not apply. Time is O(N^2 log N) for the neighbour lists plus O(Q G |support|) for Jaccard.
    """
    qg, qq, gg = (np.asarray(_np(a), dtype=np.float32) for a in (q_g_dist, q_q_dist, g_g_dist))
    n_q, n_g = qg.shape
    if qq.shape != (n_q, n_q) or gg.shape != (n_g, n_g):
        raise ValueError(f"shapes must be [Q, G], [Q, Q], [G, G]; got {qg.shape}, {qq.shape}, {gg.shape}")
    if k1 < 1 or k2 < 1 or not 0.0 <= lambda_value <= 1.0:
        raise ValueError("need k1 >= 1, k2 >= 1 and 0 <= lambda_value <= 1")
    n = n_q + n_g
    dist = np.block([[qq, qg], [qg.T, gg]])  # [N, N], queries first
    if not np.all(np.isfinite(dist)) or dist.min() < 0:
        raise ValueError("re-ranking needs finite, non-negative distances")
    dist /= np.maximum(dist.max(axis=1, keepdims=True), np.float32(1e-12))
    k1, k2 = min(k1, n - 1), min(k2, n)
    depth = max(k1 + 1, k2)
    nearest = np.empty((n, depth), dtype=np.int64)  # each row's first items by (distance, index)
    for lo in range(0, n, 1024):  # row blocks: a full [N, N] argsort would cost 8 N^2 bytes more
        nearest[lo: lo + 1024] = np.argsort(dist[lo: lo + 1024], axis=1, kind="stable")[:, :depth]
    recip = _reciprocal_neighbours(nearest, k1)
    recip_half = _reciprocal_neighbours(nearest, max(1, round(k1 / 2)))

    weights = np.zeros((n, n), dtype=np.float32)
    for p in range(n):
        members = [recip[p]]
        for cand in recip[p]:
            theirs = recip_half[cand]
            if len(np.intersect1d(theirs, recip[p], assume_unique=True)) >= 2.0 / 3.0 * len(theirs):
                members.append(theirs)
        expanded = np.unique(np.concatenate(members))
        w = np.exp(-dist[p, expanded])
        weights[p, expanded] = w / w.sum()
    if k2 > 1:  # local query expansion: each V row becomes the mean of its k2 nearest items' rows
        expanded_weights = np.empty_like(weights)
        for p in range(n):
            expanded_weights[p] = weights[nearest[p, :k2]].mean(axis=0)
        weights = expanded_weights

    gallery_weights = weights[n_q:]  # [G, N]
    gallery_mass = gallery_weights.sum(axis=1)
    jaccard = np.empty((n_q, n_g), dtype=np.float32)
    for i in range(n_q):
        support = np.flatnonzero(weights[i])  # min() is zero off the query's support
        overlap = np.minimum(gallery_weights[:, support], weights[i, support]).sum(axis=1)
        union = weights[i].sum() + gallery_mass - overlap
        jaccard[i] = 1.0 - overlap / np.maximum(union, np.float32(1e-12))
    return (1.0 - lambda_value) * jaccard + lambda_value * dist[:n_q, n_q:]


# -------------------------------------------------------------------------------------------- nearest neighbours

def _order_ties(values: np.ndarray, idx: np.ndarray, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Reorder each row [Q, k] by value, equal values by gallery index (backends order ties differently)."""
    key = -values if descending else values
    order = np.lexsort((idx, key), axis=-1)
    return np.take_along_axis(values, order, axis=-1), np.take_along_axis(idx, order, axis=-1)


def _as_tensor(x: ArrayLike, name: str, device: torch.device) -> torch.Tensor:
    """Float32 [N, D] on ``device``, all finite; a tensor already there is not copied through the CPU."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, dtype=np.float32))
    t = t.to(device=device, dtype=torch.float32)
    if t.ndim != 2:
        raise ValueError(f"{name} must have shape [N, D], got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contain NaN or inf")
    return t


def _faiss_search(q: np.ndarray, g: np.ndarray, k: int, metric: Metric, rows: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    import faiss  # optional dependency: imported only when this backend runs

    index = faiss.IndexFlatIP(g.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(g.shape[1])
    index.add(g)
    values = np.empty((len(q), k), dtype=np.float32)
    idx = np.empty((len(q), k), dtype=np.int64)
    for lo in range(0, len(q), rows):
        values[lo: lo + rows], idx[lo: lo + rows] = index.search(q[lo: lo + rows], k)
    return values, idx


def _torch_search(q: torch.Tensor, g: torch.Tensor, k: int, metric: Metric, rows: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """q [Q, D], g [G, D] on one device (normalised already for cosine); numpy results [Q, k]."""
    g_sq = (g * g).sum(dim=1) if metric == "euclidean" else None
    values, idx = [], []
    with torch.no_grad():
        for lo in range(0, len(q), rows):
            qb = q[lo: lo + rows]
            scores = qb @ g.T  # [B, G], the only query-gallery block in memory
            if g_sq is None:
                v, i = scores.topk(k, dim=1, largest=True, sorted=True)
            else:
                scores.mul_(-2).add_(g_sq[None, :]).add_((qb * qb).sum(dim=1, keepdim=True)).clamp_(min=0)
                v, i = scores.topk(k, dim=1, largest=False, sorted=True)
            values.append(v.cpu().numpy())
            idx.append(i.cpu().numpy())
    return np.concatenate(values), np.concatenate(idx)


def knn_search(query: ArrayLike, gallery: ArrayLike, k: int, metric: Metric = "cosine",
               memory_budget_mb: float = 256, device: str | torch.device | None = None, *,
               backend: Literal["auto", "faiss", "torch"] = "auto") -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest gallery items of every query: ``(values, indices)``, numpy float32 / int64 [Q, k].

    query [Q, D], gallery [G, D] (cast to float32), 1 <= k <= G. ``metric="cosine"``: values are cosine similarities
    of the L2-normalised vectors (inner products), best first; ``"euclidean"``: squared euclidean distances, nearest
    first. Equal values within the k are ordered by gallery index; which of several items tied at the k-th value is
    returned depends on the backend.

    Backend: a CUDA ``device`` (or CUDA query tensor with ``device=None``) runs a torch matrix product + ``topk`` on
    it; otherwise Faiss (``IndexFlatIP`` / ``IndexFlatL2``) when importable, else the same torch code on the CPU.
    ``backend`` forces one. Queries go in blocks sized so that a [block, G] float32 score matrix (torch keeps one,
    8 bytes per pair with its temporaries) fits ``memory_budget_mb``; Faiss itself never holds more than a
    4096 x 1024 tile of distances.
    """
    if device is None and isinstance(query, torch.Tensor) and query.device.type != "cpu":
        device = query.device
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    if backend == "auto":
        backend = "torch"
        if dev.type == "cpu":
            try:
                import faiss  # noqa: F401
                backend = "faiss"
            except ImportError:
                pass
    if backend not in ("faiss", "torch"):
        raise ValueError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
    if backend == "faiss" and dev.type != "cpu":
        raise ValueError("the faiss backend runs on the CPU (faiss-cpu); use backend='torch' for a GPU")
    n_g, d_q, d_g = _length(gallery), _np_shape(query)[1:], _np_shape(gallery)[1:]
    if d_q != d_g:
        raise ValueError(f"query and gallery differ in dimension: {d_q} vs {d_g}")
    if not 1 <= k <= n_g:
        raise ValueError(f"k must lie in [1, {n_g}] (the gallery size), got {k}")
    if backend == "faiss":
        q, g = _features(query, "query"), _features(gallery, "gallery")
        if metric == "cosine":
            q, g = _l2_normalise(q), _l2_normalise(g)
        values, idx = _faiss_search(q, g, k, metric, _chunk_rows(len(q), memory_budget_mb, 4 * n_g))
    else:
        qt, gt = _as_tensor(query, "query", dev), _as_tensor(gallery, "gallery", dev)
        if metric == "cosine":
            qt, gt = torch.nn.functional.normalize(qt, dim=1), torch.nn.functional.normalize(gt, dim=1)
        values, idx = _torch_search(qt, gt, k, metric, _chunk_rows(len(qt), memory_budget_mb, 8 * n_g))
    return _order_ties(values, idx.astype(np.int64), descending=metric == "cosine")


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


def knn_classify(query: ArrayLike, gallery: ArrayLike, gallery_labels: ArrayLike | Sequence, k: int,
                 metric: Metric = "cosine", memory_budget_mb: float = 256,
                 device: str | torch.device | None = None) -> np.ndarray:
    """Majority vote of the ``k`` nearest gallery items (``knn_search``): predicted labels [Q].

    query [Q, D], gallery [G, D], gallery_labels [G] (any comparable labels; the result has their dtype). A tie in
    the vote goes to the tied label whose nearest member ranks first.
    """
    labels = _labels(gallery_labels, _length(gallery), "gallery_labels")
    _, idx = knn_search(query, gallery, k, metric, memory_budget_mb, device)
    _, codes = np.unique(labels, return_inverse=True)
    votes = codes.reshape(-1)[idx]  # [Q, k]
    support = (votes[:, :, None] == votes[:, None, :]).sum(axis=2)  # [Q, k]: votes for the label at each position
    best = np.argmax(support, axis=1)  # the first (nearest) position among the labels with the most votes
    return labels[idx[np.arange(len(idx)), best]]


def recall_at_k(query_emb: ArrayLike, query_labels: ArrayLike | Sequence, gallery_emb: ArrayLike,
                gallery_labels: ArrayLike | Sequence, ks: Sequence[int] = (1, 5), *, metric: Metric = "cosine",
                exclude_self: bool = False, memory_budget_mb: float = 256,
                device: str | torch.device | None = None) -> dict[str, float]:
    """Recall@K: the fraction of queries with at least one gallery item of their class among their K nearest.

    query_emb [Q, D], query_labels [Q], gallery_emb [G, D], gallery_labels [G]. Neighbours come from ``knn_search``:
    cosine similarity of L2-normalised embeddings (inner product) by default. Every query counts in the denominator,
    including one whose class is absent from the gallery. A K larger than the gallery means the whole gallery.
    ``exclude_self=True`` is for a query set that *is* the gallery (Q == G, same order): item i is not its own
    neighbour. Returns ``{"recall@K": fraction}`` for each K in ``ks``.
    """
    n_q, n_g = _length(query_emb), _length(gallery_emb)
    ql = _labels(query_labels, n_q, "query_labels")
    gl = _labels(gallery_labels, n_g, "gallery_labels")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if exclude_self and n_q != n_g:
        raise ValueError(f"exclude_self needs the query set to be the gallery, got Q={n_q}, G={n_g}")
    available = n_g - int(exclude_self)
    if available < 1:
        raise ValueError("the gallery has no item to retrieve")
    depth = min(max(ks), available)
    _, idx = knn_search(query_emb, gallery_emb, depth + int(exclude_self), metric, memory_budget_mb, device)
    if exclude_self:
        keep = idx != np.arange(n_q)[:, None]
        keep[keep.all(axis=1), -1] = False  # self not returned (tied with a duplicate): drop the farthest instead
        idx = idx[keep].reshape(n_q, depth)
    hit = gl[idx] == ql[:, None]  # [Q, depth]
    first = np.where(hit.any(axis=1), np.argmax(hit, axis=1), depth)  # 0-based position of the first hit
    return {f"recall@{k}": float(np.mean(first < min(k, depth))) for k in ks}
