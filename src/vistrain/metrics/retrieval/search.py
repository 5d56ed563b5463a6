"""Nearest-neighbour search, kNN classification and Recall@K (Faiss on the CPU, a chunked torch product on a GPU)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from vistrain.metrics._common import ArrayLike, _np, _positive_int
from vistrain.metrics.retrieval._common import (
    Metric,
    _as_tensor,
    _chunk_rows,
    _features,
    _l2_normalise,
    _labels,
    _length,
    _np_shape,
)


def _order_ties(values: np.ndarray, idx: np.ndarray, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Reorder each row [Q, k] by value, equal values by gallery index (backends order ties differently)."""
    key = -values if descending else values
    order = np.lexsort((idx, key), axis=-1)
    return np.take_along_axis(values, order, axis=-1), np.take_along_axis(idx, order, axis=-1)


def _faiss_search(q: np.ndarray, g: np.ndarray, k: int, metric: Metric, rows: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    import faiss  # optional dependency: imported only when this backend runs

    faiss.omp_set_num_threads(torch.get_num_threads())  # the process's setting (train.num_threads), as torch
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

    query [Q, D], gallery [G, D] (cast to float32), 1 <= k <= G (an integer: a bool or float raises ``ValueError``).
    ``metric="cosine"``: values are cosine similarities
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
    k = _positive_int(k, "k")
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


def knn_classify(query: ArrayLike, gallery: ArrayLike, gallery_labels: ArrayLike | Sequence, k: int,
                 metric: Metric = "cosine", memory_budget_mb: float = 256,
                 device: str | torch.device | None = None) -> np.ndarray:
    """Majority vote of the ``k`` nearest gallery items (``knn_search``): predicted labels [Q].

    query [Q, D], gallery [G, D], gallery_labels [G] (any comparable labels; the result has their dtype). A tie in
    the vote goes to the tied label whose nearest member ranks first.
    """
    labels = _labels(gallery_labels, _length(gallery), "gallery_labels")
    k = _positive_int(k, "k")
    _, idx = knn_search(query, gallery, k, metric, memory_budget_mb, device)
    return knn_vote(idx, labels)


def knn_vote(idx: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``knn_classify``'s vote from neighbours already found: idx [Q, k] gallery indices (nearest first, as
    ``knn_search`` returns them), labels [G]. Returns the predicted labels [Q]."""
    _, codes = np.unique(labels, return_inverse=True)
    votes = codes.reshape(-1)[idx]  # [Q, k]
    support = (votes[:, :, None] == votes[:, None, :]).sum(axis=2)  # [Q, k]: votes for the label at each position
    best = np.argmax(support, axis=1)  # the first (nearest) position among the labels with the most votes
    return labels[idx[np.arange(len(idx)), best]]


def _recall_ks(ks: Sequence[int]) -> list[int]:
    """``ks`` as a list of ints, each >= 1; anything else (an empty or non-sequence, a bool, a float) raises."""
    if isinstance(ks, str | bytes) or not isinstance(ks, Sequence | np.ndarray) or len(ks) == 0:
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    try:
        return [_positive_int(k, "k") for k in ks]
    except ValueError:
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}") from None


def recall_at_k(query_emb: ArrayLike, query_labels: ArrayLike | Sequence, gallery_emb: ArrayLike,
                gallery_labels: ArrayLike | Sequence, ks: Sequence[int] = (1, 5), *, metric: Metric = "cosine",
                exclude_self: bool = False, memory_budget_mb: float = 256,
                device: str | torch.device | None = None) -> dict[str, float]:
    """Recall@K: the fraction of queries with at least one gallery item of their class among their K nearest.

    query_emb [Q, D], query_labels [Q], gallery_emb [G, D], gallery_labels [G]. Neighbours come from ``knn_search``:
    cosine similarity of L2-normalised embeddings (inner product) by default. Every query counts in the denominator,
    including one whose class is absent from the gallery. A K larger than the gallery means the whole gallery.
    ``exclude_self=True`` is for a query set that *is* the gallery (Q == G, same order): item i is not its own
    neighbour. ``ks``: a non-empty sequence of positive integers (Python or numpy; not bools or floats). Returns
    ``{"recall@K": fraction}`` for each K in ``ks``. No query, or no gallery item to retrieve, is a ``ValueError``.
    """
    idx = recall_neighbours(query_emb, query_labels, gallery_emb, gallery_labels, ks, metric=metric,
                            exclude_self=exclude_self, memory_budget_mb=memory_budget_mb, device=device)
    gl = _labels(gallery_labels, _length(gallery_emb), "gallery_labels")
    return recall_from_neighbours(idx, _labels(query_labels, len(idx), "query_labels"), gl, ks)


def recall_neighbours(query_emb: ArrayLike, query_labels: ArrayLike | Sequence, gallery_emb: ArrayLike,
                      gallery_labels: ArrayLike | Sequence, ks: Sequence[int] = (1, 5), *, metric: Metric = "cosine",
                      exclude_self: bool = False, memory_budget_mb: float = 256,
                      device: str | torch.device | None = None) -> np.ndarray:
    """The neighbours ``recall_at_k`` scores (same arguments and checks): int64 [Q, min(max(ks), available)]
    gallery indices, nearest first; with ``first_hit_positions`` they give each query's own hits."""
    n_q, n_g = _length(query_emb), _length(gallery_emb)
    _labels(query_labels, n_q, "query_labels")  # shape checks before any search
    _labels(gallery_labels, n_g, "gallery_labels")
    ks = _recall_ks(ks)
    if n_q == 0:
        raise ValueError("recall_at_k: there is no query to evaluate (query_emb has 0 rows)")
    if exclude_self and n_q != n_g:
        raise ValueError(f"exclude_self needs the query set to be the gallery, got Q={n_q}, G={n_g}")
    available = n_g - int(exclude_self)
    if available < 1:
        raise ValueError("the gallery has no item to retrieve")
    depth = min(max(ks), available)
    _, idx = knn_search(query_emb, gallery_emb, depth + int(exclude_self), metric, memory_budget_mb, device)
    if exclude_self:
        idx = _without_self(idx, depth)
    return idx


def _without_self(idx: np.ndarray, depth: int) -> np.ndarray:
    """Neighbours [Q, depth + 1] of a query set that is the gallery, less each row's own index -> [Q, depth]."""
    keep = idx != np.arange(len(idx))[:, None]
    keep[keep.all(axis=1), -1] = False  # self not returned (tied with a duplicate): drop the farthest instead
    return idx[keep].reshape(len(idx), depth)


def leave_one_out_recall(emb: ArrayLike, labels: ArrayLike | Sequence, ks: Sequence[int] = (1, 5), *,
                         metric: Metric = "cosine", memory_budget_mb: float = 256,
                         device: str | torch.device | None = None) -> tuple[dict[str, float], int]:
    """Recall@K by the class-disjoint protocol of the retrieval benchmarks (CUB-200, Stanford Online Products):
    every item of emb [N, D] queries all the others (itself left out), ranked as ``recall_at_k`` ranks.

    An item alone in its class has nothing to retrieve: it is no query (unlike ``recall_at_k``, which counts every
    query), but stays in the gallery of the others. Returns ``({"recall@K": fraction}, queries counted)``; no item
    with another of its class is a ``ValueError``.
    """
    n = _length(emb)
    lab = _labels(labels, n, "labels")
    ks = _recall_ks(ks)
    _, inverse, counts = np.unique(lab, return_inverse=True, return_counts=True)
    counted = counts[inverse] > 1
    if not counted.any():
        raise ValueError("leave_one_out_recall: no item has another item of its class to retrieve")
    depth = min(max(ks), n - 1)
    _, idx = knn_search(emb, emb, depth + 1, metric, memory_budget_mb, device)
    idx = _without_self(idx, depth)
    return recall_from_neighbours(idx[counted], lab[counted], lab, ks), int(counted.sum())


def nearest_by_distance(distmat: ArrayLike, k: int) -> np.ndarray:
    """The ``k`` nearest gallery indices of each row of a distance matrix [Q, G] (smaller = closer, e.g. re-ranked
    distances): int64 [Q, min(k, G)], nearest first, equal distances by gallery index (as ``knn_search``)."""
    dist = np.asarray(_np(distmat))
    if dist.ndim != 2:
        raise ValueError(f"distmat must have shape [Q, G], got {dist.shape}")
    return np.argsort(dist, axis=1, kind="stable")[:, : _positive_int(k, "k")].astype(np.int64)


def recall_from_neighbours(idx: np.ndarray, query_labels: ArrayLike | Sequence,
                           gallery_labels: ArrayLike | Sequence, ks: Sequence[int]) -> dict[str, float]:
    """``recall_at_k``'s figures from neighbours already found: idx [Q, depth] gallery indices, nearest first
    (``knn_search``, ``nearest_by_distance``); a K beyond ``depth`` counts the ``depth`` found."""
    ks = _recall_ks(ks)
    first, depth = first_hit_positions(idx, query_labels, gallery_labels), idx.shape[1]
    return {f"recall@{k}": float(np.mean(first < min(k, depth))) for k in ks}


def first_hit_positions(idx: np.ndarray, query_labels: ArrayLike | Sequence,
                        gallery_labels: ArrayLike | Sequence) -> np.ndarray:
    """int64 [Q]: the 0-based position in ``idx`` [Q, depth] of each query's first same-label neighbour (``depth``
    when none): query q counts towards recall@K iff its position is < min(K, depth)."""
    ql = _labels(query_labels, len(idx), "query_labels")
    gl = np.asarray(gallery_labels)
    hit = gl[idx] == ql[:, None]  # [Q, depth]
    return np.where(hit.any(axis=1), np.argmax(hit, axis=1), idx.shape[1]).astype(np.int64)
