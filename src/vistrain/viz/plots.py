"""PNG plots of a run directory: training curves, class distribution, confusion matrices, reliability.

Every figure is a ``matplotlib.figure.Figure`` drawn on an explicit Agg canvas, so nothing here touches
pyplot's global backend or figure registry: the functions are safe to call from a training process, a
notebook with an interactive backend, or a thread. matplotlib is imported inside the functions because
importing it costs about half a second that ``vistrain --help`` should not pay.

Every PNG is rendered to memory and written with ``atomic_write_bytes``, so a reader (the HTML report,
TensorBoard, a browser refreshing the folder) never sees a half-written file.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vistrain.registry import higher_is_better
from vistrain.tracking.files import atomic_write_bytes, read_json_dict

if TYPE_CHECKING:  # only for annotations; the real imports are lazy
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DPI = 100
MAX_TICK_LABELS = 40  # more labels than this on one axis overlap at any sensible figure size
MAX_NAME_CHARS = 18  # long class names are cut so they do not eat the plot area
MAX_GROUPED_BARS = 150  # class distribution: more bars than this turn into a heat map
ANNOTATE_MAX_CLASSES = 20  # cell values are written into confusion matrices up to this many classes


# --------------------------------------------------------------------------------------------- helpers
def new_figure(width: float, height: float) -> Figure:
    """A Figure on its own Agg canvas (no pyplot): the backend is chosen here, per figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """Render ``fig`` to PNG bytes in memory, then write them atomically to ``path``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def short_name(name: Any, limit: int = MAX_NAME_CHARS) -> str:
    """``name`` as text, cut with an ellipsis beyond ``limit`` characters."""
    text = str(name)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def thinned_ticks(ax: Axes, axis: str, names: Sequence[str], rotate: bool = False) -> None:
    """Label at most ``MAX_TICK_LABELS`` evenly spaced positions; every class keeps its slot."""
    step = max(1, math.ceil(len(names) / MAX_TICK_LABELS))
    positions = np.arange(0, len(names), step)
    labels = [short_name(names[i]) for i in positions]
    if axis == "x":
        ax.set_xticks(positions, labels, rotation=90 if rotate else 0, fontsize=_tick_fontsize(len(positions)))
    else:
        ax.set_yticks(positions, labels, fontsize=_tick_fontsize(len(positions)))


def needs_rotation(names: Sequence[str]) -> bool:
    """Vertical x labels once they would collide side by side: many classes or long names."""
    return len(names) > 12 or max((len(str(n)) for n in names), default=0) > 4


def _tick_fontsize(n_labels: int) -> float:
    return 9 if n_labels <= 20 else 7


def lower_is_better(metric: str) -> bool:
    return not higher_is_better(metric)


def run_monitor(run_dir: Path, summary: dict[str, Any]) -> str:
    """The metric that picks the best epoch: summary.json's, else config.yaml's (a run still going)."""
    if summary.get("monitor"):
        return str(summary["monitor"])
    import yaml

    try:
        config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8")) or {}
        return str(config["train"]["monitor"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return "macro_f1"


def read_metrics(path: Path) -> dict[int, list[dict[str, Any]]]:
    """metrics.jsonl grouped by fold, each fold's rows sorted by epoch, the last row of an epoch kept.

    A line that does not parse (a run killed mid-write) is skipped rather than failing the plot.
    """
    by_key: dict[tuple[int, int], dict[str, Any]] = {}
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                by_key[(int(row["fold"]), int(row["epoch"]))] = row
            except (ValueError, KeyError, TypeError):
                continue
    folds: dict[int, list[dict[str, Any]]] = {}
    for (fold, _epoch), row in sorted(by_key.items()):
        folds.setdefault(fold, []).append(row)
    return folds


def class_names(run_dir: Path) -> list[str]:
    """Class names in index order from class_map.json (empty when the file is missing)."""
    idx_to_class = read_json_dict(Path(run_dir) / "class_map.json").get("idx_to_class", {})
    return [str(idx_to_class[k]) for k in sorted(idx_to_class, key=int)]


# ----------------------------------------------------------------------------------- training curves
def training_plots(run_dir: Path) -> list[Path]:
    """Write every plot a run directory's files allow; return the PNGs written.

    ``plots/fold{k}_curves.png`` per fold in metrics.jsonl, ``plots/class_distribution.png`` from
    splits.csv, and ``plots/oof_confusion_matrix.png`` when ``oof/oof_logits.npy`` exists.
    """
    run_dir = Path(run_dir)
    out = run_dir / "plots"
    summary = read_json_dict(run_dir / "summary.json")
    monitor = run_monitor(run_dir, summary)
    best_epochs = {int(f["fold"]): f.get("best_epoch") for f in summary.get("folds", []) if "fold" in f}
    ratio = (summary.get("split") or {}).get("type") == "ratio"
    written = [fold_curves_png(rows, monitor, out / f"fold{fold}_curves.png", fold, best_epochs.get(fold), ratio)
               for fold, rows in read_metrics(run_dir / "metrics.jsonl").items()]
    names = class_names(run_dir)
    if (run_dir / "splits.csv").is_file():
        written.append(class_distribution_png(run_dir / "splits.csv", names, out / "class_distribution.png"))
    if (run_dir / "oof" / "oof_logits.npy").is_file() and (run_dir / "oof" / "oof_targets.npy").is_file():
        written.append(oof_confusion_matrix_png(run_dir, names, out / "oof_confusion_matrix.png"))
    return written


def fold_curves_png(rows: list[dict[str, Any]], monitor: str, path: Path, fold: int,
                    best_epoch: int | None = None, ratio: bool = False) -> Path:
    """Three panels for one fold: losses, the monitor metric (+ accuracy), learning rate (log scale). ``ratio``:
    the run's one model of a ratio split (data.split: ratio), trained on the train split, validated on val."""
    fig = new_figure(15, 4.2)
    ax_loss, ax_metric, ax_lr = fig.subplots(1, 3)
    which = "ratio split: trained on split=train, validated on split=val" if ratio else f"fold {fold}"
    fig.suptitle(which + (f" (best epoch {best_epoch})" if best_epoch is not None else ""))
    _plot_series(ax_loss, rows, ["train_loss", "valid_loss"], "loss")
    metric_keys = [monitor] + (["accuracy"] if monitor != "accuracy" else [])
    _plot_series(ax_metric, rows, metric_keys, monitor, twin_second=lower_is_better(monitor))
    _plot_series(ax_lr, rows, ["lr"], "learning rate", log_scale=True)
    if best_epoch is not None:
        for ax in (ax_loss, ax_metric):  # where the checkpoint that the run kept came from
            ax.axvline(best_epoch, color="0.6", linestyle=":", linewidth=1)
    return save_png(fig, path)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of ``key`` over the rows that have it as a finite number."""
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(float(row["epoch"]))
            ys.append(float(value))
    return xs, ys


def _plot_series(ax: Axes, rows: list[dict[str, Any]], keys: list[str], title: str, log_scale: bool = False,
                 twin_second: bool = False) -> None:
    """One line per key present; markers so a single epoch still shows as a point."""
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    epochs: set[float] = set()
    lines, target = [], ax
    for i, key in enumerate(keys):
        xs, ys = _series(rows, key)
        if not xs:
            continue
        if twin_second and epochs:  # e.g. accuracy next to a loss monitor: its own y-axis on the right
            target = ax.twinx()
            target.set_ylabel(key)
        lines += target.plot(xs, ys, marker="o", markersize=4, label=key, color=f"C{i}")
        if log_scale and min(ys) > 0:
            target.set_yscale("log")
        epochs.update(xs)
    if not epochs:
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="0.5")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    _epoch_axis(ax, sorted(epochs))
    # On the axis drawn last, so a twin axis cannot paint over the legend.
    target.legend(lines, [line.get_label() for line in lines], fontsize=8)


def _epoch_axis(ax: Axes, epochs: list[float]) -> None:
    """Whole-number epoch ticks; a single epoch gets one tick in the middle instead of 0.945 ... 1.05."""
    from matplotlib.ticker import MaxNLocator

    if len(epochs) == 1:
        ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
        ax.set_xticks(epochs)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# -------------------------------------------------------------------------------- class distribution
def fold_class_counts(splits_csv: Path, names: list[str]) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
    """(class names, folds, train counts [F, C], valid counts [F, C]) for every fold in splits.csv; a ratio split
    (``is_ratio_split``) as one "fold" 0: its train and val splits.

    Labels absent from ``names`` (no class_map.json) are appended in sorted order.
    """
    import pandas as pd

    splits = pd.read_csv(splits_csv, dtype={"label": str}, keep_default_na=False)
    names = list(names) + sorted(set(splits["label"]) - set(names))
    index = {n: i for i, n in enumerate(names)}
    label_idx = splits["label"].map(index).to_numpy(dtype=np.int64)
    fold = splits["fold"].to_numpy(dtype=np.int64)
    if is_ratio_split(splits):  # one model; the test items train in none
        split = splits["split"].to_numpy()
        train, valid = (np.bincount(label_idx[split == part], minlength=len(names))[None] for part in ("train", "val"))
        return names, [0], train, valid
    folds = [int(k) for k in np.unique(fold)]
    train = np.stack([np.bincount(label_idx[fold != k], minlength=len(names)) for k in folds])
    valid = np.stack([np.bincount(label_idx[fold == k], minlength=len(names)) for k in folds])
    return names, folds, train, valid


RATIO_SPLIT_NAMES = {"train": "train", "validation": "val"}  # the panels' parts as splits.csv's split column names


def is_ratio_split(splits: Any) -> bool:
    """splits.csv (a DataFrame) of a ``data.split: ratio`` run: a split column, fold -1 outside the val split."""
    return "split" in splits.columns and bool((splits["fold"].to_numpy(dtype=np.int64) < 0).any())


def class_distribution_png(splits_csv: Path, names: list[str], path: Path) -> Path:
    """Per-class image counts of each fold's train part (top) and validation part (bottom); of a ratio split, its
    train and val splits.

    Grouped bars (one per fold) while they stay wider than a hairline; beyond ``MAX_GROUPED_BARS`` bars
    a fold x class heat map, which stays readable at 100 classes and still shows an empty class.
    """
    import pandas as pd

    ratio = is_ratio_split(pd.read_csv(splits_csv, usecols=lambda c: c in ("fold", "split")))
    names, folds, train, valid = fold_class_counts(splits_csv, names)
    n_classes = len(names)
    grouped = n_classes * len(folds) <= MAX_GROUPED_BARS
    width = min(max(8.0, 2 + (0.09 * len(folds) if grouped else 0.16) * n_classes), 24.0)
    fig = new_figure(width, 7.5 if grouped else 2.2 + 0.5 * len(folds))
    axes = fig.subplots(2, 1, sharex=True)
    for ax, counts, part in zip(axes, (train, valid), ("train", "validation"), strict=True):
        (_grouped_bars if grouped else _count_heatmap)(ax, counts, folds, part, ratio)
        ax.set_title(f"{RATIO_SPLIT_NAMES[part]} split (data.split: ratio)" if ratio else f"{part} part of each fold")
    if grouped:  # above the panels, where it cannot cover a bar
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncols=min(len(folds), 10),
                   fontsize=8)
    thinned_ticks(axes[1], "x", names, rotate=needs_rotation(names))
    axes[1].set_xlim(-0.6, n_classes - 0.4)
    return save_png(fig, path)


def _grouped_bars(ax: Axes, counts: np.ndarray, folds: list[int], part: str, ratio: bool = False) -> None:
    width = 0.8 / len(folds)
    for i, k in enumerate(folds):
        offset = (i - (len(folds) - 1) / 2) * width
        label = "ratio split" if ratio else f"fold {k}"
        ax.bar(np.arange(counts.shape[1]) + offset, counts[i], width=width, label=label, color=f"C{i % 10}")
    ax.set_ylabel(f"{part} images")
    ax.grid(axis="y", alpha=0.3)


def _count_heatmap(ax: Axes, counts: np.ndarray, folds: list[int], part: str, ratio: bool = False) -> None:
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
    ax.figure.colorbar(image, ax=ax, pad=0.01, fraction=0.03, label=f"{part} images")
    ax.set_yticks(range(len(folds)), ["ratio split" if ratio else f"fold {k}" for k in folds], fontsize=8)


# -------------------------------------------------------------------------------- confusion matrices
def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """[C, C] counts, rows the true class, columns the predicted one."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    flat = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def row_normalize(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (recall on the diagonal); a class with no sample stays all zero."""
    cm = np.asarray(cm, dtype=np.float64)
    totals = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)


