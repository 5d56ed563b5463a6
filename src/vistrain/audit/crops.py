"""Crops kept at their own size: a copy cut from an image and saved without resizing is a window of its pixels.

Among look-alikes (studio shots of one product, renders of one object) the thumbnail rule of ``duplicates.py``
cannot see such a copy: cutting 2-5% off changes a 16 px thumbnail more than the look-alikes differ from each
other. The sizes say more. A smaller image whose sides are each ``MIN_SIDE_RATIO`` to 1 of a larger one's may be a
crop of it, at exactly that scale; two steps decide:

1. **Candidates** (thumbnails): the larger images' thumbnails are cut at that exact scale, at every whole-pixel
   position of the cut (up to ``MAX_PLACES`` a side, evenly spread beyond), and correlated with the smaller
   image's whole thumbnail (``pixels``); each smaller image keeps its ``CANDIDATES`` best larger images. The work
   is bounded (``BUDGET`` multiply-adds, ``MAX_SIZES`` distinct sizes, ``MAX_VERIFIED`` images verified); what
   is left out is counted in ``audit.json``.
2. **Verification** (full resolution): the smaller image is slid over each candidate at every whole-pixel offset
   (mean-removed normalised correlation, ``window_distance``); its distance is 1 - the best score. The best
   candidate is the source when its distance is at most ``FINE_RATIO`` of the next candidate's: the copy stands
   out from the image's look-alikes by its own pixels, whatever their absolute level.

A crop saved losslessly is ~0 from its source. A crop that was also re-encoded or resized keeps the thumbnail
rule's evidence only, and images larger than ``MAX_SIDE`` are compared at a reduced size (a window on a
fractional grid no longer matches exactly: the thumbnail rule is the one for large photos).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from vistrain.audit import pixels

MIN_SIDE_RATIO = 0.9  # a crop keeps at least this share of each side (up to 5% cut from each end, with margin)
MAX_PLACES = 9  # positions of the cut tried along each axis: every whole pixel of the size difference, up to this
CANDIDATES = 6  # larger images verified per smaller image (the source, and the look-alikes it must beat)
FINE_RATIO = 0.1  # the source's full-resolution distance, at most this share of the next candidate's
FINE_EPS = 1e-6  # full-resolution distances below this are float noise: equal
BUDGET = 4e9  # multiply-adds of the candidate search (about 2-4 s on two cores)
MAX_SIZES = 2_000  # distinct image sizes beyond which the search is not tried (every photo its own size)
MAX_VERIFIED = 1_000  # smaller images verified at full resolution (those whose best cut correlates most first)
MAX_SIDE = 192  # longer sides are compared at this size (the offsets grow with its square)
BLOCK = 128  # larger images cut at once: [128 x 81 cuts, 768] float32 = 32 MB


def size_pairs(sizes: np.ndarray) -> list[tuple[int, int]]:
    """(larger, smaller) indices into ``sizes`` [K, 2] (width, height, distinct) where the smaller may be a crop
    of the larger: each side MIN_SIDE_RATIO..1 of the larger's, not both equal."""
    w, h = sizes[:, 0][:, None].astype(float), sizes[:, 1][:, None].astype(float)
    rw, rh = w.T / w, h.T / h  # [larger, smaller]: the smaller's side over the larger's
    ok = (rw >= MIN_SIDE_RATIO) & (rw <= 1) & (rh >= MIN_SIDE_RATIO) & (rh <= 1) & ((rw < 1) | (rh < 1))
    return [(int(a), int(b)) for a, b in zip(*np.nonzero(ok))]


def crop_pairs(thumbs: np.ndarray, width: np.ndarray, height: np.ndarray, nodes: np.ndarray,
               load: Callable[[int], np.ndarray]) -> tuple[pd.DataFrame, dict]:
    """Crops among ``nodes`` (item indices): a DataFrame ``a`` (the crop), ``b`` (its source), ``similarity``
    (1 - full-resolution distance), ``ratio`` (that distance over the next candidate's), ``z`` (nan); and the
    figures for audit.json. ``load(item)`` gives an item's RGB pixels [H, W, 3] uint8."""
    empty = pd.DataFrame({"a": [], "b": [], "similarity": [], "ratio": [], "z": []})
    dims = np.stack([width[nodes], height[nodes]], axis=1)
    sizes, size_of = np.unique(dims, axis=0, return_inverse=True)
    size_of = size_of.ravel()
    figures: dict = {"sizes": int(len(sizes))}
    if len(sizes) > MAX_SIZES:
        figures["skipped"] = f"{len(sizes)} distinct image sizes (more than {MAX_SIZES})"
        return empty, figures
    members = [nodes[size_of == k] for k in range(len(sizes))]
    pairs = sorted(size_pairs(sizes), key=lambda p: len(members[p[0]]) * len(members[p[1]]))
    places = [_places(sizes[lg], sizes[sm]) for lg, sm in pairs]
    cost = [len(members[lg]) * len(members[sm]) * len(px) * len(py) * pixels.SIDE ** 2 * 3
            for (lg, sm), (px, py) in zip(pairs, places)]
    within = np.cumsum(cost) <= BUDGET
    figures |= {"size_pairs": len(pairs), "size_pairs_skipped": int((~within).sum())}
    best: dict[int, list[tuple[float, int]]] = {}  # smaller item -> [(thumbnail similarity, larger item)]
    for (lg, sm), where, go in zip(pairs, places, within):
        if go:
            _search(thumbs, members[lg], members[sm], sizes[sm] / sizes[lg], where, best)
    ready = sorted(((found[0][0], small) for small, found in best.items() if len(found) >= 2), reverse=True)
    figures["verified"], figures["not_verified"] = min(len(ready), MAX_VERIFIED), max(len(ready) - MAX_VERIFIED, 0)
    rows = [_verify(small, [b for _, b in best[small]], load) for _, small in ready[:MAX_VERIFIED]]
    rows = [r for r in rows if r is not None]
    figures["crops"] = len(rows)
    return (pd.DataFrame(rows, columns=["a", "b", "similarity", "ratio", "z"]) if rows else empty), figures


