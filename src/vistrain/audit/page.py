"""``audit.html``: the audit as one self-contained page in the style of ``report.html`` (its CSS, its
Content-Security-Policy, thumbnails as inline JPEG data URIs)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import pandas as pd

from vistrain.tracking.files import atomic_write_text
from vistrain.viz.report import CSP, CSS, SCRIPT, Raw, key_values, section, table

THUMB = 72  # pixels, longest side
# the border keeps a white (or blank) image visible against the white page
EXTRA_CSS = ("td img{display:block;border:1px solid #8a8f98;border-radius:3px}.headline{font-size:16px}"
             ".bad{color:#b3261e;font-weight:600}")


def thumbnail(path: str) -> Raw:
    """A ``<td>`` with the image as an inline JPEG, or a note when it cannot be decoded."""
    from vistrain.data.images import load_rgb

    try:
        img = load_rgb(path)
        img.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
    except Exception:  # noqa: BLE001 - an unreadable image is itself a finding shown in the table
        return Raw('<td class="bad">unreadable</td>')
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return Raw(f'<td><img alt="{html.escape(Path(path).name)}" src="data:image/jpeg;base64,{data}"></td>')


def _findings(title: str, frame: pd.DataFrame, thumbs: list[str], columns: list[str], limit: int,
              note: str) -> str:
    if frame.empty:
        return section(title, '<p class="note">none found</p>')
    top = frame.head(limit)
    rows = [[*(thumbnail(p) for p in r[thumbs]), *(r[c] for c in columns)] for _, r in top.iterrows()]
    more = f" (first {limit} of {len(frame)})" if len(frame) > limit else f" ({len(frame)})"
    body = f'<p class="note">{html.escape(note)}{more}</p><div class="scroll">' \
           f"{table([*('image' for _ in thumbs), *columns], rows)}</div>"
    return section(title, body)


def _health(health: dict[str, Any], confused: list[dict], items: pd.DataFrame) -> str:
    parts = [key_values({k: v for k, v in health.items() if not isinstance(v, dict)})]
    per_split = health.get("per_split", {})
    splits = list(per_split)
    parts.append("<h3>images per class and split</h3>" + table(
        ["class", "all", *splits],
        [[c, n, *(per_split[s].get(c, 0) for s in splits)] for c, n in health["per_class"].items()]))
    if health.get("per_domain"):
        doms = list(health["per_domain"])
        parts.append("<h3>images per class and domain</h3>" + table(
            ["class", *doms], [[c, *(health["per_domain"][d].get(c, 0) for d in doms)] for c in health["per_class"]]))
    if health.get("under_min_images_per_class"):
        parts.append('<p class="bad">under data.min_images_per_class: ' + html.escape(
            ", ".join(f"{c} ({n})" for c, n in health["under_min_images_per_class"].items())) + "</p>")
    if confused:
        rows = [[p["true"], p["predicted"], p["count"],
                 *(thumbnail(items["path"].iloc[i]) for i in p["examples"][:4])] for p in confused]
        parts.append("<h3>most confused pairs (given -> predicted)</h3>" +
                     table(["given", "predicted", "errors", "examples", "", "", ""], rows))
    return section("Class health", "".join(parts))


def render(summary: dict[str, Any], issues: pd.DataFrame, dups: pd.DataFrame, outliers: pd.DataFrame,
           items: pd.DataFrame, confused: list[dict], limit: int) -> str:
    d = summary["duplicates"]
    leak = d["cross_split"]
    head = (f'<p class="headline">Leakage: <b class="{"bad" if leak else ""}">{leak}</b> duplicate image(s) across '
            f"splits / folds / test in {d['cross_split_groups']} group(s); {d['groups']} duplicate group(s) in all "
            f"({d['total']} image(s) beside their representative), {summary['label_issues']['count']} label "
            f"issue(s), {summary['outliers']['total']} outlier(s).</p>")
    counts = {"images per split": ", ".join(f"{k} {v}" for k, v in summary["images_per_split"].items()),
              "label issues": summary["label_issues"]["count"], "label issues checked on":
              summary["label_issues"]["scope"], **{f"duplicates {k}": v for k, v in d.items()
                                                   if not isinstance(v, list | dict)},
              **{f"outliers {k}": v for k, v in summary["outliers"].items()}}
    note = summary["sources"].get("note") or ""
    body = "".join([
        section("Summary", head + key_values(counts) + (f'<p class="note">{html.escape(note)}</p>' if note else "")),
        _findings("Duplicate groups (conflicts and leakage first)", dups, ["path_a", "path_b"],
                  ["dup_group", "kind", "relation", "similarity", "ratio", "split_a", "split_b", "label_a", "label_b",
                   "action"], limit,
                  "each group's representative (left) beside each other member: identical pixels, or a pixel "
                  "distance far below the images' typical neighbours (ratio: the pair's distance / theirs)"),
        _findings("Label issues", issues, ["path"], ["id", "given_label", "suggested_label", "score", "split"], limit,
                  "cleanlab confident learning on held-out probabilities, most suspicious first; checked on "
                  f"{summary['label_issues']['scope']}"),
        _findings("Outliers and broken images", outliers, ["path"], ["id", "reason", "score", "label", "split"],
                  limit, "file checks and embedding outliers"),
        _health(summary["class_health"], confused, items),
    ])
    title = html.escape(f"vistrain audit: {summary.get('name', '')}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{title}</title><style>{CSS}{EXTRA_CSS}</style><script>{SCRIPT}</script></head>"
            f"<body><header><h1>{title}</h1><div class=\"meta\">{html.escape(summary.get('source', ''))}</div>"
            f"</header><main>{body}</main></body></html>\n")


def write_page(path: Path, *args: Any, **kwargs: Any) -> Path:
    atomic_write_text(path, render(*args, **kwargs))
    return path
