"""vistrain.metrics.retrieval: the Market-1501 protocol against a plain per-query loop, hand-computed cases,
chunked == unchunked evaluation, the torch (CPU / CUDA) evaluation path, k-reciprocal re-ranking, kNN search /
classification and Recall@K."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from required_extras import has_extra

from vistrain.metrics.retrieval import (
    GEMM_TILE_ROWS,
    distance_matrix_chunks,
    k_reciprocal_rerank,
    knn_classify,
    knn_search,
    leave_one_out_recall,
    recall_at_k,
    reid_cmc_map,
    reid_cmc_map_detailed,
    reid_evaluate,
)

HAS_FAISS = has_extra("faiss")

BACKENDS = ["torch"] + (["faiss"] if HAS_FAISS else [])


# ------------------------------------------------------------------------------- an independent reference

def market_reference(distmat, q_pids, g_pids, q_cams, g_cams, max_rank):
    """The Market-1501 protocol, one query at a time in plain Python (deliberately shares no code).

    Returns (cmc list, mAP, mINP, n_valid, per-query AP list with None for skipped queries).
    """
    n_g = len(g_pids)
    cmc_hits = [0] * max_rank
    aps, inps, per_query = [], [], []
    for i in range(len(q_pids)):
        ranking = sorted(range(n_g), key=lambda j: (float(distmat[i][j]), j))  # ties: lower gallery index first
        ranking = [j for j in ranking if g_pids[j] != -1 and not (g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i])]
        good = [g_pids[j] == q_pids[i] for j in ranking]
        if not any(good):
            per_query.append(None)
            continue
        first = good.index(True) + 1
        for k in range(max_rank):
            if first <= k + 1:
                cmc_hits[k] += 1
        found, precisions, last = 0, [], 0
        for position, is_good in enumerate(good, start=1):
            if is_good:
                found += 1
                precisions.append(found / position)
                last = position
        ap = sum(precisions) / found
        aps.append(ap)
        inps.append(found / last)
        per_query.append(ap)
    n_valid = len(aps)
    if n_valid == 0:
        return None, None, None, 0, per_query
    return [h / n_valid for h in cmc_hits], sum(aps) / n_valid, sum(inps) / n_valid, n_valid, per_query


def random_reid(rng: np.random.Generator, n_q: int, n_g: int, n_ids: int, n_cams: int, integer: bool):
    """A random distance matrix with ids / cameras; integer-valued distances make ties common."""
    q_pids = rng.integers(1, n_ids + 1, n_q)
    q_pids[: max(1, n_q // 10)] = n_ids + 5  # an id absent from the gallery: those queries have no match
    g_pids = rng.integers(0, n_ids + 1, n_g)  # 0: distractors
    q_cams, g_cams = rng.integers(0, n_cams, n_q), rng.integers(0, n_cams, n_g)
    dist = rng.integers(0, 6, (n_q, n_g)).astype(np.float64) if integer else rng.random((n_q, n_g))
    return dist, q_pids, g_pids, q_cams, g_cams


# ------------------------------------------------------------------------------------ the Market-1501 protocol

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("integer", [True, False])
def test_reid_cmc_map_matches_per_query_loop(seed: int, integer: bool) -> None:
    rng = np.random.default_rng(seed)
    dist, qp, gp, qc, gc = random_reid(rng, n_q=37, n_g=90, n_ids=12, n_cams=6, integer=integer)
    gc[:5] = qc[0]  # some same-camera junk for sure
    gp[:5] = qp[-1]
    ref_cmc, ref_map, ref_minp, n_valid, ref_aps = market_reference(dist, qp, gp, qc, gc, max_rank=20)
    res = reid_cmc_map_detailed(dist, qp, gp, qc, gc, max_rank=20, memory_budget_mb=0.01)  # ~10-row blocks
    assert res.num_valid_queries == n_valid and res.num_skipped == 37 - n_valid and res.num_skipped >= 3
    np.testing.assert_allclose(res.cmc, ref_cmc, atol=1e-6)
    assert res.mAP == pytest.approx(ref_map, abs=1e-6)
    assert res.mINP == pytest.approx(ref_minp, abs=1e-6)
    for got, want in zip(res.ap, ref_aps):
        assert (math.isnan(got) and want is None) or got == pytest.approx(want, abs=1e-9)
    cmc, m_ap, m_inp = reid_cmc_map(dist, qp, gp, qc, gc, max_rank=20)
    np.testing.assert_array_equal(cmc, res.cmc)
    assert (m_ap, m_inp) == (res.mAP, res.mINP)


def test_reid_all_ties_and_input_types() -> None:
    """A constant distance matrix: the ranking is the gallery order. Tensors and float32 give the same numbers."""
    rng = np.random.default_rng(3)
    _, qp, gp, qc, gc = random_reid(rng, n_q=20, n_g=60, n_ids=5, n_cams=3, integer=True)
    dist = np.ones((20, 60))
    ref_cmc, ref_map, ref_minp, _, _ = market_reference(dist, qp, gp, qc, gc, max_rank=10)
    for d in (dist, dist.astype(np.float32), torch.from_numpy(dist), dist.astype(np.int64)):
        cmc, m_ap, m_inp = reid_cmc_map(d, torch.from_numpy(qp), gp, qc.tolist(), gc, max_rank=10)
        np.testing.assert_allclose(cmc, ref_cmc, atol=1e-12)
        assert (m_ap, m_inp) == pytest.approx((ref_map, ref_minp), abs=1e-12)


def test_reid_hand_computed() -> None:
    # Gallery:   g0      g1      g2      g3          g4
    #   pid      1       2       1       0 (distr.)  1
    #   cam      0       0       1       1           2
    # Query 0 (pid 1, cam 0), distances 0.1 0.2 0.5 0.3 0.4 -> order g0 g1 g3 g4 g2; g0 is the same person and
    #   camera: removed. Ranking g1 g3 g4 g2: matches at positions 3 and 4.
    #   AP = (1/3 + 2/4) / 2 = 5/12, first match 3, INP = 2 matches / last at 4 = 1/2.
    # Query 1 (pid 2, cam 1), distances 0.9 0.6 0.7 0.8 0.5 -> order g4 g1 g2 g3 g0; g1 (pid 2, cam 0) is a match.
    #   AP = 1/2, first match 2, INP = 1/2.
    # mAP = (5/12 + 1/2) / 2 = 11/24; mINP = 1/2; CMC over ranks 1..5 = [0, 1/2, 1, 1, 1].
    dist = np.array([[0.1, 0.2, 0.5, 0.3, 0.4], [0.9, 0.6, 0.7, 0.8, 0.5]])
    res = reid_cmc_map_detailed(dist, [1, 2], [1, 2, 1, 0, 1], [0, 1], [0, 0, 1, 1, 2], max_rank=5)
    np.testing.assert_allclose(res.cmc, [0, 0.5, 1, 1, 1])
    assert res.mAP == pytest.approx(11 / 24)
    assert res.mINP == pytest.approx(0.5)
    np.testing.assert_allclose(res.ap, [5 / 12, 1 / 2])
    np.testing.assert_array_equal(res.first_match_rank, [3, 2])
    assert (res.num_valid_queries, res.num_skipped) == (2, 0)


def test_reid_ties_broken_by_gallery_index() -> None:
    # One query (pid 7, cam 0); every distance equal, so the ranking is g0 g1 g2 g3.
    # g0: pid 3 (non-match), g1: pid 7 cam 0 (removed), g2: pid 5 (non-match), g3: pid 7 cam 1 (match).
    # Filtered ranking g0 g2 g3: the match is 3rd. AP = 1/3, INP = 1/3, CMC = [0, 0, 1].
    res = reid_cmc_map_detailed(np.full((1, 4), 0.5), [7], [3, 7, 5, 7], [0], [2, 0, 1, 1], max_rank=3)
    np.testing.assert_allclose(res.cmc, [0, 0, 1])
    assert res.mAP == pytest.approx(1 / 3) and res.mINP == pytest.approx(1 / 3)
    # Moving the match to index 0 (same distances) puts it first: AP = 1.
    res = reid_cmc_map_detailed(np.full((1, 4), 0.5), [7], [7, 7, 5, 3], [0], [1, 0, 1, 2], max_rank=3)
    assert res.mAP == 1.0 and res.cmc[0] == 1.0


def test_reid_query_with_only_same_camera_matches_is_skipped() -> None:
    # Query 0 (pid 1, cam 0): its only gallery images (g0, g1) are from camera 0 -> skipped.
    # Query 1 (pid 2, cam 0): g2 from camera 1 is ranked 1st after removing nothing -> AP 1.
    dist = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    res = reid_cmc_map_detailed(dist, [1, 2], [1, 1, 2], [0, 0], [0, 0, 1], max_rank=3)
    assert (res.num_valid_queries, res.num_skipped) == (1, 1)
    assert res.mAP == 1.0 and res.mINP == 1.0
    assert math.isnan(res.ap[0]) and res.first_match_rank[0] == 0


def test_reid_short_gallery_pads_cmc_with_last_value() -> None:
    # Query (pid 1, cam 0); gallery g0 pid 2, g1 pid 1 cam 1 -> the match is 2nd: CMC [0, 1] then padded with 1.
    with pytest.warns(UserWarning, match="fewer than max_rank"):
        cmc, m_ap, m_inp = reid_cmc_map(np.array([[0.1, 0.2]]), [1], [2, 1], [0], [0, 1], max_rank=6)
    np.testing.assert_array_equal(cmc, [0, 1, 1, 1, 1, 1])
    assert len(cmc) == 6 and m_ap == 0.5 and m_inp == 0.5


def test_reid_all_queries_invalid_raises() -> None:
    with pytest.raises(ValueError, match="no query has a valid match in the gallery"):
        reid_cmc_map(np.zeros((2, 3)), [1, 2], [1, 2, 3], [0, 1], [0, 1, 0], max_rank=3)


def test_reid_junk_ids_are_left_out() -> None:
    """Gallery items with pid -1 are removed from every ranking (with a warning): same as dropping them."""
    rng = np.random.default_rng(11)
    dist, qp, gp, qc, gc = random_reid(rng, n_q=15, n_g=50, n_ids=6, n_cams=4, integer=True)
    gp[::7] = -1
    keep = gp != -1
    with pytest.warns(UserWarning, match="person id -1"):
        with_junk = reid_cmc_map_detailed(dist, qp, gp, qc, gc, max_rank=10)
    dropped = reid_cmc_map_detailed(dist[:, keep], qp, gp[keep], qc, gc[keep], max_rank=10)
    np.testing.assert_array_equal(with_junk.ap, dropped.ap)
    ref_cmc, ref_map, _, _, _ = market_reference(dist, qp, gp, qc, gc, max_rank=10)
    assert with_junk.mAP == pytest.approx(ref_map, abs=1e-9)


def test_reid_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        reid_cmc_map(np.array([[np.nan, 1.0]]), [1], [1, 2], [0], [1, 1], max_rank=2)
    with pytest.raises(ValueError, match="shape"):
        reid_cmc_map(np.zeros((2, 3)), [1], [1, 2, 3], [0, 1], [0, 1, 0])


# --------------------------------------------------------------------------------------- reid_evaluate (features)

def clustered_features(rng: np.random.Generator, q_pids: np.ndarray, g_pids: np.ndarray, dim: int, noise: float
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Query and gallery features [Q, dim], [G, dim]: one random centre per id plus Gaussian noise (float32)."""
    centres = rng.standard_normal((int(max(q_pids.max(), g_pids.max())) + 1, dim))

    def draw(pids: np.ndarray) -> np.ndarray:
        return (centres[pids] + noise * rng.standard_normal((len(pids), dim))).astype(np.float32)

    return draw(q_pids), draw(g_pids)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_reid_evaluate_chunked_equals_unchunked(metric: str) -> None:
    rng = np.random.default_rng(0)
    n_q, n_g = 2 * GEMM_TILE_ROWS + 37, 300  # three GEMM tiles, the last one partial
    qp, gp = rng.integers(1, 40, n_q), rng.integers(0, 40, n_g)
    qc, gc = rng.integers(0, 6, n_q), rng.integers(0, 6, n_g)
    q, g = clustered_features(rng, qp, gp, 24, 1.0)
    whole = reid_evaluate(q, g, qp, gp, qc, gc, memory_budget_mb=1024, metric=metric)
    tiny = reid_evaluate(q, g, qp, gp, qc, gc, memory_budget_mb=1e-3, metric=metric)  # one tile per block
    assert tiny == whole  # bit-identical: same distances, same ranking
    assert 0.05 < whole["mAP"] < 0.95 and whole["num_skipped"] == 0
    # ... and equal to the distmat path on the concatenated blocks, and to the plain reference on them.
    blocks = list(distance_matrix_chunks(q, g, metric=metric, memory_budget_mb=1e-3))
    assert len(blocks) == 3 and [b.shape[0] for _, b in blocks] == [GEMM_TILE_ROWS, GEMM_TILE_ROWS, 37]
    dist = np.concatenate([b for _, b in blocks])
    res = reid_cmc_map_detailed(dist, qp, gp, qc, gc)
    assert (res.mAP, res.mINP, res.rank(1), res.rank(5), res.rank(10)) == (
        whole["mAP"], whole["mINP"], whole["rank1"], whole["rank5"], whole["rank10"])
    _, ref_map, ref_minp, _, _ = market_reference(dist[:60], qp[:60], gp, qc[:60], gc, max_rank=10)
    part = reid_cmc_map_detailed(dist[:60], qp[:60], gp, qc[:60], gc, max_rank=10)
    assert part.mAP == pytest.approx(ref_map, abs=1e-9) and part.mINP == pytest.approx(ref_minp, abs=1e-9)