def _places(larger: np.ndarray, smaller: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where a cut of ``smaller``'s size (width, height) may sit in ``larger``, per axis, as offsets 0..1."""
    return tuple(np.linspace(0.0, 1.0, int(min(big - small + 1, MAX_PLACES))) for big, small in zip(larger, smaller))


def _search(thumbs: np.ndarray, larger: np.ndarray, smaller: np.ndarray, scale: np.ndarray,
            places: tuple[np.ndarray, np.ndarray], best: dict[int, list[tuple[float, int]]]) -> None:
    """Each smaller image's best larger images by the correlation of its whole thumbnail with their cuts at
    ``scale`` (width, height ratios) and ``places``; merged into ``best``."""
    cuts = tuple((float(scale[0]), float(scale[1]), float(ox), float(oy)) for oy in places[1] for ox in places[0])
    whole = pixels.whole(thumbs[smaller])  # [S, D]
    for lo in range(0, len(larger), BLOCK):
        block = larger[lo: lo + BLOCK]
        desc = pixels.descriptors(thumbs[block], cuts)  # [B, cuts, D]
        sim = (desc.reshape(-1, desc.shape[2]) @ whole.T).reshape(len(block), len(cuts), -1).max(axis=1)  # [B, S]
        keep = min(CANDIDATES, len(block))
        top = np.argpartition(-sim, keep - 1, axis=0)[:keep]  # [keep, S]
        for j, small in enumerate(smaller):
            found = best.setdefault(int(small), [])
            found.extend((float(sim[t, j]), int(block[t])) for t in top[:, j])
            found.sort(reverse=True)
            del found[CANDIDATES:]


def _verify(small: int, candidates: list[int], load: Callable[[int], np.ndarray]) -> tuple | None:
    """(small, source, similarity, ratio, nan) when the best candidate's full-resolution distance stands out from
    the next one's, else None."""
    window = load(small)
    dist = []
    for big in candidates:
        image = load(big)
        scale = min(1.0, MAX_SIDE / max(image.shape[:2]))
        a, b = (window, image) if scale == 1 else (_shrink(window, scale), _shrink(image, scale))
        dist.append(window_distance(b, a))
    order = np.argsort(dist)
    first, second = dist[order[0]], dist[order[1]]
    if not np.isfinite(first) or first > FINE_RATIO * second:
        return None
    return small, candidates[order[0]], 1.0 - first, first / second, np.nan


def window_distance(image: np.ndarray, window: np.ndarray) -> float:
    """1 - the best normalised correlation (each colour channel minus its mean) of ``window`` [h, w, 3] with the
    windows of ``image`` [H, W, 3] at every whole-pixel offset; inf when it does not fit. The offsets are few (a
    crop of a few percent): scipy's correlate (direct or FFT, whichever is faster), the windows' sums from
    integral images."""
    from scipy.signal import correlate

    h, w = window.shape[:2]
    ny, nx = image.shape[0] - h + 1, image.shape[1] - w + 1
    if ny < 1 or nx < 1:
        return np.inf
    t = window.astype(np.float64)
    t -= t.mean(axis=(0, 1))  # zero mean per channel: a window's own mean drops out of the dot product
    t /= max(float(np.linalg.norm(t)), 1e-12)
    x = image.astype(np.float64)
    sums, squares = _box_sums(x, h, w), _box_sums(x * x, h, w).sum(axis=2)  # [ny, nx, 3], [ny, nx]
    spread = np.sqrt(np.maximum(squares - (sums ** 2).sum(axis=2) / (h * w), 0.0))
    dot = sum(correlate(x[..., c], t[..., c], mode="valid") for c in range(x.shape[2]))  # [ny, nx]
    score = np.where(spread > 1e-9, dot / np.maximum(spread, 1e-9), -1.0)
    best = float(score.max())
    return max(1.0 - best, FINE_EPS)


def _box_sums(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """[H - h + 1, W - w + 1, C]: the sum of every h x w window of x [H, W, C] (an integral image)."""
    c = np.zeros((x.shape[0] + 1, x.shape[1] + 1, x.shape[2]))
    c[1:, 1:] = x.cumsum(axis=0).cumsum(axis=1)
    return c[h:, w:] - c[:-h, w:] - c[h:, :-w] + c[:-h, :-w]


def _shrink(img: np.ndarray, scale: float) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    return cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
