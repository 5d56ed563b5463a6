"""``augment.hue``: torchvision ColorJitter's hue shift in the train policies (seed 003: ColorJitter(0.2, 0.2, 0.2,
0.1)), separate from the brightness / contrast / saturation strength ``augment.color_jitter``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vistrain.config import load_config
from vistrain.config.schema import AugmentCfg
from vistrain.data.preprocess import Preprocessor
from vistrain.data.transforms import TrainTransform
from vistrain.errors import ConfigError

RED = (200, 30, 30)


def _centre_pixels(aug: AugmentCfg, draws: int = 24) -> np.ndarray:
    """The centre pixel (0..255 RGB) of a plain red picture after ``draws`` train-time draws."""
    pixels = np.asarray(Image.new("RGB", (32, 32), RED))  # already preprocessed: uint8 [32, 32, 3]
    tf = TrainTransform(aug, Preprocessor(size=(32, 32), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    torch.manual_seed(0)
    return np.array([(tf(pixels)[:, 16, 16] * 255).numpy() for _ in range(draws)])


def test_hue_shifts_the_colour_and_zero_leaves_it() -> None:
    base = {"policy": "light", "hflip": 0.0, "rotate": 0.0, "color_jitter": 0.0}
    still = _centre_pixels(AugmentCfg(**base))
    assert np.abs(still - RED).max() < 1.5  # nothing but the (colour-neutral) affine on a plain picture
    shifted = _centre_pixels(AugmentCfg(**base, hue=0.1))
    # A hue turn moves red towards yellow (green rises) or magenta (blue rises); brightness stays.
    assert np.max(shifted[:, 1:] - np.array(RED[1:])) > 20
    assert np.abs(shifted.max(axis=1) - max(RED)).max() < 3


def test_hue_is_a_config_key_within_torchvision_range() -> None:
    assert load_config(None, overrides=["augment.hue=0.1"]).augment.hue == 0.1
    assert load_config(None).augment.hue == 0.0
    with pytest.raises(ConfigError, match=r"^augment\.hue:"):
        load_config(None, overrides=["augment.hue=0.6"])
