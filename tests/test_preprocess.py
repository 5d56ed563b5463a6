"""vistrain.data.preprocess.Preprocessor: the one deterministic preprocessing, checked against seed 003's reference
(centre square crop, OpenCV INTER_LINEAR resize, CLAHE on LAB's L channel, ImageNet normalisation) with
``shrink: interpolation``, and against the same reference with INTER_AREA for shrinks (the default ``reduced_area``),
plus the reduced JPEG decode of large photos and the version 1 descriptions of older runs."""

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


def seed_reference(image: np.ndarray, target: int, clahe: bool = True, clip: float = 2.0, grid: int = 8,
                   shrink: int = cv2.INTER_LINEAR) -> torch.Tensor:
    """Seed 003's UnifiedPreprocessor.process, step by step as its document describes it (float64 normalisation,
    as its tuple mean / std make NumPy compute)."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top: top + side, left: left + side]
    out = cv2.resize(square, (target, target), interpolation=shrink if side >= target else cv2.INTER_LINEAR)
    if clahe:
        l_chan, a_chan, b_chan = cv2.split(cv2.cvtColor(out, cv2.COLOR_RGB2LAB))
        l_chan = cv2.createCLAHE(clipLimit=clip, tileGridSize=(grid, grid)).apply(l_chan)
        out = cv2.cvtColor(cv2.merge([l_chan, a_chan, b_chan]), cv2.COLOR_LAB2RGB)
    scaled = out.astype(np.float32) / 255.0
    return torch.from_numpy((scaled - MEAN) / STD).permute(2, 0, 1).float()


def seed_like(size: int = 64, clahe: bool = True, **kw) -> Preprocessor:
    """Seed 003's settings: every resize INTER_LINEAR (``shrink: interpolation``)."""
    kw.setdefault("shrink", "interpolation")
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
        default = seed_like(64, shrink="reduced_area").process(image)  # shrinks: INTER_AREA; enlargements: bilinear
        assert torch.max(torch.abs(default - seed_reference(image, 64, shrink=cv2.INTER_AREA))).item() <= 1e-5


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
    assert d["version"] == 2 and len(d["hash"]) == 16 and d["resize"]["shrink"] == "interpolation"
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


def jpeg(path, h: int, w: int, orientation: int = 1, seed: int = 0):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(photo_like(h, w, np.random.default_rng(seed))).save(path, quality=90, exif=exif)
    return path


@pytest.mark.parametrize("shown,size,crop,factor", [
    ((6000, 4500), (224, 224), "none", 8),  # 750 x 563 >= 448 x 448
    ((6000, 4500), (224, 224), "center_square", 8),
    ((3000, 2000), (224, 224), "center_square", 4),  # 1/8 gives a 250-pixel side, under 448
    ((1000, 800), (224, 224), "none", 1),  # 1/2 gives 400 rows, under 448: decoded in full
    ((1024, 2048), (256, 128), "none", 4),  # re-id (H 256, W 128): 256 x 512 is exactly twice
    ((2048, 1024), (256, 128), "none", 2),  # landscape for a portrait input: the rows decide (1024 / 2 = 512)
])
def test_the_decode_scale_keeps_at_least_twice_the_output_size(shown, size, crop, factor) -> None:
    p = Preprocessor(size=size, crop=crop, mean=MEAN, std=STD)
    assert p.decode_scale(*shown) == factor
    assert Preprocessor(size=size, crop=crop, shrink="area").decode_scale(*shown) == 1


def test_a_large_jpeg_decodes_reduced_by_its_displayed_size(tmp_path) -> None:
    """An EXIF-rotated JPEG is judged by the size it is shown at. For a 100 x 30 (H x W) input, 1600 x 400 stored
    pixels shown upright (400 wide, 1600 tall) decode at 1/4 (1/8 would leave 50 columns, under 60); the same pixels
    shown as stored (1600 wide, 400 tall) at 1/2 (200 rows)."""
    from vistrain.data.images import load_rgb

    p = Preprocessor(size=(100, 30), mean=MEAN, std=STD)
    upright = jpeg(tmp_path / "up.jpg", 400, 1600, orientation=6)
    img = p.decode(upright)
    assert img.size == (100, 400) and img.info["reduced"] == 4
    flat = jpeg(tmp_path / "flat.jpg", 400, 1600)
    assert p.decode(flat).size == (800, 200) and p.decode(flat).info["reduced"] == 2
    # Sizes that do not divide: Pillow picks exactly the factor asked (a request of W // s, not ceil(W / s))
    odd = jpeg(tmp_path / "odd.jpg", 803, 1201)
    assert load_rgb(odd, scale_for=lambda w, h: 4).size == (301, 201)
    png = tmp_path / "big.png"
    from PIL import Image

    Image.fromarray(photo_like(1600, 1600, np.random.default_rng(1))).save(png)
    assert "reduced" not in p.decode(png).info  # other formats decode in full, then INTER_AREA


def test_a_version_1_description_keeps_the_full_decode_and_its_interpolation(tmp_path) -> None:
    """preprocess.json of a run trained before the shrink rule (version 1, no resize.shrink) rebuilds a preprocessor
    that decodes a large JPEG in full and resizes it with INTER_LINEAR, as that run was trained."""
    from vistrain.data.images import load_rgb

    v1 = Preprocessor(size=(32, 32), crop="center_square", mean=MEAN, std=STD, version=1, shrink="interpolation")
    d = v1.to_dict()
    assert d["version"] == 1 and "shrink" not in d["resize"] and "reduce" not in d["decode"]
    old = Preprocessor.from_dict(d)
    assert old.shrink == "interpolation" and old.version == 1
    photo = jpeg(tmp_path / "p.jpg", 1500, 2000)
    full = np.asarray(load_rgb(photo))
    assert np.array_equal(old.load(photo), seed_reference_pixels(full, 32))
    new = Preprocessor(size=(32, 32), crop="center_square", mean=MEAN, std=STD)
    assert not np.array_equal(new.load(photo), old.load(photo))
    with pytest.raises(ValueError, match="version 1 has no shrink rule"):
        Preprocessor(size=(32, 32), version=1, shrink="reduced_area")


def seed_reference_pixels(image: np.ndarray, target: int) -> np.ndarray:
    side = min(image.shape[:2])
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    return cv2.resize(np.ascontiguousarray(image[top:top + side, left:left + side]), (target, target),
                      interpolation=cv2.INTER_LINEAR)


def test_a_run_config_from_before_the_shrink_key_resumes_as_it_was_trained(tmp_path) -> None:
    import yaml

    from vistrain.config import load_config
    from vistrain.config.loader import config_to_dict

    saved = config_to_dict(validate({}))
    del saved["preprocess"]["resize"]["shrink"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    assert load_config(path, run_file=True).preprocess.resize.shrink == "interpolation"
    assert load_config(path).preprocess.resize.shrink == "reduced_area"  # a user's file: today's default