def test_reid_evaluate_integer_features_with_ties() -> None:
    """Small integer features: distances are exact in float32 and tie a lot; blocks must not change anything."""
    rng = np.random.default_rng(5)
    n_q, n_g = GEMM_TILE_ROWS + 20, 120
    qp, gp = rng.integers(1, 10, n_q), rng.integers(1, 10, n_g)
    qc, gc = rng.integers(0, 3, n_q), rng.integers(0, 3, n_g)
    q, g = rng.integers(0, 2, (n_q, 4)).astype(np.float32), rng.integers(0, 2, (n_g, 4)).astype(np.float32)
    whole = reid_evaluate(q, g, qp, gp, qc, gc, max_rank=10)
    assert reid_evaluate(q, g, qp, gp, qc, gc, max_rank=10, memory_budget_mb=1e-4) == whole
    dist = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    ref_cmc, ref_map, ref_minp, n_valid, _ = market_reference(dist, qp, gp, qc, gc, max_rank=10)
    assert whole["mAP"] == pytest.approx(ref_map, abs=1e-9) and whole["mINP"] == pytest.approx(ref_minp, abs=1e-9)
    assert whole["rank1"] == pytest.approx(ref_cmc[0]) and whole["rank10"] == pytest.approx(ref_cmc[9])
    assert whole["num_valid_queries"] == n_valid