def oof_confusion_matrix_png(run_dir: Path, names: list[str], path: Path) -> Path:
    """Row-normalised confusion matrix of the out-of-fold predictions."""
    logits = np.load(Path(run_dir) / "oof" / "oof_logits.npy")
    targets = np.load(Path(run_dir) / "oof" / "oof_targets.npy")
    n_classes = logits.shape[1]
    names = names if len(names) == n_classes else [str(i) for i in range(n_classes)]
    cm = confusion_counts(targets, logits.argmax(axis=1), n_classes)
    acc = float(np.trace(cm) / max(cm.sum(), 1))
    return confusion_matrix_png(cm, names, path, normalize=True,
                                title=f"out-of-fold confusion matrix (accuracy {acc:.4f}, n={int(cm.sum())})")


def confusion_matrix_png(cm: np.ndarray, class_names: list[str], path: Path, normalize: bool = True,
                         title: str = "") -> Path:
    """Heat map of ``cm`` (rows true, columns predicted), sized by the class count.

    ``normalize`` divides each row by its sum; values are written in the cells up to
    ``ANNOTATE_MAX_CLASSES`` classes, beyond that the tick labels are thinned and only colour is shown.
    """
    cm = np.asarray(cm)
    n = cm.shape[0]
    if cm.shape != (n, n) or len(class_names) != n:
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(class_names)} class names")
    values = row_normalize(cm) if normalize else cm.astype(np.float64)
    side = min(max(5.5, 2.5 + 0.15 * n), 20.0)  # ~15 px per cell at 100 classes
    fig = new_figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, fraction=0.04, label="fraction of the true class" if normalize else "count")
    if n <= ANNOTATE_MAX_CLASSES:
        _annotate_cells(ax, values, normalize)
    thinned_ticks(ax, "x", class_names, rotate=needs_rotation(class_names))
    thinned_ticks(ax, "y", class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or ("confusion matrix (row-normalised)" if normalize else "confusion matrix"))
    return save_png(fig, path)


