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

Speed: on the CPU a ranking is never fully argsorted (value sort + binary search for the few same-id items, see
``ranking``); on a torch device (``reid_evaluate(..., device="cuda")`` or a CUDA query tensor) each row is fully and
stably ranked on the device and only per-query results come back (``ranking_torch``).

Retrieval: ``knn_search`` (Faiss on the CPU when installed, a chunked torch matrix product + ``topk`` otherwise or on
a CUDA device), ``recall_at_k``, ``leave_one_out_recall`` (each item against all the others: the class-disjoint
protocol of CUB / SOP) and ``knn_classify``; from a distance matrix (re-ranked, say): ``nearest_by_distance``,
then ``recall_from_neighbours`` and ``knn_vote``. ``k_reciprocal_rerank`` (``rerank_features`` from features)
implements Zhong et al. (2017), for re-id and retrieval alike.

Array arguments may be numpy arrays, torch tensors (any device) or sequences. Faiss is imported inside the functions
that use it, so this package imports without it.

Modules: ``reid`` (the public re-id functions), ``ranking`` / ``ranking_torch`` (the two ranking cores),
``distances`` (chunked distance blocks), ``rerank``, ``search`` (kNN, Recall@K), ``_common`` (argument checks).
"""

from vistrain.metrics.retrieval._common import GEMM_TILE_ROWS, Metric
from vistrain.metrics.retrieval.distances import distance_matrix_chunks
from vistrain.metrics.retrieval.ranking import NO_VALID_QUERY, ReidResult
from vistrain.metrics.retrieval.ranking_torch import TORCH_PAIR_BYTES
from vistrain.metrics.retrieval.reid import reid_cmc_map, reid_cmc_map_detailed, reid_evaluate
from vistrain.metrics.retrieval.rerank import k_reciprocal_rerank, rerank_features
from vistrain.metrics.retrieval.search import (
    first_hit_positions,
    knn_classify,
    knn_search,
    knn_vote,
    leave_one_out_recall,
    nearest_by_distance,
    recall_at_k,
    recall_from_neighbours,
    recall_neighbours,
)

__all__ = [
    "GEMM_TILE_ROWS",
    "NO_VALID_QUERY",
    "TORCH_PAIR_BYTES",
    "Metric",
    "ReidResult",
    "distance_matrix_chunks",
    "first_hit_positions",
    "k_reciprocal_rerank",
    "knn_classify",
    "knn_search",
    "knn_vote",
    "leave_one_out_recall",
    "nearest_by_distance",
    "recall_at_k",
    "recall_from_neighbours",
    "recall_neighbours",
    "reid_cmc_map",
    "reid_cmc_map_detailed",
    "reid_evaluate",
    "rerank_features",
]
