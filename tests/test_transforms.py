"""The training transform: the augmentation policy on pixels already through the deterministic preprocessing, then
the preprocessor's normalisation, then random erasing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vistrain.config.schema import AugmentCfg
from vistrain.data.preprocess import Preprocessor
from vistrain.data.transforms import TrainTransform

PRE = Preprocessor(size=(24, 40), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (24, 40, 3), dtype=np.uint8)


def test_policy_none_is_the_deterministic_path_exactly() -> None:
    x = pixels()
    assert torch.equal(TrainTransform(AugmentCfg(policy="none"), PRE)(x), PRE.normalize(x))


@pytest.mark.parametrize("policy", ["light", "hard"])
def test_policies_keep_the_size_vary_per_draw_and_follow_the_torch_seed(policy: str) -> None:
    tf, x = TrainTransform(AugmentCfg(policy=policy), PRE), pixels(1)
    torch.manual_seed(3)
    first = tf(x)
    second = tf(x)
    torch.manual_seed(3)
    again = tf(x)
    assert first.dtype == torch.float32 and first.shape == (3, 24, 40)
    assert not torch.equal(first, second)
    assert torch.equal(first, again)  # the loop reseeds torch per epoch: a resumed epoch draws the same


def test_a_certain_flip_alone_mirrors_the_normalised_pixels() -> None:
    tf = TrainTransform(AugmentCfg(policy="light", hflip=1.0, rotate=0.0, color_jitter=0.0), PRE)
    tf.augment.transforms = tf.augment.transforms[:1]  # the flip; the policy's affine always moves the image
    x = pixels(2)
    assert torch.equal(tf(x), torch.flip(PRE.normalize(x), dims=[-1]))


def test_random_erasing_comes_after_normalisation() -> None:
    x = np.full((24, 40, 3), 200, dtype=np.uint8)
    out = TrainTransform(AugmentCfg(policy="none", random_erasing=1.0), PRE)(x)
    erased = (out == 0).all(dim=0)
    assert 0 < int(erased.sum()) < 24 * 40
    assert torch.equal(out[:, ~erased], PRE.normalize(x)[:, ~erased])
