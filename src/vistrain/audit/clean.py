"""``audit --write-clean F --policy drop|relabel|review``: the data as a ``data.source: manifest`` list
(``path,label[,domain][,group][,split]``) with the flagged rows dropped, relabelled or marked for review.

Every row it drops or relabels is listed with its reason (``clean_changes.csv``); no other row changes. A manifest
that would drop more than ``audit.max_drop_frac`` of the rows, or leave a class under ``data.min_images_per_class``,
is refused (exit 2, nothing written) unless ``--force``: a flood of findings is a reason to look, not to delete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from vistrain.audit.outliers import HARD_REASONS
from vistrain.errors import UserError, did_you_mean

POLICIES = ("drop", "relabel", "review")
CHANGE_COLUMNS = ["path", "id", "change", "reason", "detail", "label", "new_label"]


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise UserError(f"--policy: unknown policy '{policy}'; valid: {', '.join(POLICIES)}"
                        f"{did_you_mean(policy, POLICIES)}")


@dataclass
class CleanPlan:
    """What ``--write-clean`` would write: the manifest and the rows it changes, each with its reason."""

    policy: str
    table: pd.DataFrame  # the manifest rows
    changes: pd.DataFrame  # CHANGE_COLUMNS: every dropped or relabelled row
    rows_in: int
    refused: list[str] = field(default_factory=list)  # why it would not be written (empty: fine)

    def summary(self, path: Path, forced: bool) -> dict[str, Any]:
        by_reason = self.changes["reason"].value_counts()
        dropped = int((self.changes["change"] == "dropped").sum())
        relabelled = int((self.changes["change"] == "relabelled").sum())
        out = {"output": str(path), "policy": self.policy, "rows_in": self.rows_in, "rows_out": len(self.table),
               "rows_changed": dropped + relabelled, "dropped": dropped, "relabelled": relabelled,
               "by_reason": {str(k): int(v) for k, v in by_reason.items()}, "written": not self.refused or forced}
        if self.policy == "review":
            out["flagged"] = int((self.table["review"] != "").sum())
        if self.refused:
            out["refused" if not forced else "forced_past"] = self.refused
        return out


def plan_clean(items: pd.DataFrame, policy: str, issues: pd.DataFrame, dups: pd.DataFrame, outliers: pd.DataFrame,
               keep_split: bool, keep_group: bool) -> CleanPlan:
    """The manifest of the readable training rows of ``items`` (an ``external`` column marks test images the
    manifest does not hold) and its changes."""
    check_policy(policy)
    own = items[~items["external"]] if "external" in items.columns else items
    table = pd.DataFrame({"path": own["path"].astype(str).to_numpy(), "label": own["label"].astype(str).to_numpy()})
    for col, keep in (("domain", "domain" in own.columns), ("group", keep_group), ("split", keep_split)):
        if keep:
            table[col] = own[col].astype(str).to_numpy()
    ids = dict(zip(own["path"].astype(str), own["id"].astype(str)))
    flags = _flags(issues, dups, outliers)
    rows_in = len(table)
    if policy == "review":
        table["review"] = [";".join(dict.fromkeys(r for r, _ in flags.get(p, []))) for p in table["path"]]
        suggested = dict(zip(issues["path"], issues["suggested_label"]))
        table["suggested_label"] = [suggested.get(p, "") for p in table["path"]]
        return CleanPlan(policy, table, pd.DataFrame(columns=CHANGE_COLUMNS), rows_in)
    drops = {**_label_drops(issues, policy), **_outlier_drops(outliers), **_duplicate_drops(dups, set(ids))}
    labels = dict(zip(table["path"], table["label"]))
    rows = [(p, ids[p], "dropped", reason, detail, labels[p], "") for p, (reason, detail) in drops.items() if p in ids]
    gone = table["path"].isin(drops)
    changes = [pd.DataFrame(rows, columns=CHANGE_COLUMNS)]
    if policy == "relabel":
        new = table["path"].map(dict(zip(issues["path"], issues["suggested_label"].astype(str))))
        relabel = new.notna() & ~gone & (new != table["label"])
        changes.append(pd.DataFrame({
            "path": table.loc[relabel, "path"], "id": table.loc[relabel, "path"].map(ids), "change": "relabelled",
            "reason": "label_issue", "detail": "the model's most likely class (held-out prediction)",
            "label": table.loc[relabel, "label"], "new_label": new[relabel]}, columns=CHANGE_COLUMNS))
        table.loc[relabel, "label"] = new[relabel]
    frame = pd.concat([c for c in changes if len(c)] or [pd.DataFrame(columns=CHANGE_COLUMNS)], ignore_index=True)
    return CleanPlan(policy, table[~gone].reset_index(drop=True), frame, rows_in)


def _flags(issues: pd.DataFrame, dups: pd.DataFrame, outliers: pd.DataFrame) -> dict[str, list[tuple[str, str]]]:
    """path -> [(flag, detail)] for the review column."""
    flags: dict[str, list[tuple[str, str]]] = {}
    for p in issues["path"]:
        flags.setdefault(p, []).append(("label_issue", ""))
    for a, b in zip(dups["path_a"], dups["path_b"]):
        flags.setdefault(a, []).append(("duplicate", ""))
        flags.setdefault(b, []).append(("duplicate", ""))
    for p, r in zip(outliers["path"], outliers["reason"]):
        flags.setdefault(p, []).append((f"outlier:{r}", ""))
    return flags


def _label_drops(issues: pd.DataFrame, policy: str) -> dict[str, tuple[str, str]]:
    if policy != "drop":
        return {}
    return {p: ("label_issue", f"given {g}, the model says {s}") for p, g, s in
            zip(issues["path"], issues["given_label"].astype(str), issues["suggested_label"].astype(str))}


def _outlier_drops(outliers: pd.DataFrame) -> dict[str, tuple[str, str]]:
    hard = outliers[outliers["reason"].isin(HARD_REASONS)]
    return {p: (r, f"score {s}") for p, r, s in zip(hard["path"], hard["reason"], hard["score"])}


def _duplicate_drops(dups: pd.DataFrame, own: set[str]) -> dict[str, tuple[str, str]]:
    """Per duplicate group (representative ``path_a``, members ``path_b``): labels that differ drop every
    member; a group holding a test image the manifest does not contain drops its training members (the test
    set stays as it is); otherwise the representative stays and each other member goes (across splits: leakage)."""
    out: dict[str, tuple[str, str]] = {}
    for g, part in dups.groupby("dup_group", sort=False):
        rep = part["path_a"].iloc[0]
        labels = {x for x in (*part["label_a"].iloc[:1], *part["label_b"]) if x != ""}
        paths = [rep, *part["path_b"]]
        if len(labels) > 1:
            out |= {p: ("duplicate_conflict", f"group {g}: one image, labels {', '.join(sorted(labels))}")
                    for p in paths}
        elif any(p not in own for p in paths):
            out |= {p: ("leakage", f"group {g}: also in the test set") for p in paths if p in own}
        else:
            for p, split_a, split_b, id_a in zip(part["path_b"], part["split_a"], part["split_b"], part["id_a"]):
                out[p] = ("leakage", f"group {g}: copy of {id_a} ({split_a}) in {split_b}") if split_a != split_b \
                    else ("duplicate", f"group {g}: copy of {id_a}")
    return out


def refusals(plan: CleanPlan, max_drop_frac: float, min_images: int | None) -> list[str]:
    """Why the manifest should not be written: too many rows dropped, or a class left under the minimum."""
    out = []
    dropped = int((plan.changes["change"] == "dropped").sum())
    if plan.rows_in and dropped > max_drop_frac * plan.rows_in:
        out.append(f"it would drop {dropped} of {plan.rows_in} rows ({dropped / plan.rows_in:.1%}), more than "
                   f"audit.max_drop_frac={max_drop_frac}")
    before = plan.changes.loc[plan.changes["change"] == "dropped", "label"].astype(str).value_counts() \
        .add(plan.table["label"].astype(str).value_counts(), fill_value=0)
    after = plan.table["label"].astype(str).value_counts().reindex(before.index, fill_value=0)
    floor = min_images or 1
    short = after[(after < floor) & (before >= floor)]
    if len(short):
        listed = ", ".join(f"'{c}' {int(n)}" for c, n in short.sort_values().items())
        out.append(f"it would leave {len(short)} class(es) under data.min_images_per_class={floor}: {listed}")
    return out