def test_reid_evaluate_cosine_equals_euclidean_on_unit_features() -> None:
    rng = np.random.default_rng(2)
    qp, gp = rng.integers(1, 20, 80), rng.integers(1, 20, 200)
    qc, gc = rng.integers(0, 4, 80), rng.integers(0, 4, 200)
    q, g = clustered_features(rng, qp, gp, 32, 1.0)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    a = reid_evaluate(q, g, qp, gp, qc, gc, metric="cosine")
    b = reid_evaluate(q, g, qp, gp, qc, gc, metric="euclidean")
    for key in ("mAP", "rank1", "rank5", "mINP"):
        assert a[key] == pytest.approx(b[key], abs=1e-3)  # rounding can only swap near-ties


def test_reid_evaluate_all_invalid_raises() -> None:
    q = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="same-camera matches are excluded"):
        reid_evaluate(q, q, [1, 2, 3], [1, 2, 3], [0, 0, 0], [0, 0, 0], max_rank=2)


# ------------------------------------------------------------------------- reid_evaluate on a torch device

def ternary_features(rng: np.random.Generator, n: int, dim: int = 6, nonzeros: int = 4) -> np.ndarray:
    """[n, dim] float32 rows with exactly ``nonzeros`` entries of +-1 and zeros elsewhere.

    Every row has norm 2, so L2 normalisation only halves it: all euclidean and cosine distances are exact in float32
    (whatever the summation order) and take a handful of values, i.e. exact ties everywhere.
    """
    cols = np.argsort(rng.random((n, dim)), axis=1)[:, :nonzeros]
    x = np.zeros((n, dim), np.float32)
    np.put_along_axis(x, cols, rng.choice(np.array([-1.0, 1.0], np.float32), (n, nonzeros)), axis=1)
    return x


def device_problem(rng: np.random.Generator, n_q: int = 45, n_g: int = 160) -> tuple[np.ndarray, ...]:
    """(q [Q, 6], g [G, 6], q_pids, g_pids, q_cams, g_cams): 6 cameras, distractors (pid 0), junk (pid -1), queries
    whose id is absent and a query whose only gallery images share its camera."""
    qp, gp = rng.integers(1, 13, n_q), rng.integers(0, 13, n_g)
    qc, gc = rng.integers(0, 6, n_q), rng.integers(0, 6, n_g)
    qp[:4] = 99  # absent from the gallery: skipped
    qp[4], qc[4] = 50, 2  # only same-camera images: skipped
    gp[:3], gc[:3] = 50, 2
    gp[5::11] = -1  # junk
    return ternary_features(rng, n_q), ternary_features(rng, n_g), qp, gp, qc, gc


def exact_distances(q: np.ndarray, g: np.ndarray, metric: str) -> np.ndarray:
    """Float64 [Q, G] distances of ``ternary_features`` (norm 2), computed independently of the library."""
    q64, g64 = q.astype(np.float64), g.astype(np.float64)
    if metric == "cosine":
        return 1.0 - (q64 / 2) @ (g64 / 2).T
    return ((q64[:, None, :] - g64[None, :, :]) ** 2).sum(-1)


