"""vistrain.data.preprocess.Preprocessor: the one deterministic preprocessing, checked against seed 003's reference
(centre square crop, OpenCV INTER_LINEAR resize, CLAHE on LAB's L channel, ImageNet normalisation)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from vistrain.config.loader import validate
from vistrain.data.preprocess import Preprocessor
from vistrain.errors import ConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def seed_reference(image: np.ndarray, target: int, clahe: bool = True, clip: float = 2.0, grid: int = 8
                   ) -> torch.Tensor:
    """Seed 003's UnifiedPreprocessor.process, step by step as its document describes it (float64 normalisation,
    as its tuple mean / std make NumPy compute)."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top: top + side, left: left + side]
    out = cv2.resize(square, (target, target), interpolation=cv2.INTER_LINEAR)
    if clahe:
        l_chan, a_chan, b_chan = cv2.split(cv2.cvtColor(out, cv2.COLOR_RGB2LAB))
        l_chan = cv2.createCLAHE(clipLimit=clip, tileGridSize=(grid, grid)).apply(l_chan)
        out = cv2.cvtColor(cv2.merge([l_chan, a_chan, b_chan]), cv2.COLOR_LAB2RGB)
    scaled = out.astype(np.float32) / 255.0
    return torch.from_numpy((scaled - MEAN) / STD).permute(2, 0, 1).float()


def seed_like(size: int = 64, clahe: bool = True, **kw) -> Preprocessor:
    return Preprocessor(size=(size, size), crop="center_square", interpolation="bilinear", clahe=clahe, mean=MEAN,
                        std=STD, **kw)


def photo_like(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth shapes, a gradient, uneven light and noise: more like a photo than uniform noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([128 + 100 * np.sin(xx / max(w, 1) * 6 + c) * np.cos(yy / max(h, 1) * 4) for c in range(3)], -1)
    img *= 0.5 + yy[..., None] / max(h, 1)  # light from one side
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("h,w", [(480, 640), (640, 480), (333, 517), (1000, 37), (37, 1000), (64, 64), (7, 9)])
def test_process_equals_the_seed_reference_on_odd_sizes(h: int, w: int) -> None:
    rng = np.random.default_rng(h * 1000 + w)
    for image in (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), photo_like(h, w, rng)):
        got = seed_like(64).process(image)
        want = seed_reference(image, 64)
        assert got.dtype == torch.float32 and tuple(got.shape) == (3, 64, 64)
        assert torch.max(torch.abs(got - want)).item() <= 1e-5


@pytest.mark.parametrize("clip,grid", [(1.0, 4), (4.0, 16), (2.0, 1)])
def test_clahe_settings_match_the_reference(clip: float, grid: int) -> None:
    image = photo_like(200, 300, np.random.default_rng(1))
    got = seed_like(96, clip_limit=clip, grid=grid).process(image)
    assert torch.max(torch.abs(got - seed_reference(image, 96, clip=clip, grid=grid))).item() <= 1e-5


def test_clahe_changes_the_image_and_off_means_off() -> None:
    image = photo_like(100, 100, np.random.default_rng(2))
    on, off = seed_like(64, clahe=True).process(image), seed_like(64, clahe=False).process(image)
    assert torch.max(torch.abs(on - off)).item() > 0.1
    assert torch.max(torch.abs(off - seed_reference(image, 64, clahe=False))).item() <= 1e-5