def _annotate_cells(ax: Axes, values: np.ndarray, normalize: bool) -> None:
    """Value in every cell, white on dark cells so it stays readable."""
    top = values.max() if values.size else 0
    fontsize = 8 if len(values) <= 10 else 6
    for (i, j), v in np.ndenumerate(values):
        if v == 0:
            continue  # empty cells stay blank: the eye goes to the errors that exist
        text = f"{v:.2f}" if normalize else f"{int(round(v))}"
        ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                color="white" if top and v > 0.6 * top else "black")


# -------------------------------------------------------------------------------- reliability diagram
Bins = Sequence[Mapping[str, Any]]


def reliability_diagram_png(bins: Mapping[str, Bins] | Bins, path: Path, ece_before: float | None = None,
                            ece_after: float | None = None) -> Path:
    """Accuracy per confidence bin against the diagonal of perfect calibration.

    ``bins`` is one list of ``{lo, hi, count, confidence, accuracy}`` dicts, or a dict of such lists
    (``{"before": [...], "after": [...]}``), drawn side by side with the matching ECE in each title.
    """
    sets = dict(bins) if isinstance(bins, Mapping) else {"": bins}
    eces = {"before": ece_before, "after": ece_after, "": ece_after if ece_after is not None else ece_before}
    fig = new_figure(5.2 * len(sets), 5.6)
    axes = np.atleast_1d(fig.subplots(1, len(sets), squeeze=False)[0])
    for ax, (label, one) in zip(axes, sets.items(), strict=True):
        _reliability_panel(ax, list(one), label, eces.get(label))
    return save_png(fig, path)


