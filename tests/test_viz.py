"""vistrain.viz.plots: PNGs from tiny synthetic run directories (no training)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vistrain.viz import plots
from vistrain.viz.plots import (
    confusion_counts,
    confusion_matrix_png,
    fold_class_counts,
    reliability_diagram_png,
    row_normalize,
    training_plots,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run_dir(root: Path, n_classes: int = 4, n_folds: int = 2, epochs: int = 3, trained_folds: int | None = None,
                 drop: tuple[str, ...] = (), summary: bool = True, oof: bool = True, per_class: int = 12) -> Path:
    """A run directory with the files `vistrain train` writes, filled with plausible numbers."""
    rng = np.random.default_rng(0)
    run = root / "run"
    (run / "plots").mkdir(parents=True)
    names = [f"class_{i}" for i in range(n_classes)]
    labels = np.repeat(np.arange(n_classes), per_class)
    folds = np.arange(len(labels)) % n_folds
    pd.DataFrame({"id": [f"img{i}" for i in range(len(labels))], "path": [f"/x/img{i}.jpg" for i in range(len(labels))],
                  "label": [names[i] for i in labels], "group": np.arange(len(labels)), "fold": folds}
                 ).to_csv(run / "splits.csv", index=False)
    (run / "class_map.json").write_text(json.dumps({"class_to_idx": {n: i for i, n in enumerate(names)},
                                                    "idx_to_class": {str(i): n for i, n in enumerate(names)}}))
    trained = range(trained_folds if trained_folds is not None else n_folds)
    rows = [{"fold": k, "epoch": e, "train_loss": 2 / e, "valid_loss": 2.2 / e, "macro_f1": 0.5 + 0.1 * e,
             "accuracy": 0.55 + 0.1 * e, "lr": 1e-3 / e, "time_s": 1.0, "mem_MiB": 10.0}
            for k in trained for e in range(1, epochs + 1)]
    rows = [{k: v for k, v in r.items() if k not in drop} for r in rows]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        folds_info = [{"fold": k, "best_epoch": epochs, "epochs_run": epochs, "best": {"macro_f1": 0.8}}
                      for k in trained]
        (run / "summary.json").write_text(json.dumps({"run_id": "run", "monitor": "macro_f1", "folds": folds_info}))
    if oof:
        logits = rng.normal(size=(len(labels), n_classes)).astype(np.float32)
        logits[np.arange(len(labels)), labels] += 2.0  # mostly right, some errors
        (run / "oof").mkdir()
        np.save(run / "oof" / "oof_logits.npy", logits)
        np.save(run / "oof" / "oof_targets.npy", labels)
    return run


def assert_png(path: Path, min_side: int = 200) -> tuple[int, int]:
    """A readable PNG of plausible size; returns (width, height)."""
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        width, height = img.size
        # A blank canvas would mean nothing was drawn.
        assert len(img.convert("L").getcolors(maxcolors=1_000_000) or [0, 0]) > 2
    assert min(width, height) >= min_side and max(width, height) <= 5000, (width, height)
    assert path.stat().st_size > 5_000
    return width, height


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_training_plots_writes_every_plot(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path)
    written = training_plots(run)
    expected = {"fold0_curves.png", "fold1_curves.png", "class_distribution.png", "oof_confusion_matrix.png"}
    assert {p.name for p in written} == expected
    assert all(p.parent == run / "plots" for p in written)
    for path in written:
        assert_png(path)
    width, height = assert_png(run / "plots" / "fold0_curves.png")
    assert width > 2 * height  # three panels side by side
    assert no_temp_files(run / "plots")


def test_training_plots_one_fold_one_epoch_missing_metrics(tmp_path: Path) -> None:
    """A run stopped after one epoch of one fold, with no accuracy or lr logged, no summary and no OOF."""
    run = make_run_dir(tmp_path, epochs=1, trained_folds=1, drop=("accuracy", "lr"), summary=False, oof=False)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"fold": 0, "epoch": 2, "train_lo')  # killed mid-write: the torn line is skipped
    (run / "config.yaml").write_text("train:\n  monitor: valid_loss\n")
    assert plots.run_monitor(run, {}) == "valid_loss"  # no summary yet: the config says what is monitored
    written = training_plots(run)
    assert {p.name for p in written} == {"fold0_curves.png", "class_distribution.png"}
    for path in written:
        assert_png(path)


def test_curves_when_the_monitor_is_a_loss(tmp_path: Path) -> None:
    rows = plots.read_metrics(make_run_dir(tmp_path, oof=False) / "metrics.jsonl")[0]
    assert_png(plots.fold_curves_png(rows, "valid_loss", tmp_path / "curves.png", fold=0, best_epoch=3))


def test_many_classes_figures_grow_with_the_class_count(tmp_path: Path) -> None:
    sizes = {}
    for n_classes in (5, 100):
        run = make_run_dir(tmp_path / str(n_classes), n_classes=n_classes, per_class=3)
        names = plots.class_names(run)
        dist = plots.class_distribution_png(run / "splits.csv", names, run / "plots" / "dist.png")
        cm = plots.oof_confusion_matrix_png(run, names, run / "plots" / "cm.png")
        sizes[n_classes] = (assert_png(dist)[0], assert_png(cm)[0])
    assert sizes[100][0] > 1.5 * sizes[5][0]  # class distribution: wider
    assert sizes[100][1] > 1.5 * sizes[5][1]  # confusion matrix: larger


def test_thinned_ticks_caps_the_labels() -> None:
    fig = plots.new_figure(6, 4)
    ax = fig.subplots()
    names = [f"a_very_long_class_name_{i}" for i in range(100)]
    plots.thinned_ticks(ax, "x", names, rotate=True)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert 10 <= len(labels) <= plots.MAX_TICK_LABELS
    assert all(len(t) <= plots.MAX_NAME_CHARS for t in labels)


def test_confusion_counts_and_row_normalisation() -> None:
    rng = np.random.default_rng(1)
    y_true, y_pred = rng.integers(0, 6, 300), rng.integers(0, 6, 300)
    y_true[y_true == 5] = 4  # class 5 never occurs as a target: its row must stay zero, not NaN
    cm = confusion_counts(y_true, y_pred, 6)
    expected = np.zeros((6, 6), dtype=np.int64)
    np.add.at(expected, (y_true, y_pred), 1)
    np.testing.assert_array_equal(cm, expected)
    norm = row_normalize(cm)
    np.testing.assert_allclose(norm[:5].sum(axis=1), 1.0)
    np.testing.assert_array_equal(norm[5], 0.0)
    np.testing.assert_allclose(np.diag(norm)[:5], np.diag(cm)[:5] / cm[:5].sum(axis=1))


def test_confusion_matrix_png(tmp_path: Path) -> None:
    cm = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 9]])
    names = ["cat", "dog", "a <weird> & long class name"]
    for normalize in (True, False):
        path = confusion_matrix_png(cm, names, tmp_path / f"cm_{normalize}.png", normalize=normalize, title="t")
        assert path == tmp_path / f"cm_{normalize}.png"
        assert_png(path)
    with pytest.raises(ValueError, match="class names"):
        confusion_matrix_png(cm, names[:2], tmp_path / "bad.png")
    assert no_temp_files(tmp_path)


def _bins(shift: float) -> list[dict]:
    edges = np.linspace(0, 1, 11)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mid = (lo + hi) / 2
        count = 0 if lo < 0.2 else 10  # low-confidence bins empty, as for a confident model
        out.append({"lo": lo, "hi": hi, "count": count, "confidence": mid if count else None,
                    "accuracy": min(1.0, mid + shift) if count else None})
    return out


def test_reliability_diagram_single_and_before_after(tmp_path: Path) -> None:
    one = reliability_diagram_png(_bins(-0.1), tmp_path / "one.png", ece_after=0.05)
    both = reliability_diagram_png({"before": _bins(-0.15), "after": _bins(0.0)}, tmp_path / "both.png",
                                   ece_before=0.12, ece_after=0.01)
    one_w, _ = assert_png(one)
    both_w, _ = assert_png(both)
    assert both_w > 1.5 * one_w  # two panels side by side


def test_class_counts_cover_every_item(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path, n_classes=3, n_folds=3, per_class=9)
    names, folds, train, valid = fold_class_counts(run / "splits.csv", ["class_0", "class_1"])
    assert names == ["class_0", "class_1", "class_2"]  # a label missing from the class map is kept, at the end
    assert folds == [0, 1, 2]
    assert train.shape == valid.shape == (3, 3)
    np.testing.assert_array_equal(train + valid, np.full((3, 3), 9))  # every fold splits all 9 per class
    np.testing.assert_array_equal(valid.sum(axis=0), [9, 9, 9])  # each item validated exactly once


def test_matplotlib_is_lazy_and_pyplot_untouched(tmp_path: Path) -> None:
    """Importing vistrain.viz loads no matplotlib; plotting uses its own Agg canvas, never pyplot, so an
    interactive session's backend and figures are left alone."""
    code = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "import vistrain.viz\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'\n"
        f"vistrain.viz.confusion_matrix_png(np.eye(3), list('abc'), Path({str(tmp_path / 'cm.png')!r}))\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert_png(tmp_path / "cm.png")


