"""The demo's two-domain pill data set (``vistrain demo --scenario pills``): layout, determinism, class map, and
that the real photos differ from the studio renders the way the issue asks (clutter, not square, fewer)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vistrain.config.schema import DataCfg
from vistrain.data.sources import folders_source
from vistrain.data.synthetic_pills import PILL_TYPES, real_layout, write_pills

SMALL = {"classes": 4, "studio_objects": 3, "studio_views": 2, "real_objects": 2, "real_views": 1}


@pytest.fixture(scope="module")
def pills(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pills")
    write_pills(root, seed=0, **SMALL)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _codes(n: int) -> list[str]:
    return [p.code for p in PILL_TYPES[:n]]


def test_the_same_seed_writes_byte_identical_files_and_another_seed_does_not(pills: Path, tmp_path: Path) -> None:
    write_pills(tmp_path / "again", seed=0, **SMALL)
    write_pills(tmp_path / "other", seed=1, **SMALL)
    first, again, other = _files(pills), _files(tmp_path / "again"), _files(tmp_path / "other")
    assert first == again
    images = [name for name in first if not name.endswith(".json")]
    assert images and all(first[name] != other[name] for name in images)


def test_an_image_does_not_depend_on_how_many_others_are_written(pills: Path, tmp_path: Path) -> None:
    # Each image has its own seeded generator: a larger set holds the small set's files unchanged.
    write_pills(tmp_path / "more", seed=0, **{**SMALL, "classes": 5, "studio_objects": 4})
    more = _files(tmp_path / "more")
    assert all(more[name] == data for name, data in _files(pills).items() if not name.endswith(".json"))


def test_layout_every_class_in_both_domains_with_object_and_view_names(pills: Path) -> None:
    codes = _codes(SMALL["classes"])
    for domain, ext, prefix, objects, views in (("studio", ".png", "s", 3, 2), ("real", ".jpg", "r", 2, 1)):
        assert sorted(p.name for p in (pills / domain).iterdir()) == codes
        for code in codes:
            names = sorted(p.name for p in (pills / domain / code).iterdir())
            assert names == [f"{prefix}{o:03d}_{v}{ext}" for o in range(objects) for v in range(views)]


def test_the_folders_source_reads_each_domain_with_the_object_as_group(pills: Path) -> None:
    for domain, groups_per_class in (("studio", 3), ("real", 2)):
        items = folders_source(DataCfg(source="folders", image_dir_train=pills / domain))
        assert sorted(items["label"].unique()) == _codes(SMALL["classes"])
        assert items["group"].nunique() == groups_per_class * SMALL["classes"]


def test_the_default_set_has_several_times_fewer_real_photos_than_studio_renders() -> None:
    from inspect import signature

    p = signature(write_pills).parameters
    studio = p["studio_objects"].default * p["studio_views"].default
    real = p["real_objects"].default * p["real_views"].default
    assert studio >= 2.5 * real
    assert studio + real >= 50, "seed 003 needs at least 50 images per class (data.min_images_per_class)"


def test_studio_renders_are_square_and_clean_real_photos_are_not(pills: Path) -> None:
    studio = [np.asarray(Image.open(p).convert("RGB"), np.float64) for p in sorted(pills.glob("studio/*/*.png"))]
    real = [np.asarray(Image.open(p).convert("RGB"), np.float64) for p in sorted(pills.glob("real/*/*.jpg"))]
    assert all(a.shape[0] == a.shape[1] for a in studio)
    assert all(a.shape[0] != a.shape[1] for a in real), "real photos are not square: the centre crop matters"
    assert {a.shape[0] > a.shape[1] for a in real} == {True, False}, "portrait and landscape photos"

    def border(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a[:6].reshape(-1, 3), a[-6:].reshape(-1, 3), a[:, :6].reshape(-1, 3),
                               a[:, -6:].reshape(-1, 3)])

    # Studio: a plain light background with even light; real: clutter and uneven light around the pill.
    assert all(border(a).mean() > 200 and border(a).std() < 6 for a in studio)
    assert np.median([border(a).std() for a in real]) > 15
    assert abs(np.mean([border(a).mean() for a in real]) - np.mean([border(a).mean() for a in studio])) > 40


def test_the_pill_sits_in_the_centre_square_of_every_frame(pills: Path) -> None:
    """The whole pill must survive ``preprocess.crop: center_square``, or the label would be wrong."""
    for path in sorted(pills.glob("studio/*/*.png")):
        a = np.asarray(Image.open(path).convert("L"), np.float64)
        ys, xs = np.nonzero(np.abs(a - np.median(a[:4])) > 25)
        h, w = a.shape
        assert abs(ys.mean() - h / 2) < 0.1 * h and abs(xs.mean() - w / 2) < 0.1 * w, path
    for i in range(300):
        pill = PILL_TYPES[i % len(PILL_TYPES)]
        lay = real_layout(np.random.default_rng(i), pill)
        side = min(lay.width, lay.height)
        x0, y0 = (lay.width - side) / 2, (lay.height - side) / 2
        r = lay.length_px * 1.03 / 2  # the bounding circle of the largest object of this type
        assert x0 <= lay.cx - r and lay.cx + r <= x0 + side and y0 <= lay.cy - r and lay.cy + r <= y0 + side
    shifts = [abs(real_layout(np.random.default_rng(i), PILL_TYPES[1]).cx - 80) for i in range(50)]
    assert max(shifts) > 5, "real photos are off-centre"


def test_class_map_has_the_seed_format(pills: Path) -> None:
    cm = json.loads((pills / "class_map.json").read_text())
    codes = _codes(SMALL["classes"])
    assert cm["num_classes"] == len(codes)
    assert cm["class_to_idx"] == {c: i for i, c in enumerate(codes)}  # the order of the class folders
    assert cm["idx_to_class"] == {str(i): c for i, c in enumerate(codes)}
    assert isinstance(cm["version"], str)
    assert sorted(cm["metadata"]) == codes
    for code, meta in cm["metadata"].items():
        assert meta["index"] == cm["class_to_idx"][code]
        assert isinstance(meta["display_name"], str) and meta["display_name"]
        assert meta["training_weight"] > 0
    assert len({m["display_name"] for m in cm["metadata"].values()}) == len(codes)


def test_pill_types_differ_by_shape_or_colour() -> None:
    looks = {(p.shape, p.colours, p.mark) for p in PILL_TYPES}
    assert len(looks) == len(PILL_TYPES) >= 8
    assert {p.shape for p in PILL_TYPES} == {"round", "oval", "capsule", "oblong"}
    assert any(len(p.colours) == 2 for p in PILL_TYPES), "two-tone capsules"


def test_asking_for_more_classes_than_pill_types_is_a_user_error(tmp_path: Path) -> None:
    from vistrain.errors import UserError

    with pytest.raises(UserError, match="classes"):
        write_pills(tmp_path, classes=len(PILL_TYPES) + 1)
