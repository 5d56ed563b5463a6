"""Evaluation and kNN prediction for embedding runs (``evaluate`` and ``predict`` dispatch here).

Re-id runs score the query folder against the gallery folder; retrieval runs score the val (or test) split
as queries against the training images as gallery (knn_recall@K), including search-based classification (kNN
vote), or with data.split_classes each image of the split against the split's other images (recall@K on classes
training never saw).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from vistrain.engine.inference import LoadedRun, embed_paths
from vistrain.engine.tasks import RetrievalEval, embedding_evaluation
from vistrain.errors import UserError
from vistrain.metrics.bootstrap import (
    LEVEL,
    bootstrap_indices,
    cluster_ratio_intervals,
    format_interval,
    macro_f1_intervals,
)
from vistrain.tracking.files import write_json

log = logging.getLogger(__name__)


def evaluate_embedding(run: LoadedRun, split: str) -> dict[str, Any]:
    items = run.splits()
    reid = "query" in set(items["split"])
    e = run.cfg.eval
    if reid:
        if split != "val":
            raise UserError(f"--split {split}: a re-id run has one evaluation, the query folder against the gallery "
                            "folder; use --split val")
        query, gal = items[items["split"] == "query"], items[items["split"] == "gallery"]
    else:
        wanted = {"val": "val", "test": "test", "oof": None}[split]
        if wanted is None:
            raise UserError("--split oof: embedding runs have no out-of-fold logits; use --split val or test")
        query = items[items["split"] == wanted]
        gal = items.iloc[:0] if run.cfg.data.split_classes else items[items["split"] == "train"]
        if query.empty:
            raise UserError(f"--split {split}: the run's split has no {wanted} images (data.{wanted}_ratio)")
        if run.cfg.data.split_classes and not query["label"].duplicated().any():
            raise UserError(f"--split {split}: each class of the split has one image, so none has another of its "
                            f"class to retrieve (data.split_classes: true); raise data.{wanted}_ratio")
    both = pd.concat([query, gal], ignore_index=True)
    feats = embed_paths(run, both["path"].tolist(), desc=split)
    codes = {v: i for i, v in enumerate(sorted(both["label"].unique()))}
    cams = both["camera"].astype(int).to_numpy() if reid else None
    leave_one_out = run.cfg.data.split_classes and not reid
    ev = RetrievalEval(len(query), both["label"].map(codes).to_numpy(), cams, e.feat_norm, False, e.knn_k,
                       e.max_rank, e.memory_budget_mb, e.rerank, recall_ks=tuple(e.recall_ks),
                       leave_one_out=leave_one_out)
    figures, outcomes = embedding_evaluation(feats, ev, counts=True)
    n_gallery = len(query) - 1 if leave_one_out else len(gal)  # leave-one-out: the split's other images
    metrics = {**figures, "split": split, "n_query": int(len(query)), "n_gallery": int(n_gallery),
               "overrides": run.overrides, "fallbacks": run.fallbacks.entries}
    if e.bootstrap and outcomes:
        metrics["intervals"] = embedding_intervals(outcomes, e.recall_ks, e.bootstrap, run.cfg.project.seed)
        metrics["bootstrap"] = {"replicates": e.bootstrap, "seed": run.cfg.project.seed, "level": LEVEL,
                                "method": "percentile", "unit": "query identity" if reid else "query image"}
    out = run.path / "eval" / split
    write_json(out / "metrics.json", metrics)
    intervals = metrics.get("intervals", {})
    print(f"{'metric':<14} value" + (" [95% interval]" if intervals else ""))
    for k, v in metrics.items():
        if k not in ("overrides", "intervals", "bootstrap", "fallbacks"):
            print(f"{k:<14} {format_interval(v, intervals.get(k))}" if isinstance(v, float) else f"{k:<14} {v}")
    if run.overrides:
        print("overrides: " + " ".join(f"{k}={v}" for k, v in run.overrides.items()))
    print(f"[DONE] evaluation written to {out}")
    return metrics


def embedding_intervals(outcomes: dict[str, Any], recall_ks: list[int], replicates: int,
                        seed: int) -> dict[str, list[float]]:
    """95% percentile-bootstrap intervals of the embedding figures from their per-query outcomes
    (``embedding_evaluation``). Re-id resamples query identities, whose queries share a look and are not
    independent: a replicate's mAP is the mean AP of every valid query of the drawn persons (a person drawn twice
    counts twice). Retrieval resamples query images."""
    if "ap" in outcomes:
        ids, person = np.unique(outcomes["pid"], return_inverse=True)
        first = outcomes["first_match_rank"]
        valid = first > 0

        def per_person(values: np.ndarray) -> np.ndarray:
            return np.bincount(person, weights=np.where(valid, values, 0.0), minlength=len(ids))

        numerators = {"mAP": per_person(outcomes["ap"]), "mINP": per_person(outcomes["inp"]),
                      **{f"rank{k}": per_person((first <= k).astype(np.float64)) for k in (1, 5, 10)}}
        idx = bootstrap_indices(len(ids), replicates, seed)
        return cluster_ratio_intervals(numerators, per_person(np.ones(len(first))), idx)
    first, depth = outcomes["first_hit"], outcomes["depth"]
    idx = bootstrap_indices(len(first), replicates, seed)
    numerators = {f"knn_recall@{k}": (first < min(k, depth)).astype(np.float64) for k in recall_ks}
    numerators["knn_acc"] = (outcomes["pred"] == outcomes["label"]).astype(np.float64)
    intervals = cluster_ratio_intervals(numerators, np.ones(len(first)), idx)
    intervals["knn_macro_f1"] = macro_f1_intervals(outcomes["label"], outcomes["pred"], outcomes["n_classes"], idx)
    return intervals


def knn_predict(run: LoadedRun, paths: list[str], flip: bool | None = None) -> tuple[list, np.ndarray]:
    """Search-based classification: (predicted labels, top-1 similarity) against the training images.

    The model is loaded once for gallery and queries, and one search serves both the vote and the top-1 score.
    ``flip``: average each embedding with its mirror image's (``predict --tta``); None follows ``eval.flip_feats``.
    """
    from vistrain.metrics.retrieval.search import knn_search, knn_vote

    items = run.splits()
    train = items[items["split"] == "train"].reset_index(drop=True)
    feats = embed_paths(run, train["path"].tolist() + list(paths), desc="gallery + query", flip=flip)
    g_feats, q_feats = feats[: len(train)], feats[len(train):]
    k = min(run.cfg.eval.knn_k, len(train))
    scores, idx = knn_search(q_feats, g_feats, k=k, memory_budget_mb=run.cfg.eval.memory_budget_mb)
    return knn_vote(idx, train["label"].to_numpy()).tolist(), np.asarray(scores)[:, 0]
