"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), with the semantics of the authors' released code, which
torchreid and reid-strong-baseline share, so re-ranked numbers are comparable with published ones."""

from __future__ import annotations

import numpy as np

from vistrain.metrics._common import ArrayLike, _np, _positive_int
from vistrain.metrics.retrieval._common import Metric
from vistrain.metrics.retrieval.distances import _distance_matrix


def _reciprocal_neighbours(nearest: np.ndarray, k: int) -> list[np.ndarray]:
    """R(p, k) for every item: the p-nearest ``k + 1`` (p itself included) that also hold p among their own.
    ``k = 0`` gives each item alone (when it ranks itself first).

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

    1. ``N(p, k1)``: the ``k1 + 1`` items nearest to p (p first), ties by index (all N items when k1 >= N);
       ``R(p, k1)``: those of them holding p in their own ``N(., k1)`` (k-reciprocal neighbours).
    2. ``R*(p)``: R(p, k1) joined with R(q, round(k1 / 2)) of each q in R(p, k1) whose own set shares *more than*
       two thirds of its members with R(p, k1) (``|R(q) & R(p)| > 2/3 |R(q)|``: an overlap of exactly two thirds,
       e.g. 2 of 3, does not expand). ``round`` is numpy's (half to even: k1 = 5 gives 2, k1 = 7 gives 4, k1 = 1
       gives 0, i.e. R(q) = {q}), taken of k1 as given.
    3. ``V_p``: weights ``exp(-d(p, g))`` on R*(p), zero elsewhere, scaled to sum 1; then local query expansion
       replaces V_p by the mean of V over the k2 nearest items of p (p included; skipped when ``k2 == 1``).
    4. Jaccard distance ``1 - sum_j min(V_p[j], V_g[j]) / sum_j max(V_p[j], V_g[j])``; final distance
       ``(1 - lambda_value) * jaccard + lambda_value * d``.

    Scale (as the authors' code): every row of the pooled distance matrix is divided by its maximum before the exp
    weights and the final mix, so the result does not depend on the units of the distances. The inputs are used as
    given: torchreid's ``re_ranking`` squares its inputs (it expects euclidean distances), so passing it euclidean
    distances equals passing squared euclidean distances here, which is what ``reid_evaluate`` does.

    Memory: this materialises the pooled [N, N] distance matrix and the dense [N, N] weights V before and after query
    expansion (float32): about 12 N^2 bytes, e.g. 4.5 GB for Market-1501 (N = 19,281); the memory budget of
    ``reid_evaluate`` does not apply. Time is O(N^2 log N) for the neighbour lists plus O(Q G |support|) for Jaccard.
    """
    qg, qq, gg = (np.asarray(_np(a), dtype=np.float32) for a in (q_g_dist, q_q_dist, g_g_dist))
    n_q, n_g = qg.shape
    if qq.shape != (n_q, n_q) or gg.shape != (n_g, n_g):
        raise ValueError(f"shapes must be [Q, G], [Q, Q], [G, G]; got {qg.shape}, {qq.shape}, {gg.shape}")
    k1, k2 = _positive_int(k1, "k1"), _positive_int(k2, "k2")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must lie in [0, 1], got {lambda_value}")
    n = n_q + n_g
    dist = np.block([[qq, qg], [qg.T, gg]])  # [N, N], queries first
    if not np.all(np.isfinite(dist)) or dist.min() < 0:
        raise ValueError("re-ranking needs finite, non-negative distances")
    dist /= np.maximum(dist.max(axis=1, keepdims=True), np.float32(1e-12))
    half = int(np.around(k1 / 2))  # of k1 as given, before the clamp below (as the reference code)
    k1, k2, half = min(k1, n - 1), min(k2, n), min(half, n - 1)
    depth = max(k1 + 1, k2)
    nearest = np.empty((n, depth), dtype=np.int64)  # each row's first items by (distance, index)
    for lo in range(0, n, 1024):  # row blocks: a full [N, N] argsort would cost 8 N^2 bytes more
        nearest[lo: lo + 1024] = np.argsort(dist[lo: lo + 1024], axis=1, kind="stable")[:, :depth]
    recip = _reciprocal_neighbours(nearest, k1)
    recip_half = _reciprocal_neighbours(nearest, half)

    weights = np.zeros((n, n), dtype=np.float32)
    for p in range(n):
        members = [recip[p]]
        for cand in recip[p]:
            theirs = recip_half[cand]
            if 3 * len(np.intersect1d(theirs, recip[p], assume_unique=True)) > 2 * len(theirs):  # exact integers
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


def rerank_features(q_feats: ArrayLike, g_feats: ArrayLike, metric: Metric = "euclidean", k1: int = 20, k2: int = 6,
                    lambda_value: float = 0.3) -> np.ndarray:
    """``k_reciprocal_rerank`` of features: q_feats [Q, D], g_feats [G, D] -> re-ranked distances [Q, G] (float32).

    The query-gallery, query-query and gallery-gallery matrices are ``distance_matrix_chunks``' (``"euclidean"``:
    squared euclidean, clipped at 0; on unit vectors it ranks, and re-ranks, exactly as cosine distance does, since
    each row is scaled by its maximum). Re-id and retrieval evaluation both re-rank through here.
    """
    qg = _distance_matrix(q_feats, g_feats, metric)
    qq = _distance_matrix(q_feats, q_feats, metric)
    gg = _distance_matrix(g_feats, g_feats, metric)
    return k_reciprocal_rerank(qg, qq, gg, k1=k1, k2=k2, lambda_value=lambda_value)
