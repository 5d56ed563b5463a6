"""``vistrain compare``: paired-bootstrap intervals against a plain loop over the same resamples, McNemar against
the binomial sum written out, refusing runs on other images, and the CLI on two run directories.

The run directories here hold exactly the files compare reads, written by evaluate's own ``predictions_table``
(eval/test/predictions.csv) and in the layout training writes (oof/, splits.csv, metrics.jsonl, config.yaml); a
real trained run is compared in test_predict_evaluate.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import last_line, run_cli, write_yaml
from scipy import stats
from sklearn.metrics import accuracy_score

from vistrain.engine.evaluation import predictions_table
from vistrain.metrics.bootstrap import bootstrap_indices, classification_replicates
from vistrain.metrics.classification import classification_report
from vistrain.metrics.paired import mcnemar_exact, paired_difference

CLASSES = ["a", "b", "c"]


def _two_models(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets and two correlated models' logits (B a little better than A)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASSES), n)
    shared = rng.normal(size=(n, len(CLASSES)))
    za = shared + rng.normal(size=shared.shape) + 1.0 * np.eye(len(CLASSES))[y]
    zb = shared + rng.normal(size=shared.shape) + 1.6 * np.eye(len(CLASSES))[y]
    return y, za, zb


def test_paired_bootstrap_matches_a_loop_over_the_same_resamples() -> None:
    y, za, zb = _two_models()
    idx = bootstrap_indices(len(y), 150, 7)
    reps_a, reps_b = classification_replicates(za, y, idx, ece_bins=15), classification_replicates(zb, y, idx)
    loop_a = [classification_report(za[rows], y[rows], CLASSES) for rows in idx]  # scikit-learn per replicate
    loop_b = [classification_report(zb[rows], y[rows], CLASSES) for rows in idx]
    for key in ("top1", "top5", "macro_f1", "weighted_f1", "balanced_accuracy", "nll", "ece"):
        va, vb = np.array([r[key] for r in loop_a]), np.array([r[key] for r in loop_b])
        np.testing.assert_allclose(reps_a[key], va, atol=1e-9, err_msg=key)
        d = vb - va
        got = paired_difference(reps_a[key], reps_b[key])
        np.testing.assert_allclose(got["interval"], np.percentile(d, [2.5, 97.5]), atol=1e-9, err_msg=key)
        p_loop = min(1.0, 2 * min(sum(x <= 0 for x in d), sum(x >= 0 for x in d)) / len(d))
        assert got["p_value"] == pytest.approx(p_loop), key
    # pairing matters: the paired interval of the top-1 difference is narrower than the unpaired one
    unpaired = np.array([r["top1"] for r in loop_b]) - np.random.default_rng(1).permutation([r["top1"] for r in loop_a])
    paired = paired_difference(reps_a["top1"], reps_b["top1"])["interval"]
    assert paired[1] - paired[0] < np.ptp(np.percentile(unpaired, [2.5, 97.5]))


def test_identical_runs_differ_by_nothing() -> None:
    y, za, _ = _two_models()
    reps = classification_replicates(za, y, bootstrap_indices(len(y), 50, 0))
    assert paired_difference(reps["top1"], reps["top1"]) == {"interval": [0.0, 0.0], "p_value": 1.0}
    assert mcnemar_exact(za.argmax(1) == y, za.argmax(1) == y)["p_value"] == 1.0


@pytest.mark.parametrize(("a_only", "b_only"), [(3, 12), (10, 10), (0, 7), (25, 14)])
def test_mcnemar_matches_the_binomial_sum(a_only: int, b_only: int) -> None:
    both, neither = 40, 9
    correct_a = np.array([True] * a_only + [False] * b_only + [True] * both + [False] * neither)
    correct_b = np.array([False] * a_only + [True] * b_only + [True] * both + [False] * neither)
    got = mcnemar_exact(correct_a, correct_b)
    n, k = a_only + b_only, min(a_only, b_only)
    by_hand = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)  # exact McNemar, two-sided
    assert (got["a_only"], got["b_only"], got["both"], got["neither"]) == (a_only, b_only, both, neither)
    assert got["p_value"] == pytest.approx(by_hand, rel=1e-12)
    assert got["p_value"] == pytest.approx(stats.binomtest(a_only, n, 0.5).pvalue, rel=1e-12)


def _run_dir(root: Path, name: str, logits: np.ndarray, y: np.ndarray, ids: list[str], lr: float,
             folds: np.ndarray | None = None) -> Path:
    run = root / name
    (run / "eval" / "test").mkdir(parents=True)
    write_yaml(run / "config.yaml", {"project": {"seed": 3}, "train": {"lr": lr, "monitor": "macro_f1"},
                                     "eval": {"bootstrap": 300}})
    table = pd.DataFrame({"id": ids, "path": [f"/img/{i}.png" for i in ids]})
    predictions_table(logits, y, table, CLASSES).to_csv(run / "eval" / "test" / "predictions.csv", index=False)
    rows = [{"fold": 0, "epoch": e, "valid_loss": 1.0 / (e + 1) * lr * 1e3, "macro_f1": 0.5 + 0.1 * e}
            for e in range(3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if folds is not None:
        (run / "oof").mkdir()
        np.save(run / "oof" / "oof_logits.npy", logits)
        np.save(run / "oof" / "oof_targets.npy", y)
        pd.DataFrame({"id": ids, "path": table["path"], "label": [CLASSES[t] for t in y], "fold": folds}).to_csv(
            run / "splits.csv", index=False)
        (run / "class_map.json").write_text(json.dumps({"idx_to_class": {str(i): c for i, c in enumerate(CLASSES)}}))
    return run


def test_compare_refuses_runs_scored_on_other_images(tmp_path: Path) -> None:
    y, za, zb = _two_models(20)
    ids = [f"img{i:02d}" for i in range(20)]
    a = _run_dir(tmp_path, "a", za, y, ids, 1e-3)
    b = _run_dir(tmp_path, "b", zb, y, ids[:17] + ["x1", "x2", "x3"], 1e-3)
    res = run_cli("compare", str(a), str(b), cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert "different images (6 image IDs in only one of them" in last_line(res.stderr), res.stderr


def test_compare_cli_on_two_runs(tmp_path: Path) -> None:
    y, za, zb = _two_models(60)
    ids = [f"img{i:02d}" for i in range(60)]
    folds = np.arange(60) % 3
    a = _run_dir(tmp_path, "a", za, y, ids, 1e-3, folds)
    order = np.random.default_rng(0).permutation(60)  # B's rows in another order: compare pairs by ID
    b = _run_dir(tmp_path, "b", zb[order], y[order], [ids[i] for i in order], 3e-4, folds[order])
    res = run_cli("compare", str(a), str(b), "--output", "cmp", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "every run has eval/test/predictions.csv" in res.stdout
    out = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert out["split"] == "test" and out["n"] == 60
    top1_a, top1_b = accuracy_score(y, za.argmax(1)), accuracy_score(y, zb.argmax(1))
    assert out["runs"][0]["metrics"]["top1"]["value"] == pytest.approx(top1_a)
    assert out["differences"][0]["metrics"]["top1"]["value"] == pytest.approx(top1_b - top1_a)
    mc = out["differences"][0]["mcnemar_top1"]
    assert mc["a_only"] == int(np.sum((za.argmax(1) == y) & (zb.argmax(1) != y)))
    nll = out["differences"][0]["metrics"]["nll"]  # B has the lower NLL: its whole paired interval lies below 0
    assert nll["interval"][1] < 0 and nll["higher_is_better"] is False and nll["verdict"] == "better", nll
    assert next(ln for ln in res.stdout.splitlines() if ln.startswith("nll ") and "p=" in ln).endswith("better")
    assert out["config_differences"] == {"train.lr": [1e-3, 3e-4]}
    assert (tmp_path / "cmp" / "curves.png").stat().st_size > 1000
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "Paired differences" in page and "train.lr" in page

    res = run_cli("compare", str(a), str(b), "--split", "oof", "--output", "oof", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    folds_out = json.loads((tmp_path / "oof" / "compare.json").read_text())["fold_differences"][0]["folds"]
    for row in folds_out:
        m = folds == row["fold"]
        want = accuracy_score(y[m], zb[m].argmax(1)) - accuracy_score(y[m], za[m].argmax(1))
        assert row["top1_diff"] == pytest.approx(want)
