"""A bounded number of nearest neighbours per image (Faiss), so the audit's searches grow with N, not N squared.

Up to ``EXACT_UP_TO`` vectors the search is exact (``IndexFlatL2``); above, an inverted-file index
(``IndexIVFFlat``: about ``4 sqrt(N)`` k-means cells, ``NPROBE`` of them searched per query), which returns the close
neighbours that matter here (a near duplicate lies deep inside its original's cell) at a fraction of the cost.
The IVF index searches the first ``SEARCH_DIMS`` principal components of wider vectors (euclidean distance there
approximates the cosine distance of the unit vectors); the similarities returned are always the inner products of
the full vectors.
"""

from __future__ import annotations

import math

import numpy as np

EXACT_UP_TO = 10_000  # vectors; above this an IVF index
NPROBE = 32  # IVF cells searched per query
SEARCH_DIMS = 64  # PCA width of the search (the returned similarities use every dimension)
QUERY_BLOCK = 1024  # queries at once: their neighbours' vectors are gathered, [1024, k, D] float32


def _index(x: np.ndarray) -> object:
    import faiss

    n, d = x.shape
    if n <= EXACT_UP_TO:
        index = faiss.IndexFlatL2(d)
    else:
        # about 4 sqrt(N) cells, with the 40 training points per cell k-means wants
        cells = int(min(4096, max(16, min(4 * math.sqrt(n), n / 40))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, cells, faiss.METRIC_L2)
        index.cp.seed = 0  # the same cells every run: the same answer every run
        index.train(x)
        index.nprobe = min(NPROBE, cells)
    index.add(x)
    return index


def nearest(x: np.ndarray, k: int, queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``x`` [N, D] (unit vectors) most similar to each query row (default: every row of ``x``,
    itself left out): ``(similarities, indices)`` [Q, k] by inner product, best first; index -1 (similarity -inf)
    where fewer than ``k`` were found. ``queries`` are row indices of ``x``; a query is never its own neighbour."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = np.arange(len(x)) if queries is None else np.asarray(queries, dtype=np.int64)
    k = min(k, len(x) - 1)
    if k < 1 or not len(rows):
        return np.zeros((len(rows), 0), np.float32), np.zeros((len(rows), 0), np.int64)
    space = x
    if x.shape[1] > SEARCH_DIMS and len(x) > EXACT_UP_TO:
        pca = faiss.PCAMatrix(x.shape[1], SEARCH_DIMS)
        pca.train(x)
        space = pca.apply(x)
    index = _index(space)
    sims, idx = [], []
    for lo in range(0, len(rows), QUERY_BLOCK):
        q = rows[lo: lo + QUERY_BLOCK]
        found = index.search(space[q], k + 1)[1]
        found[found == q[:, None]] = -1  # the query itself
        # keep the first k others of each row (a row without itself among them drops its last)
        found = np.take_along_axis(found, np.argsort(found < 0, axis=1, kind="stable")[:, :k], axis=1)
        sim = np.where(found >= 0, np.einsum("qd,qkd->qk", x[q], x[np.maximum(found, 0)]), -np.inf)
        order = np.argsort(-sim, axis=1, kind="stable")
        sims.append(np.take_along_axis(sim, order, axis=1).astype(np.float32))
        idx.append(np.take_along_axis(found, order, axis=1))
    return np.concatenate(sims), np.concatenate(idx)
