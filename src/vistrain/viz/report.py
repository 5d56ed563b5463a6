"""``report.html``: one self-contained page per run directory.

Everything the page shows is inside the file (images as base64 data URIs, inline CSS, one tiny inline
script), so it can be mailed, attached to a ticket or opened from an archive with no server and no
network. A Content-Security-Policy meta tag makes the browser refuse any external fetch, which keeps
that promise checked rather than hoped for. Every piece of text from the run goes through
``html.escape``: class names, config values and paths are user data.
"""

from __future__ import annotations

import base64
import csv
import html
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vistrain.registry import domain_metrics
from vistrain.tracking.files import atomic_write_text, read_json_dict

PER_CLASS_SPLITS = ("oof", "val", "valid", "test")  # which eval/<split>/per_class.csv the page shows first
CALIBRATION_KEYS = ("temperature", "nll_before", "nll_after", "ece_before", "ece_after")
DOMAIN_METRICS = domain_metrics()  # the "<metric>@<domain>" keys of metrics.jsonl / summary.json
DOMAIN_COLUMNS = ("n", *DOMAIN_METRICS, "balanced_accuracy")  # the per-domain table's columns, those present
_INTERVAL_NOTE = ("value [95% interval]: percentiles 2.5 and 97.5 of the figure over bootstrap resamples of the "
                  "evaluated images (eval.bootstrap replicates)")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2430;background:#f4f6f9}