def _titles(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """The titles (figure and panels) and legend labels of every figure the plots module saves, by file name."""
    seen: dict[str, list[str]] = {}
    save = plots.save_png

    def record(fig: Any, path: Path) -> Path:
        texts = [fig._suptitle.get_text()] if fig._suptitle is not None else []
        for ax in fig.axes:
            texts += [ax.get_title(), *ax.get_legend_handles_labels()[1]]
        texts += [t.get_text() for legend in fig.legends for t in legend.get_texts()]
        texts += [t.get_text() for ax in fig.axes for t in ax.get_yticklabels()]
        seen[path.name] = [t for t in texts if t]
        return save(fig, path)

    monkeypatch.setattr(plots, "save_png", record)
    return seen


def test_a_ratio_split_runs_plots_speak_of_its_splits_not_of_folds(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """data.split: ratio trains one model on split=train and validates on split=val: no plot of it may say
    "each fold" (the class distribution's panels, bars and the curves' title did)."""
    run = make_run_dir(tmp_path, n_folds=1, oof=False)
    splits = pd.read_csv(run / "splits.csv")
    splits["split"] = np.resize(["train", "train", "val", "test"], len(splits))
    splits["fold"] = np.where(splits["split"] == "val", 0, -1)
    splits.to_csv(run / "splits.csv", index=False)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "split": {"type": "ratio"}}))
    titles = _titles(monkeypatch)
    training_plots(run)
    text = " | ".join(titles["class_distribution.png"] + titles["fold0_curves.png"])
    assert "fold" not in text, text
    assert "train split" in " ".join(titles["class_distribution.png"])
    assert "val split" in " ".join(titles["class_distribution.png"])
    assert "ratio split" in titles["fold0_curves.png"][0]
    # A K-fold run keeps its fold wording.
    kfold = make_run_dir(tmp_path / "kfold", oof=False)
    training_plots(kfold)
    assert "train part of each fold" in titles["class_distribution.png"]
    assert titles["fold1_curves.png"][0].startswith("fold 1")
