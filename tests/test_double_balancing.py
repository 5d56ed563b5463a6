"""sampler.name: weighted and train.class_weights: balanced each balance the classes; together they count a class in
proportion to 1 / its size, so the config is refused (exit 2; the command line in test_cli_errors)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from vistrain.config import load_config
from vistrain.data.samplers import SAMPLERS
from vistrain.errors import ConfigError


def test_weighted_sampler_with_balanced_weights_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides=["sampler.name=weighted", "train.class_weights=balanced"])
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith("sampler.name: weighted and train.class_weights: balanced: ")
    assert "10 images beside one of 1000 weighs 100× it instead of 1×" in line
    assert line.endswith("keep one (sampler.name: random, or train.class_weights: none)")


@pytest.mark.parametrize("overrides", [["sampler.name=weighted"], ["train.class_weights=balanced"],
                                       ["sampler.name=weighted", "train.class_weights=from_class_map",
                                        "data.class_map=/nowhere/class_map.json"]])
def test_either_balancing_alone_is_accepted(overrides: list[str]) -> None:
    load_config(None, overrides=overrides)


def test_the_refusal_arithmetic() -> None:
    """The message's figure, from the weighted sampler's own draws and scikit-learn's balanced weights: 10 images
    beside 1000 -> the rare class weighs 100x the common one in the loss; either alone -> 1x."""
    labels = [0] * 10 + [1] * 1000
    weights = compute_class_weight("balanced", classes=np.array([0, 1]), y=np.array(labels))
    generator = torch.Generator().manual_seed(0)
    draws = Counter(labels[i] for _ in range(20) for i in SAMPLERS["weighted"](labels, generator))
    assert draws[0] / draws[1] == pytest.approx(1.0, rel=0.05)  # the sampler alone: classes equally often
    assert Counter(labels)[0] * weights[0] == pytest.approx(Counter(labels)[1] * weights[1])  # weights alone: equal
    both = draws[0] * weights[0] / (draws[1] * weights[1])
    assert both == pytest.approx(100, rel=0.05)
