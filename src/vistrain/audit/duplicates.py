"""Exact and near duplicates as pairs of item indices, and the table that says which of them leak.

Exact duplicates have identical decoded pixels; near duplicates have perceptual hashes within a Hamming distance
(compared in row blocks against all hashes: memory [block, N], never an N x N matrix), or embeddings whose cosine
similarity reaches ``audit.near_dup_threshold`` with hashes within twice that distance (see ``near_pairs``).
"""

from __future__ import annotations

import logging
from itertools import combinations

import numpy as np
import pandas as pd

from vistrain.audit.scan import HASH_BITS

log = logging.getLogger(__name__)
PAIR_COLUMNS = ["a", "b", "kind", "similarity", "hash_distance"]
HASH_BLOCK = 512  # hash rows compared at once: a [512, N] block of XORs (8 bytes each) and bit counts
ALL_PAIRS_UP_TO = 50  # an exact-duplicate cluster larger than this is linked to its first member only
# With embeddings, a hash match the model contradicts (centred cosine below this: less alike than two average
# images) is dropped: pHash sees grey levels only, so two layouts in different colours can share a hash.
HASH_VETO_COSINE = 0.0


def exact_pairs(digest: pd.Series, eligible: np.ndarray) -> pd.DataFrame:
    """Items with identical decoded pixels (``digest``), among the ``eligible`` ones: every pair of a cluster,
    or each member with the first one for a cluster over ``ALL_PAIRS_UP_TO``."""
    rows = []
    idx = np.flatnonzero(eligible)
    for members in pd.Series(idx).groupby(digest.to_numpy()[idx]).agg(list):
        if len(members) < 2:
            continue
        links = combinations(members, 2) if len(members) <= ALL_PAIRS_UP_TO else ((members[0], m) for m in members[1:])
        rows += [(a, b, "exact", 1.0, 0) for a, b in links]
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def hash_pairs(phash: np.ndarray, eligible: np.ndarray, max_distance: int) -> pd.DataFrame:
    """Pairs (a < b) of eligible items whose 64-bit perceptual hashes differ in at most ``max_distance`` bits:
    columns ``a, b, distance``."""
    idx = np.flatnonzero(eligible)
    hashes = np.ascontiguousarray(phash[idx]).view(np.uint64)
    found_a, found_b, found_d = [], [], []
    for lo in range(0, len(idx), HASH_BLOCK):
        block = hashes[lo: lo + HASH_BLOCK]
        dist = np.bitwise_count(block[:, None] ^ hashes[None, :])  # [B, N] uint8
        rows, cols = np.nonzero(dist <= max_distance)
        keep = cols > rows + lo  # each unordered pair once, no self pairs
        found_a.append(idx[rows[keep] + lo])
        found_b.append(idx[cols[keep]])
        found_d.append(dist[rows[keep], cols[keep]])
    if not found_a:
        return pd.DataFrame({"a": [], "b": [], "distance": []})
    return pd.DataFrame({"a": np.concatenate(found_a), "b": np.concatenate(found_b),
                         "distance": np.concatenate(found_d).astype(np.int64)})


def near_pairs(phash: np.ndarray, eligible: np.ndarray, max_distance: int, feats: np.ndarray | None,
               threshold: float) -> pd.DataFrame:
    """Near duplicates: hashes within ``max_distance`` bits, or (with embeddings) cosine similarity of the
    (centred, normalised) ``feats`` >= ``threshold`` for hashes within twice that distance.

    An embedding match alone is not a duplicate: a trained classifier maps every image of a class close together
    (that is what it is trained for), so look-alikes of one class reach any cosine threshold. Requiring the
    pictures to be alike too (a loose hash bound) keeps the crops and re-colourings the hash alone misses
    without reporting every pair of a class; a hash match needs a cosine >= ``HASH_VETO_COSINE``.
    ``similarity`` is the cosine when embeddings are given, else
    1 - distance / 64."""
    cand = hash_pairs(phash, eligible, 2 * max_distance if feats is not None else max_distance)
    a, b, d = cand["a"].to_numpy(), cand["b"].to_numpy(), cand["distance"].to_numpy()
    if feats is None:
        keep, sim = np.ones(len(cand), dtype=bool), 1.0 - d / HASH_BITS
    else:
        sim = np.einsum("ij,ij->i", feats[a], feats[b]).astype(np.float64) if len(cand) else np.zeros(0)
        keep = ((d <= max_distance) & (sim >= HASH_VETO_COSINE)) | (sim >= threshold)
    return pd.DataFrame({"a": a[keep], "b": b[keep], "kind": "near", "similarity": sim[keep],
                         "hash_distance": d[keep]})


