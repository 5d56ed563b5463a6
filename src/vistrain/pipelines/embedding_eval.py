"""Evaluation and kNN prediction for embedding runs (``evaluate`` and ``predict`` dispatch here).

Re-id runs score the query folder against the gallery folder; retrieval runs score the val (or test) split
as queries against the training images as gallery, including search-based classification (kNN vote).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from vistrain.engine.inference import LoadedRun, embed_paths
from vistrain.engine.tasks import RetrievalEval, embedding_metrics
from vistrain.errors import UserError
from vistrain.tracking.files import write_json

log = logging.getLogger(__name__)


def gallery(run: LoadedRun) -> tuple[pd.DataFrame, np.ndarray]:
    """The training images and their embeddings: the gallery of search-based classification."""
    items = run.splits()
    train = items[items["split"] == "train"].reset_index(drop=True)
    return train, embed_paths(run, train["path"].tolist(), desc="gallery")


def evaluate_embedding(run: LoadedRun, split: str) -> dict[str, Any]:
    items = run.splits()
    reid = "query" in set(items["split"])
    e = run.cfg.eval
    if reid:
        if split == "oof":
            raise UserError("--split oof: embedding runs have no out-of-fold logits; use --split val")
        query, gal = items[items["split"] == "query"], items[items["split"] == "gallery"]
    else:
        wanted = {"val": "val", "test": "test", "oof": None}[split]
        if wanted is None:
            raise UserError("--split oof: embedding runs have no out-of-fold logits; use --split val or test")
        query, gal = items[items["split"] == wanted], items[items["split"] == "train"]
        if query.empty:
            raise UserError(f"--split {split}: the run's split has no {wanted} images (data.{wanted}_ratio)")
    both = pd.concat([query, gal], ignore_index=True)
    feats = embed_paths(run, both["path"].tolist(), desc=split)
    codes = {v: i for i, v in enumerate(sorted(both["label"].unique()))}
    cams = both["camera"].astype(int).to_numpy() if reid else None
    ev = RetrievalEval(len(query), both["label"].map(codes).to_numpy(), cams, e.feat_norm, False, e.knn_k,
                       e.max_rank, e.memory_budget_mb, e.rerank)
    metrics = {**embedding_metrics(feats, ev), "split": split, "n_query": int(len(query)), "n_gallery": int(len(gal))}
    out = run.path / "eval" / split
    write_json(out / "metrics.json", metrics)
    print(f"{'metric':<14} value")
    for k, v in metrics.items():
        print(f"{k:<14} {v:.4f}" if isinstance(v, float) else f"{k:<14} {v}")
    print(f"[DONE] evaluation written to {out}")
    return metrics


def knn_predict(run: LoadedRun, paths: list[str]) -> tuple[list, np.ndarray]:
    """Search-based classification: (predicted labels, top-1 similarity) against the training images."""
    from vistrain.metrics.retrieval import knn_classify, knn_search

    train, g_feats = gallery(run)
    q_feats = embed_paths(run, paths, desc="query")
    labels = train["label"].to_numpy()
    codes = {v: i for i, v in enumerate(sorted(set(labels)))}
    names = sorted(codes, key=codes.get)
    pred = knn_classify(q_feats, g_feats, np.array([codes[v] for v in labels]), k=run.cfg.eval.knn_k)
    scores, _ = knn_search(q_feats, g_feats, k=1, memory_budget_mb=run.cfg.eval.memory_budget_mb)
    return [names[i] for i in pred], np.asarray(scores)[:, 0]