def test_one_pixel_wide_images_have_a_defined_result_and_empty_ones_a_clear_error() -> None:
    thin = np.full((50, 1, 3), 200, dtype=np.uint8)
    out = seed_like(16).process(thin)  # the centred 1x1 square, scaled up: one flat colour
    assert torch.allclose(out, out[:, :1, :1].expand_as(out))
    assert torch.max(torch.abs(out - seed_reference(thin, 16))).item() <= 1e-5
    with pytest.raises(ValueError, match="empty"):
        seed_like(16).process(np.zeros((0, 5, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="RGB uint8"):
        seed_like(16).process(np.zeros((5, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="RGB uint8"):
        seed_like(16).process(np.zeros((5, 5, 3), dtype=np.float32))


def test_no_crop_resizes_the_whole_image_to_h_by_w() -> None:
    image = photo_like(30, 90, np.random.default_rng(3))
    p = Preprocessor(size=(20, 40), crop="none", interpolation="area", mean=MEAN, std=STD)
    pixels = p.deterministic(image)
    assert pixels.shape == (20, 40, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels, cv2.resize(image, (40, 20), interpolation=cv2.INTER_AREA))


def test_dict_round_trip_is_identical_and_survives_json() -> None:
    p = seed_like(48, clip_limit=3.0, grid=4)
    d = json.loads(json.dumps(p.to_dict()))
    assert d["version"] == 1 and len(d["hash"]) == 16
    assert Preprocessor.from_dict(d) == p
    image = photo_like(70, 50, np.random.default_rng(4))
    assert torch.equal(Preprocessor.from_dict(d).process(image), p.process(image))
    other = seed_like(48, clip_limit=3.5, grid=4).to_dict()
    assert other["hash"] != d["hash"]  # the hash tracks every setting


def test_a_hand_edited_or_foreign_description_is_refused() -> None:
    d = seed_like(48).to_dict()
    d["clahe"]["clip_limit"] = 9.0
    with pytest.raises(ValueError, match="hash"):
        Preprocessor.from_dict(d)
    with pytest.raises(ValueError, match="not a vistrain preprocessing"):
        Preprocessor.from_dict({"target_size": 512})
    future = {k: v for k, v in seed_like(48).to_dict().items() if k != "hash"}
    future["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        Preprocessor.from_dict(future)


def test_from_config_takes_the_section_the_size_and_the_models_normalisation() -> None:
    cfg = validate({"model": {"name": "resnet10t"}, "train": {"img_size": [24, 40]},
                    "preprocess": {"crop": "center_square", "clahe": {"enabled": True, "grid": 4}}})
    p = Preprocessor.from_config(cfg)
    assert p.size == (24, 40) and p.crop == "center_square" and p.clahe and p.grid == 4
    assert p.mean == pytest.approx(MEAN) and p.std == pytest.approx(STD)  # resnet10t's timm config: ImageNet
    clip = validate({"model": {"name": "vit_base_patch16_clip_224"}, "train": {"img_size": 32}})
    assert Preprocessor.from_config(clip).mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    custom = validate({"train": {"img_size": 32}, "preprocess": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}})
    assert Preprocessor.from_config(custom).std == (0.25, 0.25, 0.25)


@pytest.mark.parametrize("override,key", [({"clahe": {"grid": 0}}, "preprocess.clahe.grid"),
                                          ({"clahe": {"clip_limit": 0}}, "preprocess.clahe.clip_limit"),
                                          ({"crop": "centre"}, "preprocess.crop"),
                                          ({"resize": {"interpolation": "lanczos"}}, "preprocess.resize.interpolation"),
                                          ({"std": [0.2, 0.0, 0.2]}, "preprocess.std"),
                                          ({"mean": [0.5, 0.5]}, "preprocess.mean")])
def test_bad_preprocess_settings_are_config_errors_naming_the_key(override: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate({"preprocess": override})
    assert err.value.problems[0].startswith(key), err.value.problems


def test_read_only_pixels_from_pil_are_normalised_without_a_warning() -> None:
    """``np.asarray(pil_image)`` is read-only; an image already at the output size reaches ``normalize`` as is."""
    import warnings

    from PIL import Image

    pixels = np.asarray(Image.fromarray(photo_like(16, 16, np.random.default_rng(6))))
    assert not pixels.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = Preprocessor(size=(16, 16), mean=MEAN, std=STD).process(pixels)
    want = (torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) \
        / torch.tensor(STD).view(3, 1, 1)
    assert torch.allclose(out, want, atol=1e-6)


@pytest.mark.parametrize("value", [[1, 2], "crop", None, 3])
def test_a_description_that_is_not_an_object_is_refused_clearly(value: object) -> None:
    with pytest.raises(ValueError, match="not a vistrain preprocessing description"):
        Preprocessor.from_dict(value)  # type: ignore[arg-type]
