"""The Market-1501 ranking core on the CPU (numpy): AP, INP and first-match rank for a chunk of distance rows.

A ranking is never fully argsorted. Each chunk of rows is sorted *by value* (numpy's SIMD sort, a block of rows per
CPU thread), and the position of each of a query's few same-id gallery items is found by binary search in its sorted
row; the rare rows in which such an item ties with another value fall back to a stable argsort of that row. AP, CMC
and INP then come from these few positions, vectorised over the chunk.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from vistrain.metrics._common import ArrayLike
from vistrain.metrics.retrieval._common import _ids

NO_VALID_QUERY = "no query has a valid match in the gallery (same-camera matches are excluded)"


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
