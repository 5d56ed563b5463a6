"""One decode of every image: size, grey-level spread, a pixel digest (exact duplicates) and a perceptual hash."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from vistrain.data.images import load_rgb

HASH_BITS = 64  # imagehash.phash with hash_size=8
STATS_SIDE = 64  # the grey-level spread is measured on a copy this small (noise-robust, fast)


def _scan_one(path: str) -> tuple[int, int, float, str, int] | str:
    """(width, height, grey std in 0..1, md5 of the RGB pixels, 64-bit pHash), or the decode error."""
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
    return img.size[0], img.size[1], std, digest, value


def scan_images(paths: Sequence[str], workers: int = 4) -> pd.DataFrame:
    """Per path (in order): ``width, height, std, digest, phash`` (uint64 as int64) and ``error`` ('' when
    readable). Threads: PIL releases the GIL while decoding."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(_scan_one, list(paths), chunksize=64))
    rows = [r if isinstance(r, tuple) else (0, 0, np.nan, "", 0) for r in results]
    out = pd.DataFrame(rows, columns=["width", "height", "std", "digest", "phash"])
    out["phash"] = np.array([r[4] for r in rows], dtype=np.uint64).view(np.int64)
    out["error"] = [r if isinstance(r, str) else "" for r in results]
    return out
