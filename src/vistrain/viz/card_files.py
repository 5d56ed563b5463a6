"""What a model card reads from a run directory, and the Markdown pieces it is written with.

Every file is optional: a run still training, one that failed, or one written by an older vistrain lacks some, and
its card says so instead of failing. Nothing here computes a figure; numbers are formatted as the files hold them.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from vistrain.tracking.files import read_json_dict

SPLIT_ORDER = ("val", "test", "oof")  # eval/<split>/ shown in this order, any other after them


@dataclass
class RunFiles:
    """The run's JSON / YAML files as dicts ({} when absent or unreadable) and its eval/<split>/metrics.json."""

    path: Path
    config: dict[str, Any]
    status: dict[str, Any]
    summary: dict[str, Any]
    manifest: dict[str, Any]
    class_map: dict[str, Any]
    preprocess: dict[str, Any]
    calibration: dict[str, Any]
    export: dict[str, Any]
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)

    def get(self, dotted: str, default: Any = None) -> Any:
        """A config.yaml value by its dotted key (``train.lr``); ``default`` when the run's config lacks it."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return default if node is None else node

    @property
    def task(self) -> str:
        return str(self.summary.get("task") or self.get("task") or self.manifest.get("task") or "classification")

    @property
    def reid(self) -> bool:
        return self.task == "embedding" and self.get("data.source") == "reid"

    @property
    def classes(self) -> list[str]:
        idx = self.class_map.get("idx_to_class")
        if isinstance(idx, dict) and idx:
            return [str(idx.get(str(i), "?")) for i in range(len(idx))]
        return [str(c) for c in self.manifest.get("classes") or []]

    def splits_csv(self) -> pd.DataFrame | None:
        """splits.csv (every item's fold / split, label, domain), or None."""
        try:
            return pd.read_csv(self.path / "splits.csv", dtype={"label": str, "domain": str}, keep_default_na=False)
        except (OSError, ValueError):
            return None

    def csv(self, relative: str) -> pd.DataFrame | None:
        """A result CSV of the run (eval/val/per_class.csv ...), or None when absent or unreadable."""
        try:
            return pd.read_csv(self.path / relative, dtype={"class": str}, keep_default_na=True)
        except (OSError, ValueError):
            return None


def read_config(path: Path) -> dict[str, Any]:
    """config.yaml as plain values, without validating it: an older run's keys must not stop its card."""
    import yaml

    from vistrain.config.loader import load_yaml

    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # absent, or edited by hand into something else
        return {}
    return data if isinstance(data, dict) else {}


def read_run(run_dir: Path) -> RunFiles:
    run_dir = Path(run_dir)
    evals = {p.parent.name: read_json_dict(p) for p in (run_dir / "eval").glob("*/metrics.json")}
    order = [s for s in SPLIT_ORDER if s in evals] + sorted(set(evals) - set(SPLIT_ORDER))
    return RunFiles(run_dir, read_config(run_dir / "config.yaml"), read_json_dict(run_dir / "run.json"),
                    read_json_dict(run_dir / "summary.json"), read_json_dict(run_dir / "manifest.json"),
                    read_json_dict(run_dir / "class_map.json"), read_json_dict(run_dir / "preprocess.json"),
                    read_json_dict(run_dir / "calibration.json"), read_json_dict(run_dir / "export" / "export.json"),
                    {s: evals[s] for s in order})


# ------------------------------------------------------------------------------------------ Markdown
def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def num(value: Any, digits: int = 4) -> str:
    """A figure as the card shows it: floats to ``digits`` decimals (tiny ones in scientific notation), integers
    as they are, a missing or undefined value as an em dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3e}" if 0 < abs(value) < 10 ** -(digits - 1) else f"{value:.{digits}f}"
    return text(value)


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|])")


def text(value: Any) -> str:
    """User text (class names, paths, descriptions) as Markdown that shows it literally: HTML and the characters
    Markdown or a table would read escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(str(value), quote=False)).replace("\n", " ")


def code(value: Any) -> str:
    """Inline code: shown as written (no escapes apply inside), fenced by enough backticks."""
    s = str(value).replace("\n", " ").replace("|", "¦")  # a pipe would end a table cell even inside code
    fence = "`" * (max((len(m) for m in re.findall(r"`+", s)), default=0) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (cells already Markdown), then a blank line."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) if str(c) else " " for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n\n"


def plain(value: Any) -> str:
    """A config value or a small structure in words: lists as ``a, b``, mappings as ``k: v, ...`` (never JSON)."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {plain(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return "[" + ", ".join(plain(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "none"
    return str(value)


def with_interval(value: Any, interval: Any) -> str:
    """``0.9120 [0.8970, 0.9260]``, or the value alone when it has no interval."""
    if isinstance(interval, list) and len(interval) == 2 and all(is_number(x) for x in interval):
        return f"{num(value)} [{num(float(interval[0]))}, {num(float(interval[1]))}]"
    return num(value)


def basename(path: Any) -> str:
    """The last part of a path from config.yaml: the card names files, not the training machine's folders."""
    return Path(str(path)).name or str(path)