def _bin_edges(bins: list[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) per bin; bins without edges are taken as equal-width bins over [0, 1]."""
    n = len(bins)
    lo = np.array([b.get("lo", i / n) for i, b in enumerate(bins)], dtype=np.float64)
    hi = np.array([b.get("hi", (i + 1) / n) for i, b in enumerate(bins)], dtype=np.float64)
    return lo, hi


def _number(value: Any) -> float:
    """A bin field as a float; None (an empty bin) reads as NaN."""
    return float(value) if value is not None else math.nan


def _reliability_panel(ax: Axes, bins: list[Mapping[str, Any]], label: str, ece: float | None) -> None:
    lo, hi = _bin_edges(bins)
    count = np.array([_number(b.get("count", 0)) for b in bins])
    conf = np.array([_number(b.get("confidence")) for b in bins])
    acc = np.array([_number(b.get("accuracy")) for b in bins])
    used = (count > 0) & np.isfinite(acc)  # empty bins have no accuracy to show
    ax.bar(lo[used], acc[used], width=(hi - lo)[used], align="edge", color="C0", alpha=0.8,
           edgecolor="white", label="accuracy")
    ok = used & np.isfinite(conf)
    ax.scatter(conf[ok], acc[ok], color="C3", s=18, zorder=3, label="mean confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.3", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    parts = [label] if label else []
    parts += [f"ECE {ece:.4f}"] if ece is not None else ([] if label else ["reliability"])
    ax.set_title(": ".join(parts))
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)


# --------------------------------------------------------------------------------------------- search
def search_grid_png(query: Path, results: Any, path: Path, query_label: str | None = None, cols: int = 5) -> Path:
    """The query image, then the top-k results (a table with path, class, similarity or distance, correct),
    each captioned with its rank, class and score; correct results framed green, wrong ones red."""
    from PIL import Image

    from vistrain.data.images import load_rgb

    rows = results.to_dict("records") if hasattr(results, "to_dict") else list(results)
    score_key = "similarity" if rows and "similarity" in rows[0] else "distance"
    n_rows = 1 + math.ceil(len(rows) / cols)
    fig = new_figure(2.2 * cols, 2.6 * n_rows)
    grid = fig.add_gridspec(n_rows, cols)

    def show(ax: Axes, image_path: str | Path, title: str, colour: str | None) -> None:
        img = load_rgb(image_path)
        img.thumbnail((256, 256), Image.Resampling.BILINEAR)
        ax.imshow(np.asarray(img))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=8)
        for spine in ax.spines.values():
            spine.set_edgecolor(colour or "grey")
            spine.set_linewidth(3 if colour else 0.5)

    show(fig.add_subplot(grid[0, 0]), query, f"query\n{short_name(query_label) if query_label else ''}", "blue")
    for i, r in enumerate(rows):
        correct = r.get("correct")
        colour = None if correct is None or (isinstance(correct, float) and math.isnan(correct)) else (
            "green" if correct else "red")
        title = f"#{r['rank']} {short_name(r.get('class') or '')}\n{score_key} {r[score_key]:.3f}"
        show(fig.add_subplot(grid[1 + i // cols, i % cols]), r["path"], title, colour)
    return save_png(fig, path)
