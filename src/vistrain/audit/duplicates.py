"""Exact and near duplicates, reported as groups, and which of them leak across splits.

The rule (README, "audit"):

* **exact**: identical decoded pixels (the scan's digest);
* **near**: a pair whose pixel distance stands out from the two images' typical neighbours in this data set.
  The pixel distance is 1 - the correlation of 16 x 16 colour thumbnails once a crop of up to 5% is undone
  (``pixels.aligned_similarity``: unchanged by a brightness gain, barely moved by a JPEG re-encode). Each image's
  ``NEIGHBOURS`` nearest images are searched (Faiss: a bounded number per image, never all pairs); its typical
  distance is the median over its ``TYPICAL`` nearest. A pair's ratio is its distance over the smaller typical
  distance of its two images, and ``log(ratio)`` is compared with the same for every image's nearest neighbour:
  the pair is a near duplicate when it lies ``audit.near_dup_z`` robust deviations (1.4826 x the median absolute
  deviation, at least ``MIN_LOG_SCALE``) below their median, i.e. when it stands out from what nearest neighbours
  look like in this data set. With embeddings of trained weights (a run's model, ``model.init_from`` /
  ``model.pretrained_path``) the model must agree: the pair's cosine distance may exceed neither image's
  typical embedding-neighbour distance (a model that was never taught brightness changes may veto a brightened
  copy). A randomly initialised backbone does not vote (its features follow brightness more than content).

Exact links and near pairs are joined into connected components (groups, as fastdup reports them); each group's
representative is a training image when it has one (else the first). ``duplicates.csv`` has one row per other
member, paired with the representative: at most N - 1 rows, written in chunks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vistrain.audit import pixels
from vistrain.audit.neighbours import nearest
from vistrain.tracking.files import atomic_write

log = logging.getLogger(__name__)
NEIGHBOURS = 12  # candidates searched per image (and the pairs each image is compared in, with the reverse ones)
TYPICAL = 10  # an image's typical neighbour distance: the median over its nearest this many
MIN_LOG_SCALE = 0.25  # floor of the robust spread of log(ratio): a data set of look-alikes (one pattern plus
# noise) has a tiny spread, and a pair must still be several times closer than usual to count
EPS = 1e-6  # distances below this are float noise: equal
CSV_CHUNK = 20_000  # duplicates.csv rows formatted at once
SPLIT_RANK = {"train": 0, "val": 1, "query": 1, "gallery": 1, "test": 2}  # representative: the lowest (folds: 0)


def exact_links(digest: pd.Series, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Identical decoded pixels among the ``eligible`` items: (a, b) links of every member to its cluster's
    first member, and ``unique`` [N] bool (the first member of each cluster, and every unclustered item)."""
    idx = np.flatnonzero(eligible)
    first = pd.Series(idx).groupby(digest.to_numpy()[idx]).transform("min").to_numpy()
    copy = first != idx
    unique = np.zeros(len(digest), dtype=bool)
    unique[idx[~copy]] = True
    return first[copy], idx[copy], unique


def near_pairs(thumbs: np.ndarray, nodes: np.ndarray, z_min: float) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """Near duplicates among the items ``nodes`` (one per exact cluster): a DataFrame ``a, b`` (item indices,
    a < b), ``similarity`` (aligned pixel correlation), ``ratio`` (distance / typical distance), ``z``; the typical
    distance per node [len(nodes)]; and the data set's reference (for audit.json)."""
    empty = pd.DataFrame({"a": [], "b": [], "similarity": [], "ratio": [], "z": []})
    if len(nodes) < 3:
        return empty, np.full(len(nodes), np.nan), {"searched": int(len(nodes))}
    sub = thumbs[nodes]
    full = pixels.whole(sub)
    _, nb = nearest(full, NEIGHBOURS)
    u = np.repeat(np.arange(len(nodes)), nb.shape[1])
    v = nb.ravel()
    u, v = u[v >= 0], v[v >= 0]
    pairs = np.unique(np.stack([np.minimum(u, v), np.maximum(u, v)], axis=1), axis=0)
    p, q = pairs[:, 0], pairs[:, 1]
    both = pixels.aligned_similarity(sub, full, np.concatenate([p, q]), np.concatenate([q, p]))
    sim = np.maximum(both[: len(p)], both[len(p):])
    dist = np.maximum(1.0 - sim.astype(np.float64), EPS)
    typical, nn1 = _typical(len(nodes), np.concatenate([p, q]), np.concatenate([dist, dist]))
    ref = np.log(nn1 / typical)
    centre = float(np.median(ref))
    scale = max(1.4826 * float(np.median(np.abs(ref - centre))), MIN_LOG_SCALE)
    ratio = dist / np.minimum(typical[p], typical[q])
    z = (centre - np.log(ratio)) / scale
    keep = z >= z_min
    out = pd.DataFrame({"a": nodes[p[keep]], "b": nodes[q[keep]], "similarity": sim[keep], "ratio": ratio[keep],
                        "z": z[keep]})
    reference = {"searched": int(len(nodes)), "pairs_compared": int(len(p)),
                 "median_nearest_ratio": round(float(np.exp(centre)), 4), "log_ratio_scale": round(scale, 4),
                 "max_ratio": float(f"{np.exp(centre - z_min * scale):.4g}")}
    return out, typical, reference


