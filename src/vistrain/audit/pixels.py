"""The pixel evidence of near duplicates: how alike two thumbnails are once a crop of up to 5% is undone.

Each image is described by its stored thumbnail (``scan.THUMB_SIDE`` px, RGB) resampled to ``SIDE`` x ``SIDE``,
every colour channel minus its mean, the whole L2-normalised: the inner product of two descriptors is their
normalised correlation, which a brightness change (a gain) or a JPEG re-encode (noise the area average smooths
away) leaves near 1. A crop shifts and enlarges the content, which correlation does not forgive, so the crop is
undone instead: ``VARIANTS`` are the crops of an image (scale 1 to 0.95 of the side, anchored at either edge or
the centre) and ``aligned_similarity(u, v)`` is the best correlation of a crop of ``u`` with the whole of ``v``.
Each variant is two small matrix products (the separable area-averaged bilinear resampling of ``crop_matrix``).
"""

from __future__ import annotations

import numpy as np

SIDE = 16  # descriptor side: 16 x 16 x 3 = 768 values
SUPERSAMPLE = 4  # points per output pixel and axis averaged by the resampling (an anti-aliased shrink)
SCALES = (0.9833, 0.9667, 0.95)  # crop side / image side: a crop of up to 5% of each side, grid step 1.7%
OFFSETS = (0.0, 0.5, 1.0)  # where the crop sits along each axis: at the start, centred, at the end
VARIANTS: tuple[tuple[float, float, float], ...] = ((1.0, 0.5, 0.5),) + tuple(
    (s, ox, oy) for s in SCALES for oy in OFFSETS for ox in OFFSETS)  # (scale, x offset, y offset); first: whole
BLOCK = 512  # images resampled at once: [512, 28 variants, 768] float32 = 44 MB
EDGE_BUDGET = 64 * 2**20  # bytes of candidate descriptors gathered at once by aligned_similarity


def crop_matrix(size_in: int, scale: float, offset: float, size_out: int = SIDE) -> np.ndarray:
    """[size_out, size_in]: row j averages ``SUPERSAMPLE`` linearly interpolated points of output pixel j of the
    crop that spans ``scale`` of the axis, starting at ``offset`` x (1 - scale) of it."""
    start, length = offset * (1.0 - scale) * size_in, scale * size_in
    points = start + (np.arange(size_out * SUPERSAMPLE) + 0.5) * length / (size_out * SUPERSAMPLE) - 0.5
    low = np.floor(points)
    frac = points - low
    out = np.zeros((size_out * SUPERSAMPLE, size_in))
    rows = np.arange(len(points))
    np.add.at(out, (rows, np.clip(low, 0, size_in - 1).astype(int)), 1.0 - frac)
    np.add.at(out, (rows, np.clip(low + 1, 0, size_in - 1).astype(int)), frac)
    return out.reshape(size_out, SUPERSAMPLE, size_in).mean(axis=1)


def descriptors(thumbs: np.ndarray, variants: tuple[tuple[float, ...], ...] = VARIANTS) -> np.ndarray:
    """[B, S, S, 3] uint8 thumbnails -> [B, len(variants), SIDE * SIDE * 3] float32 unit vectors. A variant is
    (scale, x offset, y offset), or (x scale, y scale, x offset, y offset) for a cut of another aspect."""
    b, side = thumbs.shape[0], thumbs.shape[1]
    x = thumbs.astype(np.float32).transpose(1, 0, 3, 2).reshape(side, -1)  # [S(y), B * 3 * S(x)]: one product
    out = np.empty((b, len(variants), 3 * SIDE * SIDE), dtype=np.float32)
    rows: dict[tuple[float, float], np.ndarray] = {}
    for v, variant in enumerate(variants):
        sx, sy, ox, oy = variant if len(variant) == 4 else (variant[0], *variant)
        if (sy, oy) not in rows:  # the vertical pass is shared by the variants of one scale and row offset
            rows[sy, oy] = (crop_matrix(side, sy, oy).astype(np.float32) @ x).reshape(-1, side)
        cols = rows[sy, oy] @ crop_matrix(side, sx, ox).astype(np.float32).T  # [SIDE(y) * B * 3, SIDE(x)]
        img = cols.reshape(SIDE, b, 3, SIDE).transpose(1, 2, 0, 3)  # [B, 3, SIDE(y), SIDE(x)]
        img = img - img.mean(axis=(2, 3), keepdims=True)  # each colour channel minus its mean
        flat = img.reshape(b, -1)
        out[:, v] = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-6)
    return out


def whole(thumbs: np.ndarray) -> np.ndarray:
    """[N, D] descriptors of the whole images (no crop), in blocks."""
    return np.concatenate([descriptors(thumbs[i: i + BLOCK], VARIANTS[:1])[:, 0]
                           for i in range(0, len(thumbs), BLOCK)] or [np.zeros((0, 3 * SIDE * SIDE), np.float32)])


def aligned_similarity(thumbs: np.ndarray, full: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """[E]: for each directed edge, the best correlation of a crop (``VARIANTS``) of ``src`` with the whole of
    ``dst``; ``full`` [N, D] = ``whole(thumbs)``. Call it with both directions of a pair: the crop may be of
    either image. Sources are resampled once each, in blocks; each block's edges are one batched product."""
    out = np.empty(len(src), dtype=np.float32)
    if not len(src):
        return out
    order = np.argsort(src, kind="stable")
    nodes, starts, counts = np.unique(src[order], return_index=True, return_counts=True)
    by_degree = np.argsort(counts, kind="stable")  # similar edge counts share a block: little padding
    lo = 0
    while lo < len(nodes):
        width = int(counts[by_degree[min(lo + BLOCK, len(nodes)) - 1]])  # the block's largest edge count
        pick = by_degree[lo: lo + min(BLOCK, max(1, EDGE_BUDGET // (width * full.shape[1] * 4)))]
        lo += len(pick)
        var = descriptors(thumbs[nodes[pick]])  # [U, V, D]
        slot = np.arange(int(counts[pick].max()))
        valid = slot[None, :] < counts[pick][:, None]  # [U, width]
        edge = order[np.minimum(starts[pick][:, None] + slot[None, :], len(order) - 1)]  # [U, width]
        best = np.matmul(full[dst[edge]], var.transpose(0, 2, 1)).max(axis=2)  # [U, width, D] x [U, D, V] -> [U, width]
        out[edge[valid]] = best[valid]
    return out
