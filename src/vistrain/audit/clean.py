"""``audit --write-clean F --policy drop|relabel|review``: the data as a ``data.source: manifest`` list
(``path,label[,domain][,group][,split]``) with the flagged rows dropped, relabelled or marked for review."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vistrain.audit.outliers import HARD_REASONS
from vistrain.errors import UserError, did_you_mean
from vistrain.tracking.files import write_csv

POLICIES = ("drop", "relabel", "review")


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise UserError(f"--policy: unknown policy '{policy}'; valid: {', '.join(POLICIES)}"
                        f"{did_you_mean(policy, POLICIES)}")


def _second_copies(dups: pd.DataFrame) -> set[str]:
    """Of each duplicate pair, the copy to remove: a conflict loses both; else the one outside train (leakage
    leaves the held-out side), else the second."""
    out: set[str] = set()
    for row in dups.itertuples():
        if row.conflict:
            out |= {row.path_a, row.path_b}
        elif row.split_a == "train" and row.split_b != "train":
            out.add(row.path_b)
        elif row.split_b == "train" and row.split_a != "train":
            out.add(row.path_a)
        elif row.path_a not in out and row.path_b not in out:
            out.add(row.path_b)
    return out


def write_clean(path: Path, items: pd.DataFrame, policy: str, issues: pd.DataFrame, dups: pd.DataFrame,
                outliers: pd.DataFrame, keep_split: bool, keep_group: bool) -> dict[str, Any]:
    """Write the manifest; returns what changed (for audit.json)."""
    check_policy(policy)
    table = pd.DataFrame({"path": items["path"].astype(str), "label": items["label"].astype(str)})
    for col, keep in (("domain", "domain" in items.columns), ("group", keep_group), ("split", keep_split)):
        if keep:
            table[col] = items[col].astype(str).to_numpy()
    suggested = dict(zip(issues["path"], issues["suggested_label"]))
    hard = outliers[outliers["reason"].isin(HARD_REASONS)]
    dropped = set(hard["path"]) | _second_copies(dups)
    flags: dict[str, list[str]] = {}
    for name, paths in (("label_issue", issues["path"]), ("duplicate", list(dups["path_a"]) + list(dups["path_b"])),
                        *((f"outlier:{r}", part["path"]) for r, part in outliers.groupby("reason"))):
        for p in paths:
            flags.setdefault(p, []).append(name)
    if policy == "review":
        table["audit_flags"] = [";".join(dict.fromkeys(flags.get(p, []))) for p in table["path"]]
        table["suggested_label"] = [suggested.get(p, "") for p in table["path"]]
        changed = {"flagged": int((table["audit_flags"] != "").sum())}
    else:
        relabel = policy == "relabel"
        if not relabel:
            dropped |= set(issues["path"])
        new_labels = table["path"].map(suggested) if relabel else pd.Series(np.nan, index=table.index)
        relabelled = relabel & new_labels.notna() & ~table["path"].isin(dropped)
        table.loc[relabelled, "label"] = new_labels[relabelled]
        gone = table["path"].isin(dropped)
        unreadable = int(len(set(hard.loc[hard["reason"] == "unreadable", "path"]) - set(table["path"])))
        changed = {"dropped": int(gone.sum()) + unreadable, "relabelled": int(relabelled.sum())}
        table = table[~gone]
    write_csv(path, table.reset_index(drop=True))
    return {"output": str(path), "policy": policy, "rows_in": len(items), "rows_out": len(table),
            "rows_changed": int(sum(changed.values())), **changed}
