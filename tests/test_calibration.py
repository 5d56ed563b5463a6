"""vistrain.metrics.calibration: ECE against a plain-loop reference, reliability bins, temperature scaling."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.special import softmax

from vistrain.metrics.calibration import (
    T_MIN,
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)


def ece_reference(probs: np.ndarray, targets: np.ndarray, n_bins: int) -> float:
    """Independent ECE: a loop over the bins (lo, hi], the first also holding 0, over linspace edges."""
    rows = [list(map(float, r)) for r in probs]
    conf = [max(r) for r in rows]
    correct = [float(r.index(max(r)) == int(t)) for r, t in zip(rows, targets, strict=True)]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    n, total = len(rows), 0.0
    for b in range(n_bins):
        lo, hi = edges[b], edges[b + 1]
        members = [i for i in range(n) if lo < conf[i] <= hi or (b == 0 and conf[i] == 0.0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            avg_conf = sum(conf[i] for i in members) / len(members)
            total += len(members) / n * abs(acc - avg_conf)
    return total


@st.composite
def probs_targets(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """probs [N, C]: softmax of random logits, or rows of grid values (ties, one-hots, values on bin edges)."""
    c = draw(st.integers(2, 6))
    n = draw(st.integers(1, 60))
    if draw(st.booleans()):
        z = draw(arrays(np.float64, (n, c), elements=st.floats(-20, 20)))
        p = softmax(z, axis=1)
    else:
        w = draw(arrays(np.int64, (n, c), elements=st.integers(0, 4)))
        w[:, 0] += w.sum(axis=1) == 0  # no all-zero rows
        p = w / w.sum(axis=1, keepdims=True)
    y = draw(arrays(np.int64, n, elements=st.integers(0, c - 1)))
    return p, y


@settings(max_examples=100, deadline=None)
@given(data=probs_targets(), n_bins=st.sampled_from([1, 2, 4, 5, 10, 15, 20]))
def test_ece_matches_loop_reference(data: tuple[np.ndarray, np.ndarray], n_bins: int) -> None:
    p, y = data
    ece = expected_calibration_error(p, y, n_bins)
    assert ece == pytest.approx(ece_reference(p, y, n_bins), abs=1e-9)
    assert 0.0 <= ece <= 1.0


def test_ece_bin_edges_are_right_closed() -> None:
    edges = np.linspace(0, 1, 6)  # 5 bins
    # Confidences exactly on the edges 0.6, 0.8 and 1.0 go to the bin below (lo, hi].
    p = np.array([[edges[3], 1 - edges[3]], [edges[4], 1 - edges[4]], [1.0, 0.0], [0.5, 0.5]])
    y = np.array([0, 1, 0, 0])
    bins = reliability_bins(p, y, n_bins=5)
    assert bins.count.tolist() == [0, 0, 2, 1, 1]  # 0.5 and 0.6 -> (0.4, 0.6]; 0.8 -> (0.6, 0.8]; 1.0 -> last
    assert bins.accuracy[2] == 1.0 and bins.accuracy[3] == 0.0
    assert bins.confidence[2] == pytest.approx(0.55)
    assert expected_calibration_error(p, y, 5) == pytest.approx(ece_reference(p, y, 5), abs=1e-12)
    # A one-bin ECE is |accuracy - mean confidence| over everything.
    assert expected_calibration_error(p, y, 1) == pytest.approx(abs(0.75 - np.mean([0.6, 0.8, 1.0, 0.5])))


def test_reliability_bins_fields() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3, size=(500, 4))
    y = rng.integers(0, 4, 500)
    p = softmax(z, axis=1)
    bins = reliability_bins(torch.from_numpy(p), torch.from_numpy(y), n_bins=10)
    assert bins.n == 500 and bins.count.shape == (10,)
    assert bins.count[:2].sum() == 0  # max of 4 probabilities is >= 0.25
    assert np.isnan(bins.confidence[0]) and np.isnan(bins.accuracy[0])
    filled = bins.count > 0
    assert np.all((bins.confidence[filled] > bins.lower[filled]) & (bins.confidence[filled] <= bins.upper[filled]))
    assert bins.ece() == pytest.approx(ece_reference(p, y, 10), abs=1e-9)
    d = bins.to_dict()
    assert d["confidence"][0] is None and len(d["count"]) == 10
    json.dumps(d, allow_nan=False)
    with pytest.raises(ValueError):
        reliability_bins(p, y, n_bins=0)


def test_ece_perfectly_calibrated_and_overconfident() -> None:
    # Every row says 0.7 and 70% are right: ECE 0. All rows say 1.0 and half are right: ECE 0.5.
    p = np.tile([0.7, 0.2, 0.1], (10, 1))
    y = np.array([0] * 7 + [1] * 3)
    assert expected_calibration_error(p, y) == pytest.approx(0.0, abs=1e-12)
    p1 = np.tile([1.0, 0.0], (4, 1))
    assert expected_calibration_error(p1, np.array([0, 1, 0, 1])) == pytest.approx(0.5)


def ece_guo_loop(probs: np.ndarray, targets: np.ndarray, n_bins: int) -> float:
    """Guo et al. (2017), eq. (3), as a plain loop over the samples: |B_m| / n * |acc(B_m) - conf(B_m)| summed over
    bins B_m = ((m - 1) / M, m / M] (the authors' code bins with conf > lo and conf <= hi), 0 joining the first."""
    members: dict[int, list[tuple[float, bool]]] = {}
    for row, t in zip(probs.tolist(), targets.tolist(), strict=True):
        conf = max(row)
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        m = next(b for b in range(n_bins) if conf <= edges[b + 1])  # first bin whose upper edge holds conf
        members.setdefault(m, []).append((conf, row.index(conf) == t))
    total = 0.0
    for items in members.values():
        acc = sum(ok for _, ok in items) / len(items)
        conf = sum(c for c, _ in items) / len(items)
        total += len(items) / len(targets) * abs(acc - conf)
    return total


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_ece_matches_guo_definition_on_softmax_outputs(dtype: type) -> None:
    rng = np.random.default_rng(3)
    p = softmax(rng.normal(scale=2.5, size=(400, 7)), axis=1).astype(dtype)
    y = rng.integers(0, 7, 400)
    ece = expected_calibration_error(torch.from_numpy(p) if dtype == np.float16 else p, y, 15)
    assert ece == pytest.approx(ece_guo_loop(p.astype(np.float64), y, 15), abs=1e-12)


@pytest.mark.parametrize(("make", "match"), [
    (lambda p, z: p * 3, "outside \\[0, 1\\]|sums to 3"),  # the example: gave ECE 1.55
    (lambda p, z: p / 3, "sums to 0.333"),
    (lambda p, z: z, "outside \\[0, 1\\]"),  # logits
    (lambda p, z: -p, "outside \\[0, 1\\]"),
    (lambda p, z: p * 0.5, "sums to 0.5"),
])
def test_ece_rejects_values_that_are_not_probabilities(make, match: str) -> None:
    rng = np.random.default_rng(5)
    z = rng.normal(scale=3, size=(20, 4))
    bad, y = make(softmax(z, axis=1), z), rng.integers(0, 4, 20)
    for fn in (expected_calibration_error, reliability_bins):
        with pytest.raises(ValueError, match=match) as excinfo:
            fn(bad, y)
        assert "softmax" in str(excinfo.value)


def test_ece_accepts_probabilities_within_rounding() -> None:
    p = np.array([[0.5 + 1e-4, 0.5], [1.0 + 1e-7, 0.0], [0.2, 0.8 - 1e-4]])
    y = np.array([0, 0, 1])
    assert 0.0 <= expected_calibration_error(p, y) <= 1.0
    # bfloat16 keeps 8 bits: a softmax in bf16 is off by more than 1e-3 and must still pass.
    z = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 3
    pb = torch.softmax(z, dim=1).to(torch.bfloat16)
    assert 0.0 <= expected_calibration_error(pb, torch.zeros(64, dtype=torch.long)) <= 1.0


# ---------------------------------------------------------------- temperature scaling


def sample_at_temperature(t0: float, n: int = 20_000, c: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """True logits z, labels drawn from softmax(z); the observed logits are z * t0, so dividing them by t0
    recovers the true distribution and the fitted temperature should be ~t0."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, c))
    cdf = softmax(z, axis=1).cumsum(axis=1)
    y = np.minimum((cdf < rng.random((n, 1))).sum(axis=1), c - 1)  # inverse-CDF sampling per row
    return z * t0, y


@pytest.mark.parametrize("t0", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_known_temperature(t0: float) -> None:
    z_obs, y = sample_at_temperature(t0, seed=int(t0 * 10))
    t = fit_temperature(z_obs, y)
    assert abs(t / t0 - 1) < 0.05
    # It is the minimiser: nudging T either way does not lower the NLL.
    def nll(temp: float) -> float:
        logp = z_obs / temp - np.log(np.exp(z_obs / temp).sum(axis=1, keepdims=True))
        return -float(np.mean(logp[np.arange(len(y)), y]))
    assert nll(t) <= min(nll(t * 1.01), nll(t / 1.01))


def test_fit_temperature_deterministic_and_input_agnostic() -> None:
    z, y = sample_at_temperature(1.7, n=3000, seed=3)
    t = fit_temperature(z, y)
    assert fit_temperature(z, y) == t
    assert fit_temperature(torch.from_numpy(z), torch.from_numpy(y)) == t
    assert fit_temperature(z + 123.0, y) == pytest.approx(t, rel=1e-6)  # softmax ignores a per-row shift
    assert fit_temperature(z * 4.0, y) == pytest.approx(4.0 * t, rel=1e-6)  # scale equivariance


def test_temperature_scaling_does_not_worsen_ece_on_overconfident_logits() -> None:
    z_obs, y = sample_at_temperature(3.0, n=20_000, seed=7)  # logits 3x too sharp: over-confident
    fit, held = slice(0, 10_000), slice(10_000, None)
    t = fit_temperature(z_obs[fit], y[fit])
    before = expected_calibration_error(softmax(z_obs[held], axis=1), y[held])
    after = expected_calibration_error(softmax(apply_temperature(z_obs[held], t), axis=1), y[held])
    assert after <= before
    assert after < 0.03 < before


def test_fit_temperature_degenerate_inputs() -> None:
    assert fit_temperature(np.zeros((5, 3)), np.array([0, 1, 2, 0, 1])) == 1.0  # NLL does not depend on T
    z = np.array([[5.0, 0.0], [0.0, 5.0], [4.0, 1.0]])  # separable: NLL falls all the way to T -> 0
    with pytest.warns(RuntimeWarning, match="search bound"):
        t = fit_temperature(z, np.array([0, 1, 0]))
    assert t == pytest.approx(T_MIN, rel=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary fit warns about nothing
        fit_temperature(*sample_at_temperature(1.0, n=2000, seed=1))


def test_apply_temperature() -> None:
    z = np.array([[1.0, 2.0, 4.0]])
    np.testing.assert_allclose(apply_temperature(z, 2.0), z / 2)
    zt = torch.tensor(z, dtype=torch.float32)
    out = apply_temperature(zt, 2.0)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert torch.equal(out, zt / 2)
    assert apply_temperature([[1.0, 3.0]], 1.0).tolist() == [[1.0, 3.0]]
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            apply_temperature(z, bad)


def test_softmax_and_nll_match_torch_at_a_temperature() -> None:
    from vistrain.metrics.calibration import nll, softmax

    rng = np.random.default_rng(3)
    logits = rng.normal(0, 4, (50, 6))
    targets = rng.integers(0, 6, 50)
    ref = torch.softmax(torch.from_numpy(logits) / 1.7, dim=1).numpy()
    np.testing.assert_allclose(softmax(logits, 1.7), ref, rtol=1e-12, atol=1e-15)
    expected = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits) / 1.7, torch.from_numpy(targets)))
    assert nll(logits, targets, 1.7) == pytest.approx(expected, rel=1e-12)


def test_reliability_rows_and_search_bound() -> None:
    from vistrain.metrics.calibration import T_MAX, T_MIN, at_search_bound, reliability_bins

    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    rows = reliability_bins(probs, np.array([0, 1, 1]), n_bins=5).rows()
    assert len(rows) == 5 and sum(r["count"] for r in rows) == 3
    assert at_search_bound(T_MIN) and at_search_bound(T_MAX) and not at_search_bound(1.0)


# ---------------------------------------------------------------- out of sample: cross-fitting, calibrate, evaluate


def nll_at(z: np.ndarray, y: np.ndarray, t: float | np.ndarray) -> float:
    """Mean cross-entropy of softmax(z / t), written out here (t: a scalar or one value per row)."""
    s = z / (np.asarray(t, dtype=np.float64).reshape(-1, 1) if np.ndim(t) else t)
    logp = s - s.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    return -float(np.mean(logp[np.arange(len(y)), y]))


def reference_temperature(z: np.ndarray, y: np.ndarray) -> float:
    """Independent fit: scipy's bounded search over T itself (not log T) of the NLL written out above."""
    from scipy.optimize import minimize_scalar

    return float(minimize_scalar(lambda t: nll_at(z, y, t), bounds=(0.05, 20), method="bounded",
                                 options={"xatol": 1e-8}).x)


def test_cross_fitted_temperatures_recover_t_true_and_never_see_the_rows_they_score() -> None:
    from vistrain.metrics.calibration import cross_fit_temperatures, row_temperatures

    t_true = 2.0
    z, y = sample_at_temperature(t_true, n=10_000, seed=11)  # logits = true logits * 2: labels from softmax(true)
    groups = np.arange(len(y)) % 5
    temps = cross_fit_temperatures(z, y, groups)
    assert sorted(temps) == [0, 1, 2, 3, 4]
    for k, t in temps.items():
        assert abs(t / t_true - 1) < 0.05, (k, t)
        assert t == pytest.approx(reference_temperature(z[groups != k], y[groups != k]), rel=1e-4)
        # Fold k's temperature never saw fold k: wrecking fold k's rows (logits x10, every label wrong) leaves it
        # exactly as it was, while every other fold's temperature, which was fitted on them, moves.
        z2, y2 = z.copy(), y.copy()
        z2[groups == k] *= 10
        y2[groups == k] = (y2[groups == k] + 1) % z.shape[1]
        moved = cross_fit_temperatures(z2, y2, groups)
        assert moved[k] == t
        assert all(abs(moved[j] / temps[j] - 1) > 0.05 for j in temps if j != k)
    np.testing.assert_array_equal(row_temperatures(groups[:7], temps), [temps[g] for g in groups[:7]])
    with pytest.raises(ValueError, match="at least two groups"):
        cross_fit_temperatures(z, y, np.zeros(len(y)))


def fake_oof_run(root, parts: list[tuple[float, int, int]]):
    """A finished K-fold run directory without trained weights (calibrate and evaluate --split oof read only the
    stored out-of-fold logits): fold k's rows are generated at its true temperature, ``parts[k] = (T_true, n,
    seed)``. Returns (run dir, logits, targets, fold of each row)."""
    import pandas as pd
    from conftest import tiny_config, write_yaml

    logits, targets, folds = [], [], []
    for k, (t_true, n, seed) in enumerate(parts):
        z, y = sample_at_temperature(t_true, n=n, seed=seed)
        logits.append(z)
        targets.append(y)
        folds.append(np.full(n, k))
    z, y, f = np.concatenate(logits), np.concatenate(targets), np.concatenate(folds)
    run = root / "run"
    (run / "oof").mkdir(parents=True)
    (run / "ckpt").mkdir()
    for k in range(len(parts)):
        (run / "ckpt" / f"best_fold{k}.pth").write_bytes(b"")
    write_yaml(run / "config.yaml", tiny_config(root / "data", data={"folds": len(parts), "valid_fold": "all"}))
    classes = [str(c) for c in range(z.shape[1])]
    (run / "class_map.json").write_text(json.dumps({"idx_to_class": dict(enumerate(classes))}))
    pd.DataFrame({"id": [f"i{i}" for i in range(len(y))], "path": [f"/x/i{i}.png" for i in range(len(y))],
                  "label": [classes[t] for t in y], "fold": f}).to_csv(run / "splits.csv", index=False)
    np.save(run / "oof" / "oof_logits.npy", z.astype(np.float32))
    np.save(run / "oof" / "oof_targets.npy", y)
    return run, z.astype(np.float32).astype(np.float64), y, f


def test_calibrate_keeps_or_reverts_on_the_out_of_sample_ece(tmp_path) -> None:
    """Fold 0 is 3x over-confident, fold 1 2x under-confident. One T fitted on both and scored on the same rows
    halves the ECE (in sample: keep), but each fold scored at the T of the other fold is worse than no T at all
    (out of sample: revert). calibrate must revert, and report the out-of-sample figures."""
    from vistrain.engine.calibration import run_calibrate

    run, z, y, folds = fake_oof_run(tmp_path, [(3.0, 2000, 1), (0.5, 500, 2)])
    pooled = reference_temperature(z, y)
    before = ece_reference(softmax(z, axis=1), y, 15)
    in_sample = ece_reference(softmax(z / pooled, axis=1), y, 15)
    assert in_sample < before - 0.05  # in sample, temperature scaling looks like a clear win
    t_rows = np.where(folds == 0, reference_temperature(z[folds == 1], y[folds == 1]),
                      reference_temperature(z[folds == 0], y[folds == 0]))
    out_of_sample = ece_reference(softmax(z / t_rows[:, None], axis=1), y, 15)
    assert out_of_sample > before + 0.05  # out of sample it is a loss

    result = run_calibrate(run)
    assert result["applied"] is False and result["temperature"] == 1.0
    assert result["fitted_temperature"] == pytest.approx(pooled, rel=1e-4)
    assert result["ece_before"] == pytest.approx(before, abs=1e-6)
    assert result["ece_cross_fitted"] == pytest.approx(out_of_sample, abs=1e-3)
    assert result["nll_cross_fitted"] == pytest.approx(nll_at(z, y, t_rows), rel=1e-4)
    assert result["ece_after"] == result["ece_before"]  # T = 1 kept
    assert result["calibration"] == {"fitted_on": "oof", "evaluated_on": "oof, cross-fitted by fold",
                                     "in_sample": False}
    assert json.loads((run / "calibration.json").read_text())["applied"] is False


def test_evaluate_oof_after_calibrating_scores_each_fold_at_a_temperature_fitted_without_it(tmp_path) -> None:
    """Known true temperature 2 in every fold: the fitted T recovers it, calibrate keeps it, and evaluate --split
    oof scores fold k's rows at the T fitted on the other folds only (never the pooled, in-sample T)."""
    from vistrain.engine.calibration import run_calibrate
    from vistrain.engine.evaluation import run_evaluate

    run, z, y, folds = fake_oof_run(tmp_path, [(2.0, 1500, 3), (2.0, 1500, 4), (2.0, 1500, 5)])
    result = run_calibrate(run)
    assert result["applied"] is True and abs(result["temperature"] / 2.0 - 1) < 0.05
    other = {k: reference_temperature(z[folds != k], y[folds != k]) for k in range(3)}
    for k, t in result["cross_fit"]["temperatures"].items():
        assert t == pytest.approx(other[int(k)], rel=1e-4)
    metrics = run_evaluate(run, "oof", echo=False)
    t_rows = np.array([other[k] for k in folds])
    assert metrics["nll"] == pytest.approx(nll_at(z, y, t_rows), rel=1e-5)
    assert metrics["nll"] != pytest.approx(nll_at(z, y, result["temperature"]), rel=1e-5)
    assert metrics["ece"] == pytest.approx(ece_reference(softmax(z / t_rows[:, None], axis=1), y, 15), abs=1e-5)
    cal = metrics["calibration"]
    assert cal["in_sample"] is False and cal["evaluated_on"] == "oof" and cal["fitted_on"] == \
        "oof of the other folds (cross-fitted: fold k's rows at the T fitted without them)"
    assert {int(k): v for k, v in cal["temperatures"].items()} == pytest.approx(other, rel=1e-4)
