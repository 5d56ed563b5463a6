"""The name registries (``vistrain.registry``): a bad name is one line with the valid ones, names keep their
declaration order, a builder declared in the light table is found through its module, metric patterns, and the one
direction per metric that early stopping, the plateau schedule, ``tune``, ``compare`` and the plots all follow.
That every registry-backed config key allows exactly the registry's names is in test_architecture.py."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from conftest import assert_python_runs

from vistrain.errors import UserError
from vistrain.registry import HEADS, METRICS, SCHEDULERS, Registry, fill, higher_is_better


def test_an_unknown_name_is_one_line_naming_the_key_the_valid_names_and_the_closest() -> None:
    with pytest.raises(UserError) as err:
        HEADS.lookup("arcfce")
    assert str(err.value) == ("model.head: unknown name 'arcfce'; valid: arcface, cosface, linear "
                              "(did you mean 'arcface'?)")
    with pytest.raises(UserError) as err:
        SCHEDULERS.lookup("cosin", "tune.space.train.scheduler")  # another key may pick from the same table
    assert str(err.value).startswith("tune.space.train.scheduler: unknown name 'cosin'; valid: ")
    with pytest.raises(UserError) as err:
        higher_is_better("f1_macro")
    assert "\n" not in str(err.value) and "unknown name 'f1_macro'" in str(err.value)
    assert "knn_recall@<K>" in str(err.value), "the valid names show the patterns"


def test_names_keep_declaration_order_and_the_decorator_binds_the_builder() -> None:
    things = Registry("thing", "x.thing")
    things.add("zeta", colour="red")
    things.add("alpha", colour="blue")

    @things.register("zeta")
    def make_zeta() -> str:
        return "z"

    @things.register("mid", colour="red")
    def make_mid() -> str:
        return "m"

    assert things.names() == ["zeta", "alpha", "mid"] and list(things) == things.names()
    assert things.names(colour="red") == ["zeta", "mid"]
    assert things["zeta"] is make_zeta and things.lookup("mid")() == "m"
    assert "alpha" in things and "beta" not in things
    with pytest.raises(KeyError, match="declared but no builder"):
        things["alpha"]
    with pytest.raises(ValueError, match="colour declared as 'red'"):
        things.add("zeta", colour="blue")
    with pytest.raises(ValueError, match="already has a builder"):
        things.add("zeta", make_mid)


def test_a_metric_pattern_matches_its_names_only() -> None:
    assert METRICS.find("knn_recall@10").name == "knn_recall@<K>"
    assert METRICS.find("recall@1").name == "recall@<K>"
    assert METRICS.find("top1@real").name == "top1@<domain>"
    assert METRICS.find("macro_f1@a b").name == "macro_f1@<domain>"
    assert METRICS.find("knn_recall@x") is None and METRICS.find("recall@0") is None and METRICS.find("top1@") is None
    assert METRICS.find("macro_f1").name == "macro_f1", "an exact name is not taken for a pattern"
    assert fill("knn_recall@<K>", K=5) == "knn_recall@5"


def test_a_builder_is_found_through_its_module_and_names_alone_import_no_torch() -> None:
    code = ("import sys\n"
            "from vistrain.registry import HEADS\n"
            "assert HEADS.names() == ['linear', 'arcface', 'cosface']\n"
            "assert 'torch' not in sys.modules, 'the names alone imported torch'\n"
            "assert HEADS['arcface'].__name__ == 'ArcFaceHead'\n")
    assert_python_runs(code)


@pytest.fixture
def lower_metric() -> Iterator[str]:
    """A metric that exists only for this test, lower being better: every consumer must follow the registry."""
    METRICS.add("tmp_error", higher_is_better=False)
    METRICS.add("tmp_score", higher_is_better=True)
    yield "tmp_error"
    METRICS.remove("tmp_error")
    METRICS.remove("tmp_score")


def test_early_stopping_the_schedule_and_the_kept_epochs_follow_the_registrys_direction(lower_metric: str) -> None:
    from vistrain.engine.hooks import EarlyStopping, best_epochs, monitor_mode

    stopper = EarlyStopping(lower_metric, patience=2)
    assert stopper.mode == "min" and monitor_mode(lower_metric) == "min" and monitor_mode("tmp_score") == "max"
    assert [stopper.step(v, e) for e, v in enumerate([0.5, 0.6, 0.4, 0.45, 0.41])] == [True, False, True, False, False]
    assert stopper.best_epoch == 2 and stopper.should_stop
    history = [{"epoch": e, lower_metric: v} for e, v in enumerate([0.5, 0.2, 0.9, 0.3])]
    assert best_epochs(history, lower_metric, 2) == {1, 3}


def test_tune_and_the_plots_follow_the_registrys_direction(lower_metric: str) -> None:
    from vistrain.tuning.study import direction_of
    from vistrain.viz.plots import lower_is_better

    assert direction_of(lower_metric) == "minimize" and direction_of("tmp_score") == "maximize"
    assert direction_of("valid_loss") == "minimize" and direction_of("knn_recall@10") == "maximize"
    assert lower_is_better(lower_metric) and not lower_is_better("tmp_score")


def test_compare_calls_a_drop_better_exactly_when_the_registry_says_lower_is_better(lower_metric: str) -> None:
    from vistrain.metrics.paired import paired_figures

    rng = np.random.default_rng(0)
    reps_a = rng.normal(0.50, 0.01, 500)
    reps_b = reps_a - 0.10 + rng.normal(0, 0.005, 500)  # B lower on every resample: an interval well below 0
    values_a, values_b = {lower_metric: 0.50, "tmp_score": 0.50}, {lower_metric: 0.40, "tmp_score": 0.40}
    reps = {lower_metric: reps_a, "tmp_score": reps_a}, {lower_metric: reps_b, "tmp_score": reps_b}
    out = paired_figures(values_a, values_b, *reps)
    assert out[lower_metric]["value"] == pytest.approx(-0.10) and out[lower_metric]["interval"][1] < 0
    assert out[lower_metric]["higher_is_better"] is False and out[lower_metric]["verdict"] == "better"
    assert out["tmp_score"]["higher_is_better"] is True and out["tmp_score"]["verdict"] == "worse"
    same = paired_figures(values_a, values_a, reps[0], reps[0])
    assert same[lower_metric]["verdict"] == "inconclusive", "an interval holding 0 names no winner"


def test_every_figure_compare_reports_has_the_direction_its_definition_gives() -> None:
    from vistrain.engine.compare import METRICS as COMPARED

    # a probability's negative log-likelihood and the calibration error are errors; the rest are hit rates or F1
    assert {m: higher_is_better(m) for m in COMPARED} == {
        "top1": True, "top5": True, "macro_f1": True, "weighted_f1": True, "balanced_accuracy": True,
        "nll": False, "ece": False}


def test_the_classifier_builds_the_loss_train_loss_names_from_the_registry(tmp_path) -> None:
    """A classifier's criterion is whatever the registry's builder under ``train.loss`` returns, called with the
    class weights and label smoothing (no second, hard-coded choice in the set-up)."""
    import torch
    from conftest import tiny_config, write_csv_dataset, write_yaml
    from torch import nn

    from vistrain.config.loader import load_config
    from vistrain.data.prepare import prepare_data
    from vistrain.engine.setup import classification_setup
    from vistrain.models.losses import LOSSES

    calls = []

    def spy(class_weights: torch.Tensor | None, label_smoothing: float) -> nn.Module:
        calls.append((class_weights, label_smoothing))
        return nn.MSELoss()

    data = write_csv_dataset(tmp_path / "data", per_class=3, size=16)
    cfg = load_config(write_yaml(tmp_path / "c.yaml", tiny_config(data.root, train={"label_smoothing": 0.1})))
    assert cfg.train.loss == "ce"
    original = LOSSES["ce"]
    LOSSES.remove("ce")
    LOSSES.add("ce", spy)
    try:
        setup = classification_setup(cfg, prepare_data(cfg), 0, torch.device("cpu"))
    finally:
        LOSSES.remove("ce")
        LOSSES.add("ce", original)
    assert isinstance(setup.task.criterion, nn.MSELoss) and calls == [(None, 0.1)]


def test_train_loss_takes_the_loss_registrys_names_and_refuses_others_in_one_line() -> None:
    from vistrain.config import load_config
    from vistrain.errors import ConfigError

    assert load_config(None, overrides=["train.loss=ce"]).train.loss == "ce"
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides=["train.loss=focal"])
    assert str(err.value) == "train.loss: Input should be 'ce' (got 'focal')"
    assert "train.loss" in load_config(None, overrides=["task=embedding"]).keys_not_read()
