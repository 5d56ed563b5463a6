"""Label issues from held-out predicted probabilities (cleanlab's confident learning) and the most-confused
class pairs."""

from __future__ import annotations

import numpy as np
import pandas as pd


def label_issues(probs: np.ndarray, targets: np.ndarray, items: pd.DataFrame, classes: list) -> pd.DataFrame:
    """``label_issues.csv`` rows, most suspicious first: the items ``cleanlab.filter.find_label_issues`` flags
    (ranked by self-confidence), with the model's most likely class as ``suggested_label`` and
    ``score`` = 1 - p(given label) (higher is more suspicious).

    probs [N, C] out-of-fold (or held-out) probabilities, targets [N] class indices, items the N rows."""
    from cleanlab.filter import find_label_issues

    columns = ["path", "id", "given_label", "suggested_label", "score", "split", "action"]
    present = np.unique(targets)
    if len(items) < 2 or len(present) < 2:
        return pd.DataFrame(columns=columns)
    # cleanlab needs every class of probs among the labels: restrict to the classes present (renormalised)
    sub = probs[:, present]
    sub = sub / np.clip(sub.sum(axis=1, keepdims=True), 1e-12, None)
    local = np.searchsorted(present, targets)
    ranked = find_label_issues(local, sub, return_indices_ranked_by="self_confidence", n_jobs=1)  # no process pool
    rows = items.iloc[ranked]
    suggested = probs[ranked].argmax(axis=1)
    return pd.DataFrame({
        "path": rows["path"].to_numpy(), "id": rows["id"].astype(str).to_numpy(),
        "given_label": [str(classes[t]) for t in targets[ranked]],
        "suggested_label": [str(classes[s]) for s in suggested],
        "score": (1.0 - probs[ranked, targets[ranked]]).round(6),
        "split": rows["split_name"].to_numpy(), "action": "relabel or review"}, columns=columns)


def confused_pairs(probs: np.ndarray, targets: np.ndarray, classes: list, top: int = 10) -> list[dict]:
    """The ``top`` (given, predicted) class pairs with the most errors: [{true, predicted, count, examples}],
    ``examples`` the item indices of the confidently wrong ones first."""
    pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != targets)
    if not len(wrong):
        return []
    counts = pd.DataFrame({"t": targets[wrong], "p": pred[wrong], "i": wrong,
                           "conf": probs[wrong, pred[wrong]]})
    out = []
    for (t, p), part in sorted(counts.groupby(["t", "p"]), key=lambda kv: -len(kv[1]))[:top]:
        part = part.sort_values("conf", ascending=False)
        out.append({"true": str(classes[t]), "predicted": str(classes[p]), "count": len(part),
                    "examples": part["i"].head(4).tolist()})
    return out
