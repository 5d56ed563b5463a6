"""Class health: images per class, per domain and per split, the imbalance ratio, and classes under
``data.min_images_per_class``."""

from __future__ import annotations

from typing import Any

import pandas as pd


def class_health(items: pd.DataFrame, classes: list, min_images: int | None) -> dict[str, Any]:
    """Per class counts of the training data (``external`` test images are only in ``per_split``)."""
    labels = items["label"].astype(str)
    own = labels[~items["external"]] if "external" in items.columns else labels
    counts = {str(c): int((own == str(c)).sum()) for c in classes}
    nonzero = [v for v in counts.values() if v]
    out: dict[str, Any] = {
        "num_images": len(own), "num_classes": len(classes), "per_class": counts,
        "imbalance_ratio": round(max(nonzero) / min(nonzero), 3) if nonzero else None,
        "per_split": {str(s): {str(c): int(v) for c, v in part.astype(str).value_counts().sort_index().items()}
                      for s, part in labels.groupby(items["split_name"], sort=True)},
    }
    if "domain" in items.columns:
        out["per_domain"] = {str(d): {str(c): int(v) for c, v in part.value_counts().sort_index().items()}
                             for d, part in own.groupby(items["domain"].astype(str), sort=True)}
    if min_images:
        out["under_min_images_per_class"] = {c: v for c, v in counts.items() if v < min_images}
    return out