def assert_same_metrics(got: dict, want: dict, abs_tol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    assert (got["num_valid_queries"], got["num_skipped"]) == (want["num_valid_queries"], want["num_skipped"])
    for key in ("mAP", "rank1", "rank5", "rank10", "mINP"):
        assert got[key] == pytest.approx(want[key], abs=abs_tol), key


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_reid_evaluate_torch_cpu_equals_numpy_and_reference(seed: int, metric: str) -> None:
    """The torch path run on the CPU against the numpy path and the plain per-query reference, with exact ties."""
    rng = np.random.default_rng(100 + seed)
    q, g, qp, gp, qc, gc = device_problem(rng)
    dist = exact_distances(q, g, metric)
    assert (np.diff(np.sort(dist, axis=1), axis=1) == 0).mean() > 0.9  # ties everywhere: order by gallery index
    with pytest.warns(UserWarning, match="person id -1"):
        want = reid_evaluate(q, g, qp, gp, qc, gc, max_rank=10, metric=metric)
    with pytest.warns(UserWarning, match="person id -1"):
        got = reid_evaluate(q, g, qp, gp, qc, gc, max_rank=10, metric=metric, device="cpu")
    assert_same_metrics(got, want)
    ref_cmc, ref_map, ref_minp, n_valid, _ = market_reference(dist, qp, gp, qc, gc, max_rank=10)
    assert got["num_valid_queries"] == n_valid and got["num_skipped"] == len(qp) - n_valid >= 5
    assert got["mAP"] == pytest.approx(ref_map, abs=1e-6) and got["mINP"] == pytest.approx(ref_minp, abs=1e-6)
    for k in (1, 5, 10):
        assert got[f"rank{k}"] == pytest.approx(ref_cmc[k - 1], abs=1e-6)
    # Tensors in (float64 features needing no grad tracking, tensor ids) give the same numbers.
    qt = torch.from_numpy(q).double().requires_grad_()
    with pytest.warns(UserWarning, match="person id -1"):
        from_tensors = reid_evaluate(qt, torch.from_numpy(g), torch.from_numpy(qp), torch.from_numpy(gp),
                                     torch.from_numpy(qc), gc.tolist(), max_rank=10, metric=metric, device="cpu")
    assert from_tensors == got


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_reid_evaluate_torch_chunked_equals_unchunked(metric: str) -> None:
    rng = np.random.default_rng(0)
    n_q, n_g = 2 * GEMM_TILE_ROWS + 37, 300  # three GEMM tiles, the last one partial
    qp, gp = rng.integers(1, 40, n_q), rng.integers(0, 40, n_g)
    qc, gc = rng.integers(0, 6, n_q), rng.integers(0, 6, n_g)
    q, g = clustered_features(rng, qp, gp, 24, 1.0)
    whole = reid_evaluate(q, g, qp, gp, qc, gc, memory_budget_mb=1024, metric=metric, device="cpu")
    tiny = reid_evaluate(q, g, qp, gp, qc, gc, memory_budget_mb=1e-3, metric=metric, device="cpu")  # 3 chunks
    assert tiny == whole  # bit-identical: every distance comes from a product of the same shape
    assert 0.05 < whole["mAP"] < 0.95 and whole["num_skipped"] == 0
    # Against numpy: torch and numpy may call different BLAS kernels (an ulp apart), which can only swap near-ties.
    assert_same_metrics(whole, reid_evaluate(q, g, qp, gp, qc, gc, metric=metric), abs_tol=1e-3)
    # Integer features (exact distances, many ties) in several chunks: equal to numpy to rounding.
    qi, gi = ternary_features(rng, n_q), ternary_features(rng, n_g)
    chunked = reid_evaluate(qi, gi, qp, gp, qc, gc, memory_budget_mb=1e-3, metric=metric, device="cpu")
    assert_same_metrics(chunked, reid_evaluate(qi, gi, qp, gp, qc, gc, metric=metric), abs_tol=1e-12)


def test_reid_evaluate_torch_warnings_and_errors() -> None:
    """The torch path warns and raises exactly as the numpy path does."""
    q = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="no query has a valid match in the gallery"):
        reid_evaluate(q, q, [1, 2, 3], [1, 2, 3], [0, 0, 0], [0, 0, 0], max_rank=2, device="cpu")
    with pytest.warns(UserWarning, match="person id -1"), pytest.raises(ValueError, match="same-camera matches"):
        reid_evaluate(q, q, [1, 2, 3], [-1, -1, -1], [0, 0, 0], [1, 1, 1], max_rank=2, device="cpu")
    # Short gallery: query (pid 1, cam 0); g0 pid 2 is nearer than the match g1 (pid 1, cam 1).
    qf, gf = np.zeros((1, 2), np.float32), np.array([[0.1, 0], [0.2, 0]], np.float32)
    with pytest.warns(UserWarning, match="fewer than max_rank"):
        res = reid_evaluate(qf, gf, [1], [2, 1], [0], [0, 1], max_rank=6, device="cpu")
    assert res == {"mAP": 0.5, "rank1": 0.0, "rank5": 1.0, "rank10": 1.0, "mINP": 0.5, "num_valid_queries": 1,
                   "num_skipped": 0}
    ids = ([1, 2, 3], [1, 2, 3], [0, 0, 0], [1, 1, 1])
    with pytest.raises(ValueError, match="differ in dimension"):
        reid_evaluate(q, np.ones((3, 5)), *ids, max_rank=2, device="cpu")
    with pytest.raises(ValueError, match="NaN or inf"):
        reid_evaluate(np.full((3, 4), np.nan), q, *ids, max_rank=2, device="cpu")
    with pytest.raises(ValueError, match="metric must be"):
        reid_evaluate(q, q, *ids, max_rank=2, metric="l1", device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_reid_evaluate_cuda_equals_cpu(metric: str) -> None:
    rng = np.random.default_rng(12)
    q, g, qp, gp, qc, gc = device_problem(rng, n_q=2 * GEMM_TILE_ROWS + 37, n_g=700)
    with pytest.warns(UserWarning, match="person id -1"):
        cpu = reid_evaluate(q, g, qp, gp, qc, gc, metric=metric, device="cpu")
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # as training leaves it: the evaluation must not use TF32
    try:
        with pytest.warns(UserWarning, match="person id -1"):
            cuda = reid_evaluate(q, g, qp, gp, qc, gc, metric=metric, device="cuda")
        with pytest.warns(UserWarning, match="person id -1"):  # a CUDA query tensor selects the device itself
            auto = reid_evaluate(torch.from_numpy(q).cuda(), torch.from_numpy(g).cuda(), qp, gp, qc, gc,
                                 metric=metric, memory_budget_mb=1e-3)
        assert torch.backends.cuda.matmul.allow_tf32 is True  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert_same_metrics(cuda, cpu, abs_tol=1e-12)  # exact distances: the same ranking
    assert auto == cuda  # chunked (3 chunks) == unchunked
    # Continuous features: the products may round differently from the CPU's, which can only swap near-ties.
    qp2, gp2 = rng.integers(1, 40, 600), rng.integers(0, 40, 2000)
    qc2, gc2 = rng.integers(0, 6, 600), rng.integers(0, 6, 2000)
    q2, g2 = clustered_features(rng, qp2, gp2, 64, 1.0)
    cuda2 = reid_evaluate(q2, g2, qp2, gp2, qc2, gc2, metric=metric, device="cuda")
    assert_same_metrics(cuda2, reid_evaluate(q2, g2, qp2, gp2, qc2, gc2, metric=metric, device="cpu"), 1e-3)
    assert reid_evaluate(q2, g2, qp2, gp2, qc2, gc2, metric=metric, device="cuda", memory_budget_mb=1e-3) == cuda2


# --------------------------------------------------------------------------------------------------- re-ranking

def test_rerank_keeps_a_perfect_ranking() -> None:
    """Well separated identities: re-ranking must keep every true match ahead of every other item."""
    rng = np.random.default_rng(4)
    n_ids, dim = 6, 8
    centres = 10 * rng.standard_normal((n_ids, dim))
    qp, gp = np.repeat(np.arange(1, n_ids + 1), 2), np.repeat(np.arange(1, n_ids + 1), 5)
    qc, gc = np.zeros(len(qp), np.int64), np.tile(np.arange(1, 6), n_ids)
    q = (centres[qp - 1] + 0.1 * rng.standard_normal((len(qp), dim))).astype(np.float32)
    g = (centres[gp - 1] + 0.1 * rng.standard_normal((len(gp), dim))).astype(np.float32)

    def sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    final = k_reciprocal_rerank(sq(q, g), sq(q, q), sq(g, g), k1=8, k2=3, lambda_value=0.3)
    assert final.shape == (len(qp), len(gp)) and np.all(np.isfinite(final))
    cmc, m_ap, m_inp = reid_cmc_map(final, qp, gp, qc, gc, max_rank=5)
    assert m_ap == 1.0 and m_inp == 1.0 and cmc[0] == 1.0
    res = reid_evaluate(q, g, qp, gp, qc, gc, max_rank=5, rerank=True, k1=8, k2=3)
    assert res["mAP"] == 1.0 and res["rank1"] == 1.0
    # A device does not apply to re-ranking: it falls back to the same CPU implementation.
    assert reid_evaluate(q, g, qp, gp, qc, gc, max_rank=5, rerank=True, k1=8, k2=3, device="cpu") == res


def test_rerank_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="shapes"):
        k_reciprocal_rerank(np.zeros((2, 3)), np.zeros((3, 3)), np.zeros((3, 3)))


