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
EXTRA_CSS = "td img{display:block;border-radius:3px}.headline{font-size:16px}.bad{color:#b3261e;font-weight:600}"


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
    leak = summary["duplicates"]["cross_split"]
    head = (f'<p class="headline">Leakage: <b class="{"bad" if leak else ""}">{leak}</b> duplicate pair(s) across '
            f"splits / folds; {summary['duplicates']['total']} duplicate pair(s) in all, "
            f"{summary['label_issues']['count']} label issue(s), {summary['outliers']['total']} outlier(s).</p>")
    counts = {"label issues": summary["label_issues"]["count"], **{
        f"duplicates {k}": v for k, v in summary["duplicates"].items() if not isinstance(v, list | dict)},
        **{f"outliers {k}": v for k, v in summary["outliers"].items()}}
    body = "".join([
        section("Summary", head + key_values(counts) + (f'<p class="note">{html.escape(summary["sources"]["note"])}'
                                                         "</p>" if summary["sources"].get("note") else "")),
        _findings("Duplicates (conflicts and leakage first)", dups, ["path_a", "path_b"],
                  ["kind", "relation", "similarity", "split_a", "split_b", "label_a", "label_b", "action"], limit,
                  "pairs of exact or near-identical images"),
        _findings("Label issues", issues, ["path"], ["id", "given_label", "suggested_label", "score", "split"], limit,
                  "cleanlab confident learning on held-out probabilities, most suspicious first"),
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
