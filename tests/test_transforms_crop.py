"""augment.crop / scale / ratio / pad and the random erasing modes: what each builds, checked against the libraries
that define them (torchvision's transforms, timm's RandomErasing) and against the published re-ID strong-baseline
chain; the defaults build exactly the operations vistrain built before these keys existed."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import v2 as T

from vistrain.config import load_config
from vistrain.config.bundled import bundled_config
from vistrain.config.schema import AugmentCfg
from vistrain.data.preprocess import Preprocessor
from vistrain.data.transforms import TrainTransform, augment_ops
from vistrain.errors import ConfigError

PRE = Preprocessor(size=(24, 40), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
HW = PRE.size


def pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (24, 40, 3), dtype=np.uint8)


def run_both(tf: TrainTransform, reference: object, erase: object, seeds: int = 8) -> None:
    """``tf`` against torchvision ops written out by hand (PIL, then normalise, then erase), same torch seed."""
    for seed in range(seeds):
        x = pixels(seed)
        torch.manual_seed(seed)
        ours = tf(x)
        torch.manual_seed(seed)
        theirs = PRE.normalize(np.asarray(reference(Image.fromarray(x))))
        theirs = erase(theirs) if erase is not None else theirs
        assert torch.equal(ours, theirs), seed


# ------------------------------------------------------------------------------- the defaults: as before

def test_the_default_light_policy_is_the_operations_vistrain_always_built() -> None:
    before = T.Compose([T.RandomHorizontalFlip(0.5),
                        T.RandomAffine(degrees=10.0, translate=(0.05, 0.05), scale=(0.9, 1.1), fill=255),
                        T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.0)])
    run_both(TrainTransform(AugmentCfg(), PRE), before, None)


def test_the_default_hard_policy_is_the_operations_vistrain_always_built() -> None:
    before = T.Compose([T.RandomResizedCrop(HW, scale=(0.6, 1.0), antialias=True), T.RandomHorizontalFlip(0.5),
                        T.RandomAffine(degrees=10.0, translate=(0.1, 0.1), scale=(0.8, 1.2), fill=255),
                        T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.0),
                        T.RandomApply([T.GaussianBlur(kernel_size=5, sigma=(0.1, 2.0))], p=0.2)])
    run_both(TrainTransform(AugmentCfg(policy="hard"), PRE), before, T.RandomErasing(p=0.25, value=0))


# ------------------------------------------------------------------------------------------- crops

def test_rrc_takes_scale_and_ratio_and_stands_in_for_the_affines_shift_and_zoom() -> None:
    aug = AugmentCfg(policy="light", crop="rrc", scale=[0.3, 0.9], ratio=[0.5, 2.0], rotate=0, color_jitter=0)
    ops = augment_ops(aug, HW)
    assert [type(o).__name__ for o in ops] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    assert (tuple(ops[0].size), ops[0].scale, ops[0].ratio) == (HW, (0.3, 0.9), (0.5, 2.0))
    rotating = augment_ops(aug.model_copy(update={"rotate": 15.0}), HW)[-1]
    assert isinstance(rotating, T.RandomAffine)
    assert (rotating.degrees, rotating.translate, rotating.scale) == ([-15.0, 15.0], None, None)


def test_rrc_applies_with_policy_none_too() -> None:
    ops = augment_ops(AugmentCfg(policy="none", crop="rrc"), HW)
    assert [type(o).__name__ for o in ops] == ["RandomResizedCrop"]
    assert ops[0].scale == (0.08, 1.0) and ops[0].ratio == pytest.approx((0.75, 4 / 3))


def test_crop_none_drops_the_hard_policys_crop_only() -> None:
    names = [type(o).__name__ for o in augment_ops(AugmentCfg(policy="hard", crop="none"), HW)]
    assert names == ["RandomHorizontalFlip", "RandomAffine", "ColorJitter", "RandomApply"]


def test_pad_crop_is_a_shifted_window_of_the_zero_padded_image() -> None:
    tf = TrainTransform(AugmentCfg(policy="none", crop="pad_crop", pad=4), PRE)
    x = pixels(5)
    padded = np.pad(x, ((4, 4), (4, 4), (0, 0)))
    shifts = set()
    for seed in range(30):
        torch.manual_seed(seed)
        out = tf(x)
        found = [(dy, dx) for dy in range(9) for dx in range(9)
                 if torch.equal(out, PRE.normalize(padded[dy:dy + 24, dx:dx + 40]))]
        assert found, f"seed {seed}: not a window of the padded image"
        shifts.add(found[0])
    assert len(shifts) > 10, "the crop does not move"


@pytest.mark.parametrize(("key", "value"), [("scale", [0.9, 0.2]), ("scale", [0.0, 1.0]), ("scale", [0.5, 1.5]),
                                            ("ratio", [2.0, 0.5]), ("ratio", [0, 1]), ("scale", [0.5])])
def test_a_bad_range_names_the_key(key: str, value: list[float]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=[f"augment.{key}={value}"])
    assert excinfo.value.problems[0].startswith(f"augment.{key}:"), excinfo.value.problems


# ----------------------------------------------------------------------------------------- erasing

def test_const_erasing_fills_with_the_models_mean() -> None:
    x = np.full((24, 40, 3), 200, dtype=np.uint8)
    torch.manual_seed(0)
    out = TrainTransform(AugmentCfg(policy="none", random_erasing=1.0), PRE)(x)
    erased = (out == 0).all(dim=0)  # 0 after normalising is the mean pixel
    assert 0 < int(erased.sum()) < 24 * 40


@pytest.mark.parametrize(("mode", "count"), [("rand", 1), ("pixel", 1), ("const", 3), ("pixel", 2)])
def test_other_erasing_modes_and_counts_are_timms_random_erasing(mode: str, count: int) -> None:
    tf = TrainTransform(AugmentCfg(policy="none", random_erasing=0.7, erasing_mode=mode, erasing_count=count), PRE)
    reference = RandomErasing(0.7, mode=mode, max_count=count, device="cpu")
    differ = 0
    for seed in range(10):
        x = pixels(seed)
        random.seed(seed)
        torch.manual_seed(seed)
        ours = tf(x)
        random.seed(seed)
        torch.manual_seed(seed)
        theirs = reference(PRE.normalize(x))
        assert torch.equal(ours, theirs), seed
        differ += not torch.equal(ours, PRE.normalize(x))
    assert differ >= 3


def test_rand_mode_fills_one_random_colour_per_rectangle() -> None:
    tf = TrainTransform(AugmentCfg(policy="none", random_erasing=1.0, erasing_mode="rand"), PRE)
    x = np.full((24, 40, 3), 200, dtype=np.uint8)
    random.seed(0)
    torch.manual_seed(0)
    out = tf(x)
    erased = (out != PRE.normalize(x)).any(dim=0)
    colours = out[:, erased].T.unique(dim=0)
    assert erased.any() and len(colours) == 1 and not (colours == 0).all()


# ---------------------------------------------------------------------- the re-ID strong baseline chain

# reid-strong-baseline (Luo et al. 2019), data/transforms/build.py and config/defaults.py: the training transform
PUBLISHED = [("Resize", {"size": (256, 128)}), ("RandomHorizontalFlip", {"p": 0.5}), ("Pad", {"padding": 10}),
             ("RandomCrop", {"size": (256, 128)}), ("ToTensor", {}),
             ("Normalize", {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}),
             ("RandomErasing", {"probability": 0.5, "area": (0.02, 0.4), "fill": "PIXEL_MEAN"})]


def listed(tf: TrainTransform, pre: Preprocessor) -> list[tuple[str, dict]]:
    """vistrain's training transform in the published list's terms: the preprocessor's resize, the random
    operations with their parameters, the conversion and normalisation, the erasing."""
    out: list[tuple[str, dict]] = [("Resize", {"size": pre.size})]
    for op in tf.augment.transforms:
        name = type(op).__name__
        if isinstance(op, T.RandomHorizontalFlip):
            out.append((name, {"p": op.p}))
        elif isinstance(op, T.Pad):
            assert op.fill == {type(None): 0} or op.fill == 0, op.fill  # T.Pad's default: black, as published
            assert op.padding_mode == "constant"
            out.append((name, {"padding": op.padding}))
        elif isinstance(op, T.RandomCrop):
            out.append((name, {"size": tuple(op.size)}))
        else:
            out.append((name, {"unexpected": repr(op)}))
    out += [("ToTensor", {}), ("Normalize", {"mean": pre.mean, "std": pre.std})]
    erase = tf.erase
    assert isinstance(erase, T.RandomErasing) and erase.value == [0.0], erase  # 0 after normalising = the mean
    out.append(("RandomErasing", {"probability": erase.p, "area": tuple(erase.scale), "fill": "PIXEL_MEAN"}))
    return out


def test_reid_market_trains_on_the_published_strong_baseline_chain() -> None:
    cfg = load_config(bundled_config("reid_market.yaml"))
    pre = Preprocessor.from_config(cfg)
    got = listed(TrainTransform(cfg.augment, pre), pre)
    assert [name for name, _ in got] == [name for name, _ in PUBLISHED]
    for (name, ours), (_, theirs) in zip(got, PUBLISHED):
        assert ours.keys() == theirs.keys(), name
        for key in ours:
            assert ours[key] == pytest.approx(theirs[key]) if isinstance(theirs[key], tuple | float) \
                else ours[key] == theirs[key], (name, key, ours[key], theirs[key])
    assert pre.crop == "none" and not pre.clahe  # the resize is the only deterministic step


@pytest.mark.parametrize(("override", "crop"), [("augment.scale=[0.5,1.0]", "rrc"), ("augment.ratio=[1,1]", "rrc"),
                                                ("augment.pad=4", "pad_crop")])
def test_a_crop_key_set_for_another_crop_is_an_error(override: str, crop: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides=[override, "augment.policy=hard"])
    key = override.split("=")[0]
    assert excinfo.value.problems == [f"{key}: read by augment.crop: {crop} only, and augment.crop is auto; set "
                                      f"augment.crop: {crop} or remove {key}"]
    load_config(None, overrides=[override, f"augment.crop={crop}"])  # with its crop: fine


@pytest.mark.parametrize("mode", ["const", "pixel"])
def test_erasing_area_sets_the_erased_share_on_the_cpu_and_on_the_device(mode: str) -> None:
    """``augment.erasing_area`` (the strong baseline's 0.02-0.4, here a narrow 0.30-0.36 to measure it): each erased
    image loses that share of its pixels through torchvision's or timm's erasing on the CPU, and on average the same
    through the device twin."""
    pytest.importorskip("kornia")
    from vistrain.data.device_augment import DeviceAugment
    from vistrain.data.transforms import to_uint8_tensor

    aug = AugmentCfg(policy="none", random_erasing=1.0, erasing_mode=mode, erasing_area=[0.30, 0.36])
    pre = Preprocessor(size=(96, 160), mean=PRE.mean, std=PRE.std)  # large enough for whole-pixel sides
    flat = np.full((96, 160, 3), 200, dtype=np.uint8)  # erased pixels are the only ones that change
    torch.manual_seed(0)
    random.seed(0)
    cpu = torch.stack([TrainTransform(aug, pre)(flat) for _ in range(60)])
    device = DeviceAugment(aug, pre)(torch.stack([to_uint8_tensor(flat)] * 60))
    clean = pre.normalize(flat)
    shares = {}
    for name, batch in (("cpu", cpu), ("device", device)):
        share = (batch != clean).any(dim=1).float().mean(dim=(1, 2))
        shares[name] = share[share > 0]
        assert len(shares[name]) >= 45, (name, len(shares[name]))  # a rectangle that fits in no try is skipped
    # the CPU draws retry until a rectangle fits: every share is in the range (whole-pixel sides aside); Kornia clips a
    # rectangle taller than the image instead, so the device's shares are compared on average
    assert 0.285 <= float(shares["cpu"].min()) and float(shares["cpu"].max()) <= 0.375, shares["cpu"]
    assert abs(float(shares["device"].mean()) - float(shares["cpu"].mean())) < 0.03, shares
    default = torch.stack([TrainTransform(AugmentCfg(policy="none", random_erasing=1.0), pre)(flat) for _ in range(60)])
    assert float((default != clean).any(dim=1).float().mean()) < 0.25  # 0.02-0.33 by default: less on average