def rerank_reference(qg: np.ndarray, qq: np.ndarray, gg: np.ndarray, k1: int, k2: int, lam: float,
                     strict: bool = True) -> tuple[np.ndarray, int]:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) written from the paper, one item at a time, in float64.

    Semantics of the authors' released code (also torchreid's and reid-strong-baseline's): the pooled distance
    matrix (queries first) is divided row-wise by its maximum; N(p, k) is the first k + 1 items of p's ranking
    (Python slicing, so k beyond the pool means everyone); R(p, k) keeps those holding p in their own N(., k);
    a candidate q in R(p, k1) adds R(q, round(k1 / 2)) (numpy's round half to even) when *more than* two thirds
    of it lies in R(p, k1) (``strict=False``: at least two thirds, the rule this test must tell apart); V_p holds
    exp(-d) on the expanded set, normalised; V_p becomes the mean of V over p's first k2 items when k2 > 1; the
    Jaccard distance is 1 - sum(min) / sum(max); the result (1 - lam) * jaccard + lam * d.

    Returns the [Q, G] distances and how many candidate checks had an overlap of exactly two thirds.
    """
    d = np.block([[qq, qg], [qg.T, gg]]).astype(np.float64)
    n, n_q = len(d), len(qq)
    d = d / d.max(axis=1, keepdims=True)
    ranking = [sorted(range(n), key=lambda j, i=i: (d[i, j], j)) for i in range(n)]

    def reciprocal(i: int, k: int) -> list[int]:
        return [j for j in ranking[i][: k + 1] if i in ranking[j][: k + 1]]

    half, exact_ties = int(np.around(k1 / 2)), 0
    v = np.zeros((n, n))
    for p in range(n):
        r_p = reciprocal(p, k1)
        expanded = set(r_p)
        for q in r_p:
            r_q = reciprocal(q, half)
            overlap = len(set(r_q) & set(r_p))
            exact_ties += 3 * overlap == 2 * len(r_q)
            if overlap > 2 / 3 * len(r_q) or (not strict and overlap >= 2 / 3 * len(r_q)):
                expanded |= set(r_q)
        members = sorted(expanded)
        w = np.exp(-d[p, members])
        v[p, members] = w / w.sum()
    if k2 > 1:
        v = np.array([v[ranking[p][:k2]].mean(axis=0) for p in range(n)])
    jaccard = np.array([[1 - np.minimum(v[i], v[n_q + j]).sum() / np.maximum(v[i], v[n_q + j]).sum()
                         for j in range(n - n_q)] for i in range(n_q)])
    return (1 - lam) * jaccard + lam * d[:n_q, n_q:], exact_ties


def pooled_distances(rng: np.random.Generator, n_q: int, n_g: int, dim: int) -> tuple[np.ndarray, ...]:
    """Squared euclidean q-g, q-q, g-g distances (float32) of clustered random points (a few identities)."""
    centres = rng.standard_normal((4, dim)) * 2
    x = centres[rng.integers(0, 4, n_q + n_g)] + rng.standard_normal((n_q + n_g, dim))
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1).astype(np.float32)
    return d[:n_q, n_q:], d[:n_q, :n_q], d[n_q:, n_q:]


@pytest.mark.parametrize(("seed", "k1", "k2", "lam"), [
    (0, 6, 3, 0.3), (1, 6, 3, 0.3), (2, 8, 4, 0.3), (3, 20, 6, 0.3),  # (20, 6, 0.3): the paper's setting
    (4, 5, 1, 0.5),  # k1 odd: round(2.5) = 2 (half to even); k2 = 1: no query expansion
    (5, 7, 2, 0.0),  # round(3.5) = 4; lambda 0: Jaccard only
    (6, 60, 3, 0.0),  # k1 beyond the pool (N = 40): every item is a k-reciprocal neighbour of every other
    (7, 1, 2, 0.3),  # k1 = 1: round(0.5) = 0, R(q, 0) is q alone
])
def test_rerank_matches_an_independent_implementation(seed: int, k1: int, k2: int, lam: float) -> None:
    rng = np.random.default_rng(seed)
    qg, qq, gg = pooled_distances(rng, 10, 30, 3)
    want, exact_ties = rerank_reference(qg, qq, gg, k1, k2, lam)
    got = k_reciprocal_rerank(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam)
    assert got.shape == (10, 30) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rerank_two_thirds_overlap_is_not_enough(seed: int) -> None:
    """Cases holding candidates whose overlap is exactly 2/3, where ``>=`` and the reference's ``>`` disagree."""
    rng = np.random.default_rng(seed)
    qg, qq, gg = pooled_distances(rng, 10, 30, 3)
    want, exact_ties = rerank_reference(qg, qq, gg, 6, 3, 0.3)
    inclusive, _ = rerank_reference(qg, qq, gg, 6, 3, 0.3, strict=False)
    assert exact_ties > 0 and np.abs(inclusive - want).max() > 1e-3  # the case tells the two rules apart
    np.testing.assert_allclose(k_reciprocal_rerank(qg, qq, gg, k1=6, k2=3), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"k1": 1.5}, "k1 must be a positive integer"),
    ({"k1": True}, "k1 must be a positive integer"),
    ({"k2": 0}, "k2 must be a positive integer"),
    ({"lambda_value": 1.5}, "lambda_value"),
])
def test_rerank_rejects_bad_parameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        k_reciprocal_rerank(np.ones((2, 3)), np.ones((2, 2)), np.ones((3, 3)), **kwargs)


