"""One decode of every image: size, grey-level spread, a pixel digest (exact duplicates), a perceptual hash and a
small colour thumbnail (the pixel evidence of near duplicates, ``audit/pixels.py``)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from PIL import Image

from vistrain.data.images import load_rgb

HASH_BITS = 64  # imagehash.phash with hash_size=8
STATS_SIDE = 64  # the grey-level spread is measured on a copy this small (noise-robust, fast)
THUMB_SIDE = 32  # the stored thumbnail: 32 x 32 RGB uint8, 3 KB per image (120 MB for 40,000 images)


def _scan_one(path: str) -> tuple[int, int, float, str, int, np.ndarray] | str:
    """(width, height, grey std in 0..1, md5 of the RGB pixels, 64-bit pHash, thumbnail), or the decode error."""
    import imagehash

    try:
        img = load_rgb(path)
        img.load()
    except Exception as err:  # noqa: BLE001 - any decode failure is a finding, never a crash
        return f"{type(err).__name__}: {err}"
    digest = hashlib.md5(img.tobytes() + f"{img.size}".encode(), usedforsecurity=False).hexdigest()
    grey = img.convert("L")
    small = grey.resize((STATS_SIDE, STATS_SIDE)) if max(img.size) > STATS_SIDE else grey
    std = float(np.asarray(small, dtype=np.float32).std() / 255.0)
    bits = imagehash.phash(grey, hash_size=8).hash.flatten()
    value = int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])
    # Pillow's bilinear filter widens with the reduction (an area average when shrinking, interpolation when
    # enlarging): a crop saved at its own size and its original land on the same grid without aliasing
    thumb = np.asarray(img.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR), dtype=np.uint8)
    return img.size[0], img.size[1], std, digest, value, thumb


def scan_images(paths: Sequence[str], workers: int = 4) -> tuple[pd.DataFrame, np.ndarray]:
    """Per path (in order): ``width, height, std, digest, phash`` (uint64 as int64) and ``error`` ('' when
    readable); and the thumbnails [N, THUMB_SIDE, THUMB_SIDE, 3] uint8 (zeros for an unreadable file).
    Threads: PIL releases the GIL while decoding."""
    thumbs = np.zeros((len(paths), THUMB_SIDE, THUMB_SIDE, 3), dtype=np.uint8)
    rows = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, r in enumerate(pool.map(_scan_one, list(paths), chunksize=64)):
            if isinstance(r, str):
                rows.append((0, 0, np.nan, "", 0, r))
            else:
                thumbs[i] = r[5]
                rows.append((*r[:5], ""))
    out = pd.DataFrame(rows, columns=["width", "height", "std", "digest", "phash", "error"])
    out["phash"] = np.array([r[4] for r in rows], dtype=np.uint64).view(np.int64)
    return out, thumbs
