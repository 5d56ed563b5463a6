"""augment.auto: timm's named auto-augment policies (RandAugment, AugMix, AutoAugment, 3-Augment) built by timm itself,
on the preprocessed uint8 pixels, with the hyper-parameters timm's own ``create_transform`` gives them (the model's
mean as fill, translate_const 0.45 x the shorter side); an unknown name is a config error naming the key."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_config, write_csv_dataset, write_yaml
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms_factory import transforms_imagenet_train

from vistrain.config import load_config
from vistrain.config.schema import AugmentCfg
from vistrain.data.dataset import item_rng
from vistrain.data.preprocess import Preprocessor
from vistrain.data.transforms import TrainTransform, augment_ops
from vistrain.errors import ConfigError

PRE = Preprocessor(size=(48, 64), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
NAME = "rand-m9-mstd0.5-inc1"


def pixels(seed: int = 0) -> np.ndarray:
    """A picture with edges and colour, which every RandAugment operation changes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:48, 0:64]
    img = np.stack([(xx * 4) % 256, (yy * 5) % 256, ((xx + yy) // 8 % 2) * 200 + 20], axis=-1).astype(np.float64)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def seed_all(seed: int) -> None:
    """timm's operations draw from Python's ``random`` and NumPy's global generator."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def timm_reference(name: str) -> object:
    """timm's RandAugment with the hyper-parameters written out as timm's create_transform derives them from the
    image size and the model's mean (transforms_factory.transforms_imagenet_train)."""
    hparams = {"translate_const": int(min(PRE.size) * 0.45),
               "img_mean": tuple(min(255, round(255 * m)) for m in PRE.mean),
               "interpolation": Image.Resampling.BILINEAR}
    return rand_augment_transform(name, hparams)


def test_rand_augment_gives_the_images_of_timms_rand_augment_transform() -> None:
    tf = TrainTransform(AugmentCfg(policy="none", auto=NAME), PRE)
    reference = timm_reference(NAME)
    changed = 0
    for seed in range(12):
        x = pixels(seed)
        seed_all(seed)
        ours = tf(x)
        seed_all(seed)
        theirs = PRE.normalize(np.asarray(reference(Image.fromarray(x))))
        assert torch.equal(ours, theirs), f"seed {seed}: vistrain's augment.auto differs from timm's"
        changed += not torch.equal(ours, PRE.normalize(x))
    assert changed >= 6, "RandAugment left most images untouched: the op is not applied"


def test_the_hyper_parameters_are_the_ones_timms_create_transform_gives() -> None:
    """timm's own factory (the auto-augment stage of its training transform) draws the same images."""
    _, secondary, _ = transforms_imagenet_train(PRE.size, auto_augment=NAME, interpolation="bilinear",
                                                mean=PRE.mean, std=PRE.std, separate=True)
    (op,) = [o for o in augment_ops(AugmentCfg(policy="none", auto=NAME), PRE.size, PRE)]
    for seed in range(6):
        image = Image.fromarray(pixels(seed))
        seed_all(seed)
        ours = np.asarray(op(image))
        seed_all(seed)
        theirs = np.asarray(secondary(image))
        assert np.array_equal(ours, theirs), seed


@pytest.mark.parametrize("name", ["augmix-m5-w4-d2", "original", "v0", "3a", "trivial", "rand-m6-n1-mstd0.5"])
def test_every_named_policy_keeps_the_size_and_changes_the_pixels(name: str) -> None:
    tf = TrainTransform(AugmentCfg(policy="none", auto=name), PRE)
    outs = []
    for seed in range(8):
        seed_all(seed)
        outs.append(tf(pixels(0)))
    assert all(o.shape == (3, 48, 64) and o.dtype == torch.float32 for o in outs)
    assert any(not torch.equal(o, PRE.normalize(pixels(0))) for o in outs), f"{name} never changed the image"


def test_fill_is_the_models_mean() -> None:
    """Rotations, shears and translations uncover border pixels: they take the model's mean (0-255 ints), as in timm."""
    tf = TrainTransform(AugmentCfg(policy="none", auto="rand-m10-n1-p1.0-mstd0"), PRE)
    fill = PRE.normalize(np.broadcast_to(np.array([round(255 * m) for m in PRE.mean], np.uint8), (48, 64, 3)).copy())
    white = np.full((48, 64, 3), 255, dtype=np.uint8)
    filled = 0
    for seed in range(20):
        seed_all(seed)
        filled += bool((tf(white) == fill).all(dim=0).any())
    assert filled >= 3, "no geometric operation filled with the model's mean"


def test_the_auto_policy_runs_after_the_flip_and_before_the_colour_jitter() -> None:
    ops = augment_ops(AugmentCfg(policy="light", auto=NAME, color_jitter=0.3), PRE.size, PRE)
    names = [type(o).__name__ for o in ops]
    assert names == ["RandomHorizontalFlip", "RandomAffine", "RandAugment", "ColorJitter"], names


def test_an_items_draw_does_not_depend_on_the_global_generators() -> None:
    """num_workers: 0 (the main process): the item's seed fixes timm's Python / NumPy draws as it fixes torch's, and
    the training's own streams are left where they were."""
    tf = TrainTransform(AugmentCfg(policy="none", auto=NAME), PRE)
    x = pixels(3)
    outs = []
    for noise in range(4):
        random.seed(100 + noise)
        np.random.seed(100 + noise)
        with item_rng(1234):
            outs.append(tf(x))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    random.seed(5)
    np.random.seed(5)
    expected = (random.random(), np.random.random())
    random.seed(5)
    np.random.seed(5)
    with item_rng(99):
        tf(x)
    assert (random.random(), np.random.random()) == expected


@pytest.mark.parametrize("name", ["bogus", "rand-x9", "augmix-q3", "trivial-m3", "v1"])
def test_an_unknown_policy_names_the_key_and_timms_forms(name: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=[f"augment.auto={name}"])
    (problem,) = excinfo.value.problems
    assert problem.startswith("augment.auto:") and name in problem, problem
    assert "rand-m9-mstd0.5-inc1" in problem and "augmix-m5-w4-d2" in problem and "original" in problem, problem


def test_an_unknown_policy_exits_2_on_the_command_line(tmp_path: Path) -> None:
    data = write_csv_dataset(tmp_path / "data", per_class=2)
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config(data.root))
    res = run_cli("train", "--config", str(cfg), "augment.auto=rand-q9", cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "augment.auto:" in res.stdout + res.stderr and "Traceback" not in res.stderr


def test_the_readmes_timm_style_example_builds_the_chain_it_describes() -> None:
    import re

    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("### Writing your augmentation")
    (block,) = re.findall(r"```yaml\n(.*?)```", readme[start:readme.index("\n#", start + 5)], flags=re.S)
    cfg = load_config(yaml.safe_load(block))
    tf = TrainTransform(cfg.augment, PRE)
    assert [type(o).__name__ for o in tf.augment.transforms] == ["RandomResizedCrop", "RandomHorizontalFlip",
                                                                 "RandAugment"]
    assert tf.augment.transforms[0].scale == (0.25, 1.0)
    assert type(tf.erase).__name__ == "RandomErasing" and tf.erase.per_pixel and tf.erase.probability == 0.25