# ------------------------------------------------------------------------------------------ kNN search & friends

def brute_force(q: np.ndarray, g: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    q, g = q.astype(np.float64), g.astype(np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        scores = q @ g.T
        idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    else:
        scores = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
        idx = np.argsort(scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, idx, axis=1), idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_search_chunked_equals_brute_force(backend: str, metric: str) -> None:
    rng = np.random.default_rng(1)
    q, g = rng.standard_normal((70, 12)).astype(np.float32), rng.standard_normal((400, 12)).astype(np.float32)
    k = 7
    want_v, want_i = brute_force(q, g, k, metric)
    full = brute_force(q, g, 400, metric)[0]
    gaps = np.abs(np.diff(full[:, : k + 1], axis=1))
    assert gaps.min() > 1e-5  # the seed has no near-tie, so indices must agree exactly
    whole_v, whole_i = knn_search(q, g, k, metric, memory_budget_mb=1024, backend=backend)
    tiny_v, tiny_i = knn_search(q, g, k, metric, memory_budget_mb=4 * 400 * 8 / 2**20, backend=backend)  # 8 rows
    one_v, one_i = knn_search(q, g, k, metric, memory_budget_mb=1e-9, backend=backend)  # one row per block
    for v, i in ((whole_v, whole_i), (tiny_v, tiny_i), (one_v, one_i)):
        assert v.shape == (70, k) and v.dtype == np.float32 and i.dtype == np.int64
        np.testing.assert_array_equal(i, want_i)
        np.testing.assert_allclose(v, want_v, rtol=1e-5, atol=1e-5)


def test_knn_search_auto_backend_and_tensor_input() -> None:
    rng = np.random.default_rng(6)
    q, g = rng.standard_normal((10, 5)), rng.standard_normal((30, 5))
    v, i = knn_search(torch.from_numpy(q), torch.from_numpy(g), 3)
    np.testing.assert_array_equal(i, brute_force(q, g, 3, "cosine")[1])
    with pytest.raises(ValueError, match="k must lie"):
        knn_search(q, g, 31)


def test_knn_search_orders_ties_by_index() -> None:
    g = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0]], np.float32)  # g0, g2, g3 tie for [1, 0]
    for backend in BACKENDS:
        v, i = knn_search(np.array([[1.0, 0.0]], np.float32), g, 3, backend=backend)
        np.testing.assert_array_equal(i, [[0, 2, 3]])
        np.testing.assert_allclose(v, [[1, 1, 1]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_knn_search_cuda_equals_cpu() -> None:
    rng = np.random.default_rng(8)
    q, g = rng.standard_normal((50, 16)).astype(np.float32), rng.standard_normal((300, 16)).astype(np.float32)
    want_v, want_i = brute_force(q, g, 5, "cosine")
    v, i = knn_search(torch.from_numpy(q).cuda(), g, 5, memory_budget_mb=0.01)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_allclose(v, want_v, rtol=1e-4, atol=1e-4)


def test_knn_classify_majority_vote() -> None:
    # 1-d points, euclidean. Query at 0: neighbours by distance g0 (0.1, "a"), g1 (0.2, "b"), g2 (0.3, "b"),
    # g3 (0.4, "a"), g4 (0.5, "c").
    g = np.array([[0.1], [0.2], [0.3], [0.4], [0.5]], np.float32)
    labels = np.array(["a", "b", "b", "a", "c"])
    q = np.zeros((1, 1), np.float32)
    assert knn_classify(q, g, labels, k=1, metric="euclidean")[0] == "a"  # nearest
    assert knn_classify(q, g, labels, k=3, metric="euclidean")[0] == "b"  # 2 votes of 3
    assert knn_classify(q, g, labels, k=4, metric="euclidean")[0] == "a"  # 2-2 tie: "a" holds the nearest
    assert knn_classify(q, g, labels, k=5, metric="euclidean")[0] == "a"  # 2-2-1: same
    # Against a brute-force vote on random data (integer labels keep their dtype).
    rng = np.random.default_rng(9)
    qx, gx = rng.standard_normal((40, 6)), rng.standard_normal((150, 6))
    gl = rng.integers(0, 4, 150)
    _, idx = brute_force(qx, gx, 7, "cosine")
    want = []
    for row in idx:
        votes = [int(gl[j]) for j in row]
        best = max(votes.count(v) for v in votes)
        want.append(next(v for v in votes if votes.count(v) == best))
    pred = knn_classify(qx, gx, gl, k=7)
    np.testing.assert_array_equal(pred, want)
    assert pred.dtype == gl.dtype


def test_recall_at_k_against_brute_force() -> None:
    rng = np.random.default_rng(10)
    ql, gl = rng.integers(0, 8, 60), rng.integers(0, 8, 200)
    ql[:3] = 99  # a class missing from the gallery: always a miss
    q, g = rng.standard_normal((60, 10)), rng.standard_normal((200, 10))
    got = recall_at_k(q, ql, g, gl, ks=(1, 5, 10))
    _, idx = brute_force(q, g, 10, "cosine")
    for k in (1, 5, 10):
        want = np.mean([any(gl[j] == ql[i] for j in idx[i, :k]) for i in range(60)])
        assert got[f"recall@{k}"] == pytest.approx(want)
    assert list(got) == ["recall@1", "recall@5", "recall@10"]
    assert recall_at_k(q, ql, g, gl, ks=(500,))["recall@500"] == pytest.approx(57 / 60)  # K > G: whole gallery


def test_recall_at_k_without_queries_raises() -> None:
    g, gl = np.eye(3, dtype=np.float32), np.array([0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NaN with a RuntimeWarning: a clear error instead
        with pytest.raises(ValueError, match="no query"):
            recall_at_k(np.zeros((0, 3), np.float32), np.zeros(0, np.int64), g, gl)


@pytest.mark.parametrize("ks", [(1.5,), (True,), ("1",), (1, 0), (), 5])
def test_recall_at_k_ks_must_be_positive_integers(ks: object) -> None:
    x, y = np.eye(3, dtype=np.float32), np.array([0, 1, 2])
    with pytest.raises(ValueError, match="ks must be"):
        recall_at_k(x, y, x, y, ks=ks)


def test_recall_at_k_accepts_numpy_integer_ks() -> None:
    x, y = np.eye(3, dtype=np.float32), np.array([0, 1, 2])
    assert recall_at_k(x, y, x, y, ks=np.array([1, 2])) == {"recall@1": 1.0, "recall@2": 1.0}


@pytest.mark.parametrize("k", [1.5, True, 2.0, "2"])
def test_knn_k_must_be_a_positive_integer(k: object) -> None:
    x, y = np.eye(3, dtype=np.float32), np.array([0, 1, 2])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        knn_search(x, x, k)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        knn_classify(x, x, y, k)
    assert knn_search(x, x, np.int64(2))[1].shape == (3, 2)


def test_recall_at_k_exclude_self() -> None:
    # Two points per class; with the query set as gallery, each point's nearest other point is its twin.
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0], [-0.9, -0.1]], np.float32)
    y = np.array([0, 0, 1, 1, 2, 2])
    assert recall_at_k(x, y, x, y, ks=(1,), exclude_self=True)["recall@1"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert recall_at_k(x, y, x, y, ks=(1,))["recall@1"] == 1.0  # trivially: itself
    y_odd = np.array([0, 1, 2, 3, 4, 5])  # no twin at all: nothing to find once self is excluded
    assert recall_at_k(x, y_odd, x, y_odd, ks=(1, 5), exclude_self=True) == {"recall@1": 0.0, "recall@5": 0.0}


def leave_one_out_reference(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """The CUB / SOP protocol written out: each item with another of its class ranks every other item by cosine
    similarity (float64, ties by index); a hit when one of the first k has its class."""
    unit = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    hits = []
    for i in range(len(x)):
        if (y == y[i]).sum() < 2:
            continue
        others = np.array([j for j in range(len(x)) if j != i])
        order = others[np.argsort(-(unit[others] @ unit[i]), kind="stable")]
        hits.append(bool((y[order[:k]] == y[i]).any()))
    return float(np.mean(hits))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_leave_one_out_recall_equals_the_protocol_written_out(device: str) -> None:
    rng = np.random.default_rng(11)
    y = rng.integers(0, 12, 200)
    y[:3] = [100, 101, 102]  # three classes of one image: no query, still in the others' galleries
    x = rng.standard_normal((12, 16))[y % 12] + 1.2 * rng.standard_normal((200, 16))
    x[10] = x[11]  # an exact duplicate pair: ties with self are broken without losing a neighbour
    got, counted = leave_one_out_recall(x.astype(np.float32), y, ks=(1, 5, 500), device=device)
    assert counted == 197
    for k in (1, 5):
        assert got[f"recall@{k}"] == pytest.approx(leave_one_out_reference(x, y, k))
    assert 0.1 < got["recall@1"] < 0.9 and got["recall@500"] == 1.0  # K beyond the gallery: all the others
    with pytest.raises(ValueError, match="no item has another item of its class"):
        leave_one_out_recall(x[:3], y[:3])


# ------------------------------------------------------------------------ re-ranking in the retrieval protocol

def retrieval_problem(seed: int, n_q: int = 12, n_g: int = 36, classes: int = 4, dim: int = 8
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Query-first features [Q + G, D] of overlapping class clusters, and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim))
    labels = np.concatenate([np.arange(n_q) % classes, np.arange(n_g) % classes])
    return (centres[labels] + 0.9 * rng.standard_normal((n_q + n_g, dim))).astype(np.float32), labels


def reranked_reference(feats: np.ndarray, labels: np.ndarray, n_q: int, ks: tuple[int, ...], knn_k: int
                       ) -> dict[str, float]:
    """knn_recall@K and kNN accuracy from the re-ranked distances, with numpy and the paper-written re-ranking above:
    cosine geometry (squared euclidean distance of the unit vectors), k1 = 20, k2 = 6, lambda = 0.3."""
    from sklearn.metrics import f1_score

    x = feats.astype(np.float64) / np.linalg.norm(feats, axis=1, keepdims=True)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    dist, _ = rerank_reference(d[:n_q, n_q:], d[:n_q, :n_q], d[n_q:, n_q:], 20, 6, 0.3)
    ql, gl = labels[:n_q], labels[n_q:]
    out = {}
    for k in ks:
        out[f"knn_recall@{k}"] = float(np.mean([(gl[np.argsort(row, kind="stable")[:k]] == lab).any()
                                               for row, lab in zip(dist, ql)]))
    pred = []
    for row in dist:
        near = gl[np.argsort(row, kind="stable")[:knn_k]]
        counts = {lab: (near == lab).sum() for lab in near}
        best = max(counts.values())
        pred.append(next(lab for lab in near if counts[lab] == best))  # a tie goes to the nearest
    out["knn_acc"] = float(np.mean(np.array(pred) == ql))
    classes = np.union1d(ql, gl)
    out["knn_macro_f1"] = float(f1_score(ql, pred, labels=classes, average="macro", zero_division=0))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_metrics_with_rerank_are_those_of_the_reranked_distances(seed: int) -> None:
    """eval.rerank on a retrieval (not re-id) run: knn_recall@K and the kNN vote come from the k-reciprocal re-ranked
    distances, recomputed here with numpy, and differ from the plain ranking's."""
    from vistrain.engine.tasks import RetrievalEval, embedding_metrics

    feats, labels = retrieval_problem(seed)
    ks = (1, 3, 5)
    plain = embedding_metrics(feats, RetrievalEval(12, labels, None, knn_k=5, recall_ks=ks))
    reranked = embedding_metrics(feats, RetrievalEval(12, labels, None, knn_k=5, recall_ks=ks, rerank=True))
    want = reranked_reference(feats, labels, 12, ks, knn_k=5)
    assert reranked == pytest.approx(want, abs=1e-9)
    assert reranked != plain


@pytest.mark.parametrize("k2", [1, 2])
def test_rerank_equals_the_papers_steps_worked_by_hand(k2: int) -> None:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017, Sec. 3 and the authors' released steps) worked by hand on
    six points of a line, one query (x = 0) and five gallery items, squared euclidean distances (the exponent
    reid-strong-baseline uses; torchreid's engine squares its already squared matrix again, d^4), k1 = 2, lambda
    0.3. Every set below is derived in the comments from the distances, not from vistrain.

    Positions 0, 1, 1.5, 4, 4.2, 9 (item 0 the query). Each row is divided by its maximum (81, 64, 56.25, 25,
    23.04, 81). N(p, k1 = 2), the 3 nearest with p: 0:{0,1,2} 1:{1,2,0} 2:{2,1,0} 3:{3,4,2} 4:{4,3,2} 5:{5,4,3}.
    R(p, 2), those holding p in their own N: 0,1,2:{0,1,2}  3,4:{3,4}  5:{5}. R(p, round(k1/2) = 1), from the
    2 nearest: 0:{0} 1,2:{1,2} 3,4:{3,4} 5:{5}. Expansion (|R(q,1) & R(p)| > 2/3 |R(q,1)|) adds nothing new:
    R*(p) = R(p, 2). V_p = exp(-d(p, j)) on R*(p), summing to 1. k2 = 2: V_p becomes the mean of V over p and its
    nearest item (0->1, 1->2, 2->1, 3->4, 4->3, 5->4). Jaccard = 1 - sum min / sum max; final = 0.7 J + 0.3 d."""
    x = np.array([0.0, 1.0, 1.5, 4.0, 4.2, 9.0])
    d = (x[:, None] - x[None, :]) ** 2
    scaled = d / d.max(axis=1, keepdims=True)
    support = {0: [0, 1, 2], 1: [0, 1, 2], 2: [0, 1, 2], 3: [3, 4], 4: [3, 4], 5: [5]}
    v = np.zeros((6, 6))
    for p, members in support.items():
        w = np.exp(-scaled[p, members])
        v[p, members] = w / w.sum()
    if k2 == 2:
        partner = {0: 1, 1: 2, 2: 1, 3: 4, 4: 3, 5: 4}
        v = np.stack([(v[p] + v[partner[p]]) / 2 for p in range(6)])
    jaccard = [1.0 - np.minimum(v[0], v[g]).sum() / np.maximum(v[0], v[g]).sum() for g in range(1, 6)]
    want = 0.7 * np.array(jaccard) + 0.3 * scaled[0, 1:]

    got = k_reciprocal_rerank(d[:1, 1:], d[:1, :1], d[1:, 1:], k1=2, k2=k2, lambda_value=0.3)
    np.testing.assert_allclose(got[0], want, rtol=1e-6, atol=1e-7)
    assert list(np.argsort(got[0])) == [0, 1, 2, 3, 4]  # the near pair first, the far item last
