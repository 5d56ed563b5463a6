"""``compare.html`` and ``curves.png`` of ``vistrain compare``: self-contained as report.html (its CSS and CSP,
the PNG inline, every run-provided text escaped)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from vistrain.tracking.files import atomic_write_text, read_json_dict
from vistrain.viz.plots import new_figure, read_metrics, run_monitor, save_png
from vistrain.viz.report import CSP, CSS, section, table, with_interval

CURVE_KEYS = ("valid_loss",)  # plotted beside each run's first run's monitor


def _mean_by_epoch(rows_by_fold: dict[int, list[dict[str, Any]]], key: str) -> tuple[list[float], list[float]]:
    """The mean over folds of ``key`` at each epoch (the epochs any fold logged it)."""
    by_epoch: dict[int, list[float]] = {}
    for rows in rows_by_fold.values():
        for row in rows:
            value = row.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                by_epoch.setdefault(int(row["epoch"]), []).append(float(value))
    epochs = sorted(by_epoch)
    return [float(e) for e in epochs], [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]


def curves_png(runs: list[Path], path: Path) -> Path | None:
    """Validation loss and the first run's monitor per epoch (mean over folds), one line per run; None when no
    run has metrics.jsonl."""
    curves = [read_metrics(r / "metrics.jsonl") for r in runs]
    if not any(curves):
        return None
    monitor = run_monitor(runs[0], read_json_dict(runs[0] / "summary.json"))
    keys = [*CURVE_KEYS, monitor]
    fig = new_figure(6 * len(keys), 4.2)
    for ax, key in zip(fig.subplots(1, len(keys)), keys):
        ax.set_title(f"{key} (validation, mean over folds)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        for i, (run, rows) in enumerate(zip(runs, curves)):
            xs, ys = _mean_by_epoch(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=f"[{i}] {run.name}")
        ax.legend(fontsize=8)
    return save_png(fig, path)


def _difference_rows(result: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for i, d in enumerate(result["differences"], start=1):
        for key, m in d["metrics"].items():
            rows.append([f"[{i}] - [0]", key, with_interval(m["value"], m["interval"]), m["p_value"],
                         f"[{i}] {m['verdict']}"])
        mc = d["mcnemar_top1"]
        rows.append([f"[{i}] - [0]", f"McNemar top1 (only [0] right {mc['a_only']}, only [{i}] {mc['b_only']})",
                     "", mc["p_value"], ""])
    return rows


def render_compare(result: dict[str, Any], curves: Path | None) -> str:
    """The page as a string: runs, figures with intervals, paired differences, folds, config keys, curves."""
    runs = result["runs"]
    keys = list(runs[0]["metrics"])
    parts = [
        section("Runs", table(["#", "run", "scores read"], [[i, r["run"], r["source"]] for i, r in enumerate(runs)])
                + f"<p class=\"note\">split {html.escape(result['split_reason'])}; {result['n']} images; "
                f"{result['bootstrap']['replicates']} bootstrap replicates shared by every run</p>"),
        section("Figures [95% interval]", table(["metric", *[f"[{i}]" for i in range(len(runs))]], [
            [k, *[with_interval(r["metrics"][k]["value"], r["metrics"][k]["interval"]) for r in runs]] for k in keys])),
        section("Paired differences to [0]", table(["runs", "metric", "difference [95% interval]", "p-value",
                                                    "verdict (95% interval)"], _difference_rows(result))),
    ]
    for i, folds in enumerate(result.get("fold_differences") or [], start=1):
        if folds and "folds" in folds:
            head = list(folds["folds"][0])
            parts.append(section(f"Fold by fold: [{i}] - [0]", table(head, [list(r.values()) for r in folds["folds"]])))
    if result["config_differences"]:
        parts.append(section("Config differences", table(["key", *[f"[{i}]" for i in range(len(runs))]], [
            [k, *map(str, v)] for k, v in result["config_differences"].items()])))
    if curves is not None:
        data = base64.b64encode(curves.read_bytes()).decode("ascii")
        parts.append(section("Validation curves", f'<figure><img alt="curves" src="data:image/png;base64,{data}">'
                                                  "</figure>"))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
            f"<title>vistrain compare</title><style>{CSS}</style></head>"
            f"<body><header><h1>vistrain compare</h1></header><main>{''.join(parts)}</main></body></html>\n")


def write_compare_html(result: dict[str, Any], curves: Path | None, path: Path) -> Path:
    atomic_write_text(path, render_compare(result, curves))
    return path
