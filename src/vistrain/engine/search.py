"""``vistrain search`` / ``Run.search``: the nearest gallery images of an embedding model (a table, a PNG grid and
its CSV)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from vistrain.data.images import is_image_entry
from vistrain.data.sources import parse_reid_name, require_dir
from vistrain.engine.inference import embed_paths, load_run, require_readable
from vistrain.errors import UserError
from vistrain.tracking.files import write_csv

log = logging.getLogger(__name__)


def _label(path: Path, root: Path) -> str | None:
    """A gallery image's class when the layout tells it: its class sub-folder, or a re-id file name."""
    reid = parse_reid_name(path.name)
    if reid is not None:
        return str(reid[0])
    return path.parent.name if path.parent != root else None


def run_search(run_dir: Path, gallery: Path, query: Path, top_k: int = 20, output: Path | None = None
               ) -> pd.DataFrame:
    run = load_run(run_dir)
    if run.cfg.task != "embedding":
        raise UserError(f"RUN: {run.path} is a {run.cfg.task} run; search needs task: embedding")
    root = require_dir(gallery, "--gallery")
    if not query.is_file():
        raise UserError(f"--query: file not found: {query}")
    files = sorted(p for p in root.rglob("*") if is_image_entry(p))
    kept = [p for p in files if (parse_reid_name(p.name) or (0,))[0] != -1]
    if len(kept) < len(files):  # re-id junk (person -1) is never a result, as in the evaluation protocol
        log.info("[SEARCH] %d junk image(s) (person -1) left out of the gallery", len(files) - len(kept))
        files = kept
    if not files:
        raise UserError(f"--gallery: no images under {root}")
    from vistrain.metrics.retrieval import knn_search

    require_readable([str(query)], "--query")
    require_readable([str(p) for p in files], "--gallery")
    feats = embed_paths(run, [str(p) for p in files] + [str(query)], desc="gallery + query")  # one model load
    g, q = feats[:-1], feats[-1:]
    k = min(top_k, len(files))
    metric = "cosine" if run.cfg.eval.feat_norm else "euclidean"
    scores, idx = knn_search(q, g, k=k, metric=metric, memory_budget_mb=run.cfg.eval.memory_budget_mb)
    labels = [_label(p, root) for p in files]
    reid = parse_reid_name(query.name)
    q_label = str(reid[0]) if reid else (query.parent.name if query.parent.name in set(labels) else None)
    rows: list[dict[str, Any]] = []
    for rank, (score, i) in enumerate(zip(scores[0], idx[0]), start=1):
        label = labels[i]
        # cosine: the similarity of the unit embeddings and the cosine distance 1 - similarity; euclidean: the
        # squared distance of the raw embeddings
        scores_of = {"similarity": float(score), "distance": 1.0 - float(score)} if metric == "cosine" \
            else {"distance": float(score)}
        rows.append({"rank": rank, "path": str(files[i]), "class": label, **scores_of,
                     "correct": None if q_label is None or label is None else label == q_label})
    table = pd.DataFrame(rows)
    out = output or run.path / "search" / f"{query.stem}.png"
    write_csv(out.with_suffix(".csv"), table)
    from vistrain.viz.plots import search_grid_png

    search_grid_png(query, table, out, query_label=q_label)
    table.attrs.update(grid=str(out), query_label=q_label)  # for the verb's lines
    return table