def _typical(n: int, node: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per node: the median of its ``TYPICAL`` smallest distances, and its smallest, from (node, distance) rows."""
    order = np.lexsort((dist, node))
    node, dist = node[order], dist[order]
    start = np.searchsorted(node, np.arange(n))
    rank = np.arange(len(node)) - start[node]
    near = rank < TYPICAL
    typical = pd.Series(dist[near]).groupby(node[near]).median().reindex(range(n)).to_numpy()
    nn1 = np.full(n, np.nan)
    nn1[node[rank == 0]] = dist[rank == 0]
    return np.maximum(typical, EPS), np.maximum(nn1, EPS)


def embedding_agrees(feats: np.ndarray, pool: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a)] bool: the model puts each pair no further apart than the typical embedding-neighbour distance
    (median over ``TYPICAL``, among the ``pool`` items) of either image. ``feats`` [N, D] unit vectors."""
    if not len(a):
        return np.zeros(0, dtype=bool)
    local = np.full(len(feats), -1)
    local[pool] = np.arange(len(pool))
    involved = np.unique(np.concatenate([a, b]))
    sims, _ = nearest(feats[pool], TYPICAL, queries=local[involved])
    typical = np.full(len(feats), np.nan)
    typical[involved] = np.median(np.where(np.isfinite(sims), 1.0 - sims, np.nan), axis=1)
    dist = 1.0 - np.einsum("ij,ij->i", feats[a], feats[b])
    return dist <= np.fmin(typical[a], typical[b]) + EPS


def groups(n: int, a: np.ndarray, b: np.ndarray, split_names: np.ndarray) -> pd.DataFrame:
    """Connected components of the links (a, b) among n items: ``item, group, rep`` for every item in a group
    of two or more, groups numbered from 0 in order of their representative; the representative is the member
    whose split ranks first (``SPLIT_RANK``: train, then validation, then test), then the first."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(a):
        return pd.DataFrame({"item": [], "group": [], "rep": []}, dtype=np.int64)
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    size = np.bincount(label)
    item = np.flatnonzero(size[label] > 1)
    rank = np.array([SPLIT_RANK.get(str(s), 0) for s in split_names[item]])
    frame = pd.DataFrame({"item": item, "component": label[item], "rank": rank})
    reps = frame.sort_values(["rank", "item"]).groupby("component")["item"].first()
    frame["rep"] = frame["component"].map(reps)
    number = {c: g for g, c in enumerate(reps.sort_values().index)}
    frame["group"] = frame["component"].map(number)
    return frame[["item", "group", "rep"]].reset_index(drop=True)


def duplicate_table(items: pd.DataFrame, members: pd.DataFrame, digest: pd.Series, phash: np.ndarray,
                    thumbs: np.ndarray, typical: np.ndarray, groups_meaningful: bool) -> pd.DataFrame:
    """``duplicates.csv``: one row per group member other than the representative (``path_a``: the
    representative, ``path_b``: the member), the pair columns of the contract plus ``dup_group``, ``group_size``
    and ``ratio`` (pixel distance / typical neighbour distance); groups with a label conflict first, then those
    that leak across splits, then by similarity. ``typical`` [N] per item (nan for exact copies)."""
    rows = members[members["item"] != members["rep"]]
    ia, ib = rows["rep"].to_numpy(), rows["item"].to_numpy()
    a, b = items.iloc[ia], items.iloc[ib]
    exact = digest.to_numpy()[ia] == digest.to_numpy()[ib]
    sim = np.ones(len(ia), dtype=np.float64)
    if (~exact).any():
        sim[~exact] = _pair_similarity(thumbs, ia[~exact], ib[~exact])
    hashes = phash.view(np.uint64)
    out = pd.DataFrame({
        "path_a": a["path"].to_numpy(), "path_b": b["path"].to_numpy(), "kind": np.where(exact, "exact", "near"),
        "similarity": sim.round(4), "split_a": a["split_name"].to_numpy(), "split_b": b["split_name"].to_numpy(),
        "label_a": a["label"].astype(str).to_numpy(), "label_b": b["label"].astype(str).to_numpy(),
        "id_a": a["id"].astype(str).to_numpy(), "id_b": b["id"].astype(str).to_numpy(),
        "group_a": a["group"].astype(str).to_numpy(), "group_b": b["group"].astype(str).to_numpy(),
        "hash_distance": np.bitwise_count(hashes[ia] ^ hashes[ib]).astype(np.int64)})
    if "domain" in items.columns:
        out["domain_a"], out["domain_b"] = a["domain"].astype(str).to_numpy(), b["domain"].astype(str).to_numpy()
    cross_split = out["split_a"] != out["split_b"]
    cross_group = (out["group_a"] != out["group_b"]) & groups_meaningful
    out["relation"] = np.where(cross_split, "cross_split", np.where(cross_group, "cross_group", "within_split"))
    # an unlabelled image (a test folder without labels) conflicts with no label
    out["conflict"] = (out["label_a"] != out["label_b"]) & (out["label_a"] != "") & (out["label_b"] != "")
    out["action"] = np.select(
        [out["conflict"], cross_split, cross_group],
        ["check both labels: the same image has two", "remove one from validation / test: leakage",
         "merge the two groups: they share an image"], "drop one copy")
    out["dup_group"] = rows["group"].to_numpy()
    out["group_size"] = out.groupby("dup_group")["dup_group"].transform("size").to_numpy() + 1
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = (1.0 - sim) / np.fmin(typical[ia], typical[ib])
    out["ratio"] = np.where(exact, 0.0, ratio).round(4)
    by_group = out.groupby("dup_group")
    group_conflict = by_group["conflict"].transform("max").to_numpy()
    group_leak = cross_split.groupby(out["dup_group"]).transform("max").to_numpy()
    group_sim = by_group["similarity"].transform("max").to_numpy()
    order = np.lexsort((-out["similarity"].to_numpy(), ~cross_split.to_numpy(), ~out["conflict"].to_numpy(),
                        out["dup_group"].to_numpy(), -group_sim, ~group_leak, ~group_conflict))
    return out.iloc[order].reset_index(drop=True)


def _pair_similarity(thumbs: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Aligned pixel similarity of each pair (a crop of either undone)."""
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    la, lb = inverse[: len(a)], inverse[len(a):]
    sub = thumbs[nodes]
    both = pixels.aligned_similarity(sub, pixels.whole(sub), np.concatenate([la, lb]), np.concatenate([lb, la]))
    return np.maximum(both[: len(a)], both[len(a):]).astype(np.float64)


def write_table(path: Path, table: pd.DataFrame) -> None:
    """duplicates.csv, formatted ``CSV_CHUNK`` rows at a time into the atomic temporary file."""
    def write(fh: Any) -> None:
        for lo in range(0, max(len(table), 1), CSV_CHUNK):
            fh.write(table.iloc[lo: lo + CSV_CHUNK].to_csv(index=False, header=lo == 0).encode("utf-8"))

    atomic_write(path, write)


def counts(table: pd.DataFrame) -> dict[str, Any]:
    """audit.json's ``duplicates`` numbers: rows (copies beyond each representative) by kind and relation, and
    the groups (all, with a label conflict, spanning splits)."""
    by_relation = table["relation"].value_counts()
    spans = (table["relation"] == "cross_split").groupby(table["dup_group"]).any()
    return {
        "groups": int(table["dup_group"].nunique()), "images_in_groups": int(len(table) + table["dup_group"].nunique()),
        "total": len(table), "exact": int((table["kind"] == "exact").sum()),
        "near": int((table["kind"] == "near").sum()), "conflicts": int(table["conflict"].sum()),
        "conflict_groups": int(table.loc[table["conflict"], "dup_group"].nunique()),
        "cross_split": int(by_relation.get("cross_split", 0)), "cross_split_groups": int(spans.sum()),
        "cross_group": int(by_relation.get("cross_group", 0)),
        "within_split": int(by_relation.get("within_split", 0)),
        "split_pairs": _split_pairs(table),
    }


def _split_pairs(table: pd.DataFrame) -> dict[str, int]:
    """Rows across splits per pair of split names (``fold0-test``), each pair named once."""
    cross = table[table["relation"] == "cross_split"]
    names = ["-".join(sorted(p)) for p in zip(cross["split_a"], cross["split_b"])]
    return {k: int(v) for k, v in pd.Series(names, dtype=str).value_counts().sort_index().items()}


def shared_groups(dups: pd.DataFrame) -> list[list[str]]:
    """Pairs of groups that hold the same (or a near-identical) image, each once, sorted."""
    cross = dups[dups["group_a"] != dups["group_b"]]
    found = {tuple(sorted((ga, gb))) for ga, gb in zip(cross["group_a"], cross["group_b"])}
    return [list(p) for p in sorted(found)]