header{background:#1f3b57;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:22px}
header .meta{opacity:.85;font-size:13px}
main{max-width:1280px;margin:0 auto;padding:12px 28px 40px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:14px 20px;margin:16px 0}
h2{font-size:17px;margin:2px 0 10px;color:#1f3b57}
h3{font-size:14px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:4px 0}
th,td{border-bottom:1px solid #e3e7ee;padding:4px 10px;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
th{background:#eef2f7;position:sticky;top:0}
tr.agg td{font-weight:600;background:#f7f9fc}
td.low{color:#b3261e;font-weight:600}
.scroll{max-height:480px;overflow:auto}
pre{background:#f7f9fc;border:1px solid #e3e7ee;border-radius:6px;padding:10px;overflow:auto;max-height:420px;
font-size:12px}
figure{margin:10px 0 18px}
figure img{max-width:100%;height:auto;border:1px solid #e3e7ee;border-radius:4px}
figcaption{font-size:12px;color:#5b6675;margin-top:2px}
.note{color:#5b6675}
"""

# Counts the images the browser actually decoded, so a headless test can check that none is broken.
SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesOk = ok + "/" + imgs.length;
});
"""

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


# ------------------------------------------------------------------------------------------ reading
def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


AUGMENT_GRID = "plots/augment_grid.png"  # the first training batch (engine/hooks/augment_grid.py): its own section


def report_images(run_dir: Path) -> list[Path]:
    """The PNGs the report shows under Plots, in page order: plots/ (but the augment grid), then eval/<split>/,
    then the run root."""
    images = sorted((p for p in (run_dir / "plots").glob("*.png") if p != run_dir / AUGMENT_GRID), key=_plot_order)
    images += sorted((run_dir / "eval").glob("*/*.png"), key=_plot_order)
    images += sorted(run_dir.glob("*.png"), key=_plot_order)
    return images


def _plot_order(path: Path) -> tuple[int, list[Any]]:
    """Training curves first, then the rest; numbers compared as numbers (fold2 before fold10)."""
    name = str(path)
    natural = [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
    return (0 if path.name.endswith("_curves.png") else 1, natural)


def per_class_file(run_dir: Path) -> Path | None:
    """eval/<split>/per_class.csv of the preferred split (oof, val, valid, test, then any other)."""
    found = {p.parent.name: p for p in (run_dir / "eval").glob("*/per_class.csv")}
    for split in [*PER_CLASS_SPLITS, *sorted(found)]:
        if split in found:
            return found[split]
    return None


# ------------------------------------------------------------------------------------------ formatting
def fmt(value: Any) -> str:
    """A cell value as escaped text: floats to 4 decimals, tiny ones in scientific notation."""
    if isinstance(value, bool) or value is None:
        return html.escape(str(value if value is not None else ""))
    if isinstance(value, float):
        if not math.isfinite(value):
            return html.escape(str(value))
        return f"{value:.3e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
    return html.escape(str(value))


def _num(text: str) -> Any:
    """CSV text to int or float when it is one, so numbers get the same formatting as JSON values."""
    for cast in (int, float):
        try:
            return cast(text)
        except (TypeError, ValueError):
            continue
    return text


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], row_classes: Sequence[str] = ()) -> str:
    """An HTML table; ``rows`` hold raw values (escaped here), ``row_classes`` an optional class per row."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if i < len(row_classes) and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(_cell(v) for v in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _cell(value: Any) -> str:
    return value.html if isinstance(value, Raw) else f"<td>{fmt(value)}</td>"


class Raw:
    """A pre-built, already escaped ``<td>`` (for cells that need a class)."""

    def __init__(self, html_text: str):
        self.html = html_text


UNDEFINED = Raw('<td title="no images of this class here">\u2014</td>')  # an empty metric cell of a CSV


def section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def with_interval(value: Any, interval: Any) -> Any:
    """``0.9120 [0.8970, 0.9260]``: a figure with its 95% bootstrap interval (metrics.json's ``intervals``), or
    the value as it is when it has none."""
    if isinstance(value, float) and isinstance(interval, list) and len(interval) == 2:
        return f"{fmt(value)} [{fmt(float(interval[0]))}, {fmt(float(interval[1]))}]"
    return value


def key_values(mapping: dict[str, Any]) -> str:
    """A two-column table of the scalar entries of ``mapping``."""
    rows = [(k, v) for k, v in mapping.items() if not isinstance(v, dict | list)]
    return table(["name", "value"], rows) if rows else ""


# ------------------------------------------------------------------------------------------ sections
def header_html(run_dir: Path, summary: dict[str, Any], status: dict[str, Any]) -> str:
    run_id = summary.get("run_id") or status.get("run_id") or run_dir.name
    meta = [f"status: {status.get('status', 'unknown')}", f"started: {status.get('started', '?')}",
            f"directory: {run_dir}"]
    if "timings" in summary:
        meta.append(f"total time: {summary['timings'].get('total_s', '?')} s")
    return (f"<header><h1>vistrain run {html.escape(str(run_id))}</h1>"
            f"<div class=\"meta\">{html.escape(' | '.join(meta))}</div></header>")


def folds_html(summary: dict[str, Any]) -> str:
    """Per-fold table (best epoch, epochs run, every best metric) with a mean ± std row."""
    folds = summary.get("folds") or []
    if not folds:
        return section("Folds", '<p class="note">summary.json is missing or has no folds '
                                "(the run is still running or failed).</p>")
    metrics = list(dict.fromkeys(k for f in folds for k in f.get("best", {})))
    headers = ["fold", "best epoch", "epochs run", "stopped early", "time (s)", *metrics]
    rows = [[f.get("fold"), f.get("best_epoch"), f.get("epochs_run"), f.get("stopped_early"), _seconds(f.get("time_s")),
             *(f.get("best", {}).get(m) for m in metrics)] for f in folds]
    mean, std = summary.get("mean", {}), summary.get("std", {})
    rows.append(["mean ± std", "", "", "", "", *(_mean_std(mean.get(m), std.get(m)) for m in metrics)])
    monitor = html.escape(str(summary.get("monitor", "?")))
    body = f"<p>Best epoch chosen by <b>{monitor}</b>.</p>" + table(headers, rows, [""] * len(folds) + ["agg"])
    return section("Folds", body)


def _seconds(value: Any) -> Any:
    return f"{value:.1f}" if isinstance(value, int | float) else value


def _mean_std(mean: Any, std: Any) -> str:
    if not isinstance(mean, int | float):
        return ""
    return f"{mean:.4f} ± {std:.4f}" if isinstance(std, int | float) else f"{mean:.4f}"


def metrics_html(run_dir: Path, summary: dict[str, Any]) -> str:
    """OOF metrics from summary.json and the scalar metrics of each eval/<split>/metrics.json."""
    parts = []
    if summary.get("oof"):
        parts.append("<h3>out of fold</h3>" + key_values(summary["oof"]))
    for path in sorted((run_dir / "eval").glob("*/metrics.json")):
        data = read_json_dict(path)
        intervals = data.get("intervals") if isinstance(data.get("intervals"), dict) else {}
        values = key_values({k: with_interval(v, intervals.get(k)) for k, v in data.items()})
        if values:
            note = f'<p class="note">{_INTERVAL_NOTE}</p>' if intervals else ""
            parts.append(f"<h3>eval / {html.escape(path.parent.name)}</h3>" + note + values)
    return section("Metrics", "".join(parts)) if parts else ""


def failure_threshold(run_dir: Path, default: float = 0.7) -> float:
    """``eval.failure_threshold`` from config.yaml: the F1 below which a class counts as failing."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        return float(config["eval"]["failure_threshold"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return default


def per_class_html(run_dir: Path, low_f1: float = 0.7) -> str:
    """Per-class precision / recall / F1 of the preferred split; F1 below ``low_f1`` is highlighted."""
    path = per_class_file(run_dir)
    if path is None:
        return ""
    rows = _read_csv(path)
    if not rows:
        return ""
    headers = list(rows[0])
    cells = [[_per_class_cell(k, _num(r.get(k, "")), low_f1) for k in headers] for r in rows]
    note = f'<p class="note">from {html.escape(str(path.relative_to(run_dir)))}; F1 below {low_f1} in red</p>'
    body = f'{note}<div class="scroll">{table(headers, cells)}</div>'
    return section(f"Per-class metrics ({path.parent.name})", body)


def _per_class_cell(key: str, value: Any, low_f1: float) -> Any:
    if key == "f1" and isinstance(value, int | float) and value < low_f1:
        return Raw(f'<td class="low">{fmt(value)}</td>')
    if value == "" and key not in ("class", "display_name"):
        return UNDEFINED  # a class without images there: no recall or F1, not 0
    return value


def domain_html(run_dir: Path, summary: dict[str, Any], threshold: float = 0.7) -> str:
    """Per-domain metrics: the best epochs' validation values (summary.json's ``<metric>@<domain>`` means over
    the folds) and each eval/<split>/metrics.json ``per_domain`` block; then the classes whose accuracy on a
    domain's images (per_class.csv's ``recall@<domain>``) is under ``threshold``."""
    parts = []
    validation: dict[str, dict[str, Any]] = {}
    for key, value in (summary.get("mean") or {}).items():
        metric, sep, domain = key.partition("@")
        if sep and metric in DOMAIN_METRICS:
            validation.setdefault(domain, {})[metric] = value
    if validation:
        parts.append("<h3>validation, best epoch (mean over folds)</h3>" + _domain_table(validation))
    for path in sorted((run_dir / "eval").glob("*/metrics.json")):
        per_domain = read_json_dict(path).get("per_domain")
        if isinstance(per_domain, dict) and per_domain:
            parts.append(f"<h3>eval / {html.escape(path.parent.name)}</h3>" + _domain_table(per_domain))
    if not parts:
        return ""
    return section("Per-domain metrics", "".join(parts) + _domain_failures(run_dir, threshold))


def _domain_table(per_domain: dict[str, Any]) -> str:
    values = {d: m for d, m in sorted(per_domain.items()) if isinstance(m, dict)}
    columns = [c for c in DOMAIN_COLUMNS if any(c in m for m in values.values())]

    def cell(m: dict[str, Any], column: str) -> Any:
        intervals = m.get("intervals") if isinstance(m.get("intervals"), dict) else {}
        return with_interval(m.get(column), intervals.get(column))

    return table(["domain", *columns], [[d, *(cell(m, c) for c in columns)] for d, m in values.items()])


def _domain_failures(run_dir: Path, threshold: float) -> str:
    """Per domain, the classes with images there whose accuracy on them is under ``threshold``, worst first."""
    path = per_class_file(run_dir)
    rows = _read_csv(path) if path is not None else []
    domains = [k.removeprefix("recall@") for k in (rows[0] if rows else {}) if k.startswith("recall@")]
    if not domains:
        return ""
    named = "display_name" in rows[0]
    found = []
    for domain in domains:
        low = [(_num(r[f"recall@{domain}"]), r) for r in rows
               if _num(r.get(f"support@{domain}", "0")) > 0 and _num(r[f"recall@{domain}"]) < threshold]
        found += [[domain, r["class"], *([r["display_name"]] if named else []), Raw(f'<td class="low">{fmt(acc)}</td>'),
                   _num(r[f"support@{domain}"])] for acc, r in sorted(low, key=lambda x: x[0])]
    where = html.escape(str(path.relative_to(run_dir)))
    if not found:
        return f'<p class="note">every class scores at least {threshold} accuracy in every domain ({where})</p>'
    headers = ["domain", "class", *(["display name"] if named else []), "accuracy", "images"]
    return (f"<h3>classes under accuracy {threshold} per domain</h3>"
            f'<p class="note">from {where}</p><div class="scroll">{table(headers, found)}</div>')


def calibration_html(run_dir: Path) -> str:
    cal = read_json_dict(run_dir / "calibration.json")
    if not cal:
        return ""
    known = {k: cal[k] for k in CALIBRATION_KEYS if k in cal}
    rest = {k: v for k, v in cal.items() if k not in known}
    notes = []
    where = cal.get("calibration")
    if isinstance(where, dict):  # which rows the after-figures come from
        notes.append(f"fitted on {where.get('fitted_on')}; figures on {where.get('evaluated_on')}"
                     f"{' (in sample)' if where.get('in_sample') else ' (out of sample)'}")
    ensemble = cal.get("ensemble")
    if isinstance(ensemble, dict) and ensemble.get("note"):
        notes.append(f"fold ensemble: {ensemble['note']}")
    lines = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    return section("Calibration (temperature scaling)", key_values({**known, **rest}) + lines)


def _figure(run_dir: Path, path: Path) -> str:
    """The PNG as an inline data URI, captioned with its path inside the run directory ("" when unreadable)."""
    try:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return ""  # removed between listing and reading: leave it out rather than show a broken image
    rel = html.escape(str(path.relative_to(run_dir)))
    return f'<figure><img alt="{rel}" src="data:image/png;base64,{data}"><figcaption>{rel}</figcaption></figure>'


def images_html(run_dir: Path) -> str:
    figures = "".join(_figure(run_dir, path) for path in report_images(run_dir))
    return section("Plots", figures) if figures else ""


def augment_html(run_dir: Path) -> str:
    """The first training batch as the model received it (augmented, mixed, de-normalised), with its labels."""
    figure = _figure(run_dir, run_dir / AUGMENT_GRID) if (run_dir / AUGMENT_GRID).is_file() else ""
    note = ('<p class="note">The first batch of the first fold, drawn before it trained; <code>vistrain augment '
            "--config F</code> draws the same for any config.</p>")
    return section("What the model trained on", note + figure) if figure else ""


def audit_html(run_dir: Path) -> str:
    """A link to ``audit/audit.html`` (``vistrain audit RUN``) with its headline counts, when it exists."""
    if not (run_dir / "audit" / "audit.html").is_file():
        return ""
    audit = read_json_dict(run_dir / "audit" / "audit.json")
    dups, issues = audit.get("duplicates") or {}, audit.get("label_issues") or {}
    counts = {"duplicate images across splits (leakage)": dups.get("cross_split"),
              "duplicate groups": dups.get("groups"), "label issues": issues.get("count"),
              "outliers": (audit.get("outliers") or {}).get("total")}
    link = '<p><a href="audit/audit.html">audit/audit.html</a>: label issues, duplicates, outliers, class health</p>'
    return section("Data audit", link + key_values({k: v for k, v in counts.items() if v is not None}))


def environment_html(summary: dict[str, Any]) -> str:
    env = summary.get("environment") or {}
    return section("Environment", key_values(env)) if env else ""


def config_html(run_dir: Path) -> str:
    text = _read_text(run_dir / "config.yaml")
    body = f"<pre>{html.escape(text)}</pre>" if text is not None else '<p class="note">config.yaml not found</p>'
    return section("Configuration (config.yaml)", body)


# ------------------------------------------------------------------------------------------ the page
def render_report(run_dir: Path) -> str:
    """The page as a string (``write_report`` writes it)."""
    run_dir = Path(run_dir)
    summary = read_json_dict(run_dir / "summary.json")
    status = read_json_dict(run_dir / "run.json")
    title = html.escape(f"vistrain report: {summary.get('run_id') or status.get('run_id') or run_dir.name}")
    body = "".join([
        folds_html(summary), metrics_html(run_dir, summary), domain_html(run_dir, summary, failure_threshold(run_dir)),
        per_class_html(run_dir, failure_threshold(run_dir)),
        calibration_html(run_dir), audit_html(run_dir), augment_html(run_dir), images_html(run_dir),
        environment_html(summary),
        config_html(run_dir),
    ])
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{title}</title><style>{CSS}</style><script>{SCRIPT}</script></head>"
        f"<body>{header_html(run_dir, summary, status)}<main>{body}</main></body></html>\n"
    )


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` (atomically) and return its path; MODEL_CARD.md beside it is refreshed too
    (``train`` and ``report`` write both; a card that cannot be written is a warning)."""
    from vistrain.viz.model_card import refresh_model_card

    path = Path(run_dir) / "report.html"
    atomic_write_text(path, render_report(run_dir))
    refresh_model_card(Path(run_dir))
    return path
