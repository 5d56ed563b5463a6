"""Outliers and broken images: unreadable, extreme aspect ratio, far too small, near-constant, and embedding
outliers (k-NN distance in the top percentile of their class)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from vistrain.audit.neighbours import nearest

COLUMNS = ["path", "id", "reason", "score", "label", "split", "action"]
ACTIONS = {
    "unreadable": "fix or remove the file",
    "near_constant": "remove: blank or constant image",
    "too_small": "check: far smaller than train.img_size",
    "extreme_aspect": "check: extreme aspect ratio",
    "embedding": "review: unlike the rest of its class",
}
HARD_REASONS = ("unreadable", "near_constant")  # what --policy drop / relabel removes without review


def _rows(items: pd.DataFrame, mask: np.ndarray, reason: str, score: np.ndarray) -> pd.DataFrame:
    part = items[mask]
    return pd.DataFrame({"path": part["path"].to_numpy(), "id": part["id"].astype(str).to_numpy(),
                         "reason": reason, "score": np.round(score[mask], 6),
                         "label": part["label"].astype(str).to_numpy(), "split": part["split_name"].to_numpy(),
                         "action": ACTIONS[reason]}, columns=COLUMNS)


def file_outliers(items: pd.DataFrame, scan: pd.DataFrame, img_size: tuple[int, int], min_size_fraction: float,
                  max_aspect: float, constant_std: float) -> pd.DataFrame:
    """Per readable item (``scan`` rows in item order): too small (score = shorter side / wanted side),
    extreme aspect (score = long / short), near-constant (score = grey std, 0..1); unreadable ones (score 1)."""
    w, h = scan["width"].to_numpy(float), scan["height"].to_numpy(float)
    readable = scan["error"].to_numpy() == ""
    short, long_ = np.minimum(w, h), np.maximum(w, h)
    aspect = np.where(short > 0, long_ / np.maximum(short, 1), 0.0)
    wanted = float(min(img_size))
    std = scan["std"].fillna(0).to_numpy(float)
    parts = [
        _rows(items, ~readable, "unreadable", np.ones(len(items))),
        _rows(items, readable & (std < constant_std), "near_constant", std),
        _rows(items, readable & (short < min_size_fraction * wanted), "too_small", short / wanted),
        _rows(items, readable & (aspect > max_aspect), "extreme_aspect", aspect),
    ]
    return pd.concat([p for p in parts if len(p)] or [pd.DataFrame(columns=COLUMNS)], ignore_index=True)


def bad_image_rows(bad: pd.DataFrame) -> pd.DataFrame:
    """Items the data pass left out (``Prepared.bad`` / bad_images.csv): ``unreadable`` (or ``too_small`` for
    those data.min_image_size dropped), the pass's reason in the action."""
    small = bad["reason"].astype(str).str.contains("data.min_image_size", regex=False).to_numpy()
    reason = np.where(small, "too_small", "unreadable")
    return pd.DataFrame({"path": bad["path"].astype(str).to_numpy(), "id": bad["id"].astype(str).to_numpy(),
                         "reason": reason, "score": 1.0,
                         "label": bad["label"].astype(str).to_numpy() if "label" in bad else "",
                         "split": "", "action": [f"{ACTIONS[r]} ({why})" for r, why in zip(reason, bad["reason"])]},
                        columns=COLUMNS)


def embedding_outliers(items: pd.DataFrame, feats: np.ndarray, eligible: np.ndarray, k: int,
                       percentile: float) -> pd.DataFrame:
    """Per class: mean cosine distance to the ``k`` nearest other images of the class (``neighbours.nearest``:
    bounded work per image); those above the class's ``percentile`` quantile (classes of more than ``k + 1``
    images) are outliers, score = that distance."""
    labels = items["label"].astype(str).to_numpy()
    score = np.zeros(len(items))
    flagged = np.zeros(len(items), dtype=bool)
    for label in np.unique(labels):
        idx = np.flatnonzero((labels == label) & eligible)
        if len(idx) <= k + 1:
            continue
        sims, _ = nearest(feats[idx], k)
        dist = 1.0 - sims.mean(axis=1)
        score[idx] = dist
        flagged[idx] = dist > np.quantile(dist, percentile)
    out = _rows(items, flagged, "embedding", score)
    return out.sort_values("score", ascending=False).reset_index(drop=True)
