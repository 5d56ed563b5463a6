"""The Market-1501 ranking core on a torch device (a GPU, or the CPU): the full stable ranking of every row.

Per chunk of queries: one matrix product, a stable ``torch.sort`` of each row, a cumulative sum over the kept items for
their positions, and AP / CMC / INP from the match positions, all on the device; only per-query results come back.
Faiss cannot serve exact mAP there: its GPU search caps ``k`` at 2,048.
"""

from __future__ import annotations

import numpy as np
import torch

from vistrain.metrics._common import ArrayLike
from vistrain.metrics.retrieval._common import GEMM_TILE_ROWS, Metric, _chunk_rows
from vistrain.metrics.retrieval.distances import _fill_distances_torch, _ieee_fp32_matmul, _prepare_features_torch
from vistrain.metrics.retrieval.ranking import _GalleryGroups

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