def merge_pairs(*parts: pd.DataFrame) -> pd.DataFrame:
    """One row per pair: exact wins over near, then the highest similarity."""
    parts = tuple(p for p in parts if len(p))
    if not parts:
        return pd.DataFrame(columns=PAIR_COLUMNS)
    pairs = pd.concat(parts, ignore_index=True)
    pairs["rank"] = (pairs["kind"] != "exact").astype(int)
    pairs = pairs.sort_values(["rank", "similarity"], ascending=[True, False]).drop_duplicates(["a", "b"])
    return pairs.drop(columns="rank").reset_index(drop=True)


def duplicate_table(items: pd.DataFrame, pairs: pd.DataFrame, groups_meaningful: bool) -> pd.DataFrame:
    """``duplicates.csv``: the pair columns of the contract, then ids, groups, domains, the relation
    (cross_split: leakage, cross_group, within_split) and the suggested action; conflicts (different labels)
    first, then leakage, then by similarity."""
    a, b = items.iloc[pairs["a"].to_numpy()], items.iloc[pairs["b"].to_numpy()]
    out = pd.DataFrame({
        "path_a": a["path"].to_numpy(), "path_b": b["path"].to_numpy(), "kind": pairs["kind"].to_numpy(),
        "similarity": pairs["similarity"].to_numpy(dtype=float).round(4), "split_a": a["split_name"].to_numpy(),
        "split_b": b["split_name"].to_numpy(), "label_a": a["label"].astype(str).to_numpy(),
        "label_b": b["label"].astype(str).to_numpy(), "id_a": a["id"].astype(str).to_numpy(),
        "id_b": b["id"].astype(str).to_numpy(), "group_a": a["group"].astype(str).to_numpy(),
        "group_b": b["group"].astype(str).to_numpy(), "hash_distance": pairs["hash_distance"].to_numpy()})
    for col in ("domain",):
        if col in items.columns:
            out[f"{col}_a"], out[f"{col}_b"] = a[col].astype(str).to_numpy(), b[col].astype(str).to_numpy()
    cross_split = out["split_a"] != out["split_b"]
    cross_group = (out["group_a"] != out["group_b"]) & groups_meaningful
    out["relation"] = np.where(cross_split, "cross_split", np.where(cross_group, "cross_group", "within_split"))
    out["conflict"] = out["label_a"] != out["label_b"]
    out["action"] = np.select(
        [out["conflict"], cross_split, cross_group],
        ["check both labels: the same image has two", "remove one from validation / test: leakage",
         "merge the two groups: they share an image"], "drop one copy")
    order = np.lexsort((-out["similarity"].to_numpy(), ~cross_split.to_numpy(), ~out["conflict"].to_numpy()))
    return out.iloc[order].reset_index(drop=True)


def shared_groups(dups: pd.DataFrame) -> list[list[str]]:
    """Pairs of groups that hold the same (or a near-identical) image, each once, sorted."""
    cross = dups[dups["group_a"] != dups["group_b"]]
    found = {tuple(sorted((ga, gb))) for ga, gb in zip(cross["group_a"], cross["group_b"])}
    return [list(p) for p in sorted(found)]
