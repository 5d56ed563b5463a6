"""Per-domain metrics (``top1@<domain>``, ``top5@<domain>``, ``macro_f1@<domain>``) as first-class numbers, the
domain monitor, and display names from class_map.json's metadata: unit tests against scikit-learn, then one tiny
two-domain run (5 classes, 2 epochs, CPU) checked file by file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import last_line, read_metrics, run_cli, run_dirs, tiny_config, write_csv_dataset, write_yaml
from sklearn import metrics as skm

from vistrain.config import load_config
from vistrain.config.schema import DOMAIN_MONITORS
from vistrain.engine.tasks import ClassificationTask
from vistrain.errors import ConfigError, UserError
from vistrain.metrics.classification import DOMAIN_METRICS, per_domain_metrics


def sk_domain(logits: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, float]:
    """The reference: scikit-learn on one domain's rows."""
    pred = logits.argmax(axis=1)
    out = {"top1": skm.accuracy_score(y, pred),
           "macro_f1": skm.f1_score(y, pred, labels=range(n_classes), average="macro", zero_division=0)}
    if n_classes >= 5:
        out["top5"] = skm.top_k_accuracy_score(y, logits, k=5, labels=range(n_classes))
    return out


# ------------------------------------------------------------------------------------------------ unit

@pytest.mark.parametrize("n_classes", [3, 7])
def test_per_domain_metrics_equal_scikit_learn_on_each_domains_rows(n_classes: int) -> None:
    rng = np.random.default_rng(n_classes)
    n = 300
    logits = rng.normal(size=(n, n_classes))
    y = rng.integers(0, n_classes, n)
    logits[np.arange(n), y] += rng.normal(1.0, 1.0, n)  # better than chance, not perfect
    domains = rng.choice(["studio", "real", "phone"], n, p=[0.5, 0.4, 0.1])
    domains[:5] = ""  # rows without a domain count overall only
    y[domains == "phone"] = 0  # a domain holding one class: macro F1 still averages over all C classes
    got = per_domain_metrics(logits, y, domains)
    expected = {}
    for dom in ("phone", "real", "studio"):
        rows = domains == dom
        expected.update({f"{k}@{dom}": v for k, v in sk_domain(logits[rows], y[rows], n_classes).items()})
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert ("top5@real" in got) == (n_classes >= 5)  # as the overall top5: only when C >= 5


def test_per_domain_metrics_accept_tensors_and_check_lengths() -> None:
    import torch

    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    got = per_domain_metrics(logits, y, np.array(["a", "a", "a", "b", "b", "b"]))
    assert set(got) == {"top1@a", "macro_f1@a", "top1@b", "macro_f1@b"}
    with pytest.raises(ValueError, match="domains"):
        per_domain_metrics(logits, y, np.array(["a"] * 5))


def test_config_and_metrics_agree_on_the_domain_metric_names() -> None:
    assert tuple(DOMAIN_MONITORS) == tuple(DOMAIN_METRICS) == ("top1", "top5", "macro_f1")


def test_classification_task_adds_the_validation_domains_metrics() -> None:
    import torch
    from torch import nn

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    y = torch.tensor([0, 1, 1, 2])
    task = ClassificationTask(nn.CrossEntropyLoss(), valid_domains=np.array(["real", "real", "studio", "studio"]))
    row = task.metrics(logits, y)
    assert row["top1@real"] == 1.0 and row["top1@studio"] == 0.5 and "accuracy" in row
    assert "top1@real" not in ClassificationTask(nn.CrossEntropyLoss()).metrics(logits, y)


def csv_overrides(root: Path) -> list[str]:
    return ["data.source=csv", f"data.train_csv={root / 'train.csv'}", f"data.image_dir_train={root}"]


@pytest.mark.parametrize("monitor", ["top1@real", "top5@real", "macro_f1@studio photos"])
def test_a_domain_monitor_is_a_valid_classification_monitor(monitor: str, tmp_path: Path) -> None:
    assert load_config(None, overrides=[*csv_overrides(tmp_path), f"train.monitor={monitor}"]).train.monitor == monitor


@pytest.mark.parametrize("monitor", ["recall@real", "top1@", "accuracy@real"])
def test_a_bad_domain_monitor_names_the_valid_forms(monitor: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides=[*csv_overrides(tmp_path), f"train.monitor={monitor}"])
    assert "train.monitor" in str(err.value) and "top1@<domain>" in str(err.value), str(err.value)


def test_the_early_stopping_maximises_a_domain_monitor() -> None:
    from vistrain.engine.hooks import EarlyStopping
    from vistrain.pipelines.tune import direction_of

    assert EarlyStopping("top1@real", 3).mode == "max" and direction_of("macro_f1@real") == "maximize"


@pytest.mark.skipif(not hasattr(load_config(None).data, "sources"), reason="data.sources not merged yet")
def test_named_sources_fix_the_domains_at_config_load(tmp_path: Path) -> None:
    for name in ("studio", "real"):
        (tmp_path / name / "a").mkdir(parents=True)
    sources = (f"data.sources=[{{name: studio, source: folders, image_dir_train: {tmp_path / 'studio'}}}, "
               f"{{name: real, source: folders, image_dir_train: {tmp_path / 'real'}}}]")
    assert load_config(None, overrides=[sources, "train.monitor=top1@real"]).train.monitor == "top1@real"
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides=[sources, "train.monitor=top1@phone"])
    assert "train.monitor: domain 'phone' is not in the data; domains: real, studio" in str(err.value)
