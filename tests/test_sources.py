"""Sources: finding image files from IDs, decoding any image to RGB, and the item table of each source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_csv_dataset, write_folders_dataset
from PIL import Image

from vistrain.config.schema import DataCfg
from vistrain.data.images import ImageIndex, load_rgb
from vistrain.data.sources import check_classes, load_items, split_bad_images
from vistrain.errors import UserError


def touch_image(path: Path, color: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


# ------------------------------------------------------------------------------------------ ImageIndex

def test_id_with_and_without_extension_resolves(tmp_path):
    f = touch_image(tmp_path / "a1.png")
    index = ImageIndex(tmp_path, ".png")
    assert index.find("a1") == f
    assert index.find("a1.png") == f
    assert index.find("missing") is None


def test_extension_is_matched_case_insensitively(tmp_path):
    f = touch_image(tmp_path / "A.PNG")
    index = ImageIndex(tmp_path, ".png")
    assert index.find("A") == f
    assert index.find("A.png") == f
    assert index.find("a.png") == f


def test_image_ext_is_tried_first_then_the_usual_extensions(tmp_path):
    jpg, png = touch_image(tmp_path / "x.jpg"), touch_image(tmp_path / "x.png")
    assert ImageIndex(tmp_path, ".png").find("x") == png
    assert ImageIndex(tmp_path, ".jpg").find("x") == jpg
    only = touch_image(tmp_path / "sub" / "y.webp")
    assert ImageIndex(only.parent, ".png").find("y") == only  # not image_ext, but a usual extension


def test_id_with_extension_never_resolves_to_a_double_extension(tmp_path):
    touch_image(tmp_path / "x.jpg.jpg")
    index = ImageIndex(tmp_path, ".jpg")
    assert index.find("x.jpg") is None
    single = touch_image(tmp_path / "x.jpg")
    assert ImageIndex(tmp_path, ".jpg").find("x.jpg") == single


def test_id_equal_to_a_file_name_with_a_custom_image_ext_resolves(tmp_path):
    """data.image_ext=.jfif and an ID that already carries it: the file named exactly like the ID."""
    f = touch_image(tmp_path / "scan.jfif")
    index = ImageIndex(tmp_path, ".jfif")
    assert index.find("scan") == f
    assert index.find("scan.jfif") == f


def test_id_with_a_dot_that_is_not_an_extension(tmp_path):
    f = touch_image(tmp_path / "scan.v2.png")
    assert ImageIndex(tmp_path, ".png").find("scan.v2") == f


def test_id_in_a_sub_folder(tmp_path):
    f = touch_image(tmp_path / "batch1" / "a.png")
    index = ImageIndex(tmp_path, ".png")
    assert index.find("batch1/a") == f
    assert index.find("batch1/a.png") == f


# --------------------------------------------------------------------------------------------- load_rgb

def assert_rgb(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    assert img.mode == "RGB"
    assert img.size == size
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.shape == (size[1], size[0], 3)
    return arr


def test_grayscale_becomes_rgb(tmp_path):
    Image.new("L", (12, 10), 100).save(tmp_path / "g.png")
    arr = assert_rgb(load_rgb(tmp_path / "g.png"), (12, 10))
    assert (arr == 100).all()


def test_rgba_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
    img.paste((0, 0, 255, 0), (0, 0, 5, 10))  # left half fully transparent
    img.save(tmp_path / "a.png")
    arr = assert_rgb(load_rgb(tmp_path / "a.png"), (10, 10))
    assert tuple(arr[5, 8]) == (255, 0, 0)
    assert tuple(arr[5, 1]) == (255, 255, 255)


def test_palette_image_becomes_rgb(tmp_path):
    img = Image.new("RGB", (10, 10), (0, 200, 0)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    img.save(tmp_path / "p.png")
    arr = assert_rgb(load_rgb(tmp_path / "p.png"), (10, 10))
    assert tuple(arr[0, 0]) == (0, 200, 0)


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (10, 10), 1)
    img.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    img.paste(0, (0, 0, 5, 10))
    img.save(tmp_path / "pt.png", transparency=0)
    arr = assert_rgb(load_rgb(tmp_path / "pt.png"), (10, 10))
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[0, 9]) == (200, 0, 0)


@pytest.mark.parametrize("ext", [".tif", ".jpg"])
def test_cmyk_becomes_rgb(tmp_path, ext):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / f"c{ext}")  # pure red
    arr = assert_rgb(load_rgb(tmp_path / f"c{ext}"), (8, 8)).astype(int)
    r, g, b = arr[4, 4]
    assert r > 200 and g < 50 and b < 50


def test_16_bit_png_is_scaled_to_8_bit_rgb(tmp_path):
    ramp = (np.arange(20 * 30).reshape(20, 30) * 6).astype(np.uint16)  # 0 .. 3594: a 12-bit sensor
    Image.fromarray(ramp).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    arr = assert_rgb(load_rgb(tmp_path / "d.png"), (30, 20)).astype(int)
    assert arr.min() == 0 and arr.max() == 255  # the real range fills 0..255, nothing clipped to white
    gray = arr[..., 0].ravel()
    assert (np.diff(gray) >= 0).all(), "the ramp must stay a ramp"
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    arr = assert_rgb(load_rgb(tmp_path / "o.jpg"), (20, 40)).astype(int)
    assert arr[3, 10, 0] > 200 and arr[3, 10, 2] < 60  # stored left (red) is now on top
    assert arr[36, 10, 2] > 200 and arr[36, 10, 0] < 60  # stored right (blue) is now at the bottom


# ----------------------------------------------------------------------------------------- csv source

def test_csv_source_item_table(tmp_path):
    ds = write_csv_dataset(tmp_path / "d", classes=("0", "1", "2"), per_class=3, size=8)
    items = load_items(DataCfg(source="csv", train_csv=ds.train_csv, image_dir_train=ds.image_dir, image_ext=".png"))
    assert list(items.columns[:4]) == ["path", "id", "label", "group"]
    assert items["id"].tolist() == ds.ids
    assert items["label"].tolist() == [int(t) for t in ds.labels]  # integer classes stay integers
    assert items["group"].tolist() == ds.ids  # no group_col: every image is its own group
    assert all(Path(p) == ds.image_dir / f"{i}.png" for p, i in zip(items["path"], items["id"]))


def test_csv_source_integer_classes_sort_numerically(tmp_path):
    ds = write_csv_dataset(tmp_path / "d", classes=("10", "2", "1"), per_class=2, size=8)
    items = load_items(DataCfg(train_csv=ds.train_csv, image_dir_train=ds.image_dir, image_ext=".png"))
    assert check_classes(items, None) == [1, 2, 10]


def test_csv_source_keeps_group_and_fold_columns(tmp_path):
    groups = [f"g{i // 2}" for i in range(6)]
    ds = write_csv_dataset(tmp_path / "d", classes=("a", "b"), per_class=3, size=8,
                           extra_columns={"patient": groups, "fold": [0, 1, 0, 1, 0, 1]})
    items = load_items(DataCfg(train_csv=ds.train_csv, image_dir_train=ds.image_dir, image_ext=".png",
                               group_col="patient"))
    assert items["group"].tolist() == groups
    assert items["fold"].astype(int).tolist() == [0, 1, 0, 1, 0, 1]


def test_csv_source_id_with_extension_in_the_csv(tmp_path):
    ds = write_csv_dataset(tmp_path / "d", classes=("a", "b"), per_class=2, size=8)
    csv = tmp_path / "with_ext.csv"
    csv.write_text("ID,target\n" + "".join(f"{i}.PNG,{t}\n" for i, t in zip(ds.ids, ds.labels)))
    items = load_items(DataCfg(train_csv=csv, image_dir_train=ds.image_dir, image_ext=".jpg"))
    assert (items["path"] != "").all()
    assert [Path(p).name for p in items["path"]] == [f"{i}.png" for i in ds.ids]


def test_missing_target_column_names_the_key_and_the_columns(tmp_path):
    ds = write_csv_dataset(tmp_path / "d", classes=("a", "b"), per_class=2, size=8)
    csv = tmp_path / "bad.csv"
    csv.write_text("ID,label\n" + "".join(f"{i},{t}\n" for i, t in zip(ds.ids, ds.labels)))
    with pytest.raises(UserError) as excinfo:
        load_items(DataCfg(train_csv=csv, image_dir_train=ds.image_dir, image_ext=".png"))
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert "data.target_col" in msg and "'target'" in msg
    assert "ID, label" in msg


def test_missing_csv_and_image_folder_name_their_keys(tmp_path):
    ds = write_csv_dataset(tmp_path / "d", classes=("a", "b"), per_class=2, size=8)
    with pytest.raises(UserError, match="data.train_csv"):
        load_items(DataCfg(train_csv=tmp_path / "nope.csv", image_dir_train=ds.image_dir))
    with pytest.raises(UserError, match="data.image_dir_train"):
        load_items(DataCfg(train_csv=ds.train_csv, image_dir_train=tmp_path / "nope"))


def test_missing_image_is_kept_with_an_empty_path_then_listed(tmp_path):
    ds = write_csv_dataset(tmp_path / "d", classes=("a", "b"), per_class=3, size=8)
    (ds.image_dir / f"{ds.ids[1]}.png").unlink()
    items = load_items(DataCfg(train_csv=ds.train_csv, image_dir_train=ds.image_dir, image_ext=".png"))
    good, bad = split_bad_images(items, "skip")
    assert bad["id"].tolist() == [ds.ids[1]]
    assert "not found" in bad["reason"].iloc[0]
    assert ds.ids[1] not in good["id"].tolist() and len(good) == 5


# ------------------------------------------------------------------------------------- folders source

def test_folders_source_labels_from_folders_and_groups_from_id_seq(tmp_path):
    root = write_folders_dataset(tmp_path / "f", classes=("cat", "dog"), objects=2, views=3, size=8)
    touch_image(root / "cat" / "plain.png")
    touch_image(root / "cat" / "a_b_12.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    touch_image(root / ".hidden" / "x_0.png")
    items = load_items(DataCfg(source="folders", image_dir_train=root))
    by_name = {Path(p).relative_to(root).as_posix(): row for p, row in zip(items["path"], items.to_dict("records"))}
    assert set(items["label"]) == {"cat", "dog"}
    assert len(items) == 2 * 2 * 3 + 2
    assert not any(".hidden" in p or p.endswith(".txt") for p in by_name)
    assert {by_name[f"cat/obj0_{s}.png"]["group"] for s in range(3)} == {"cat/obj0"}
    assert by_name["cat/obj1_0.png"]["group"] == "cat/obj1"
    assert by_name["dog/obj0_0.png"]["group"] == "dog/obj0"  # same name in another class: another group
    assert by_name["cat/plain.png"]["group"] == "cat/plain"
    assert by_name["cat/a_b_12.png"]["group"] == "cat/a_b"
    assert all(row["label"] == name.split("/")[0] for name, row in by_name.items())


def test_imagenet_style_names_in_a_folders_source_are_not_one_group_per_class(tmp_path):
    """timm's ImageFolder layout names files <synset>_<n> in the folder <synset> (n01440764/n01440764_10026.JPEG):
    the prefix is the class, not an object, and one group per class would put every image of a class in one fold.
    Such a file is its own group; a prefix that differs from the folder still groups an object's views."""
    for cls in ("n01440764", "n01443537"):
        for k in range(4):
            touch_image(tmp_path / "imagenet" / cls / f"{cls}_{1000 + k}.JPEG")
    touch_image(tmp_path / "imagenet" / "n01440764" / "tench7_0.JPEG")
    touch_image(tmp_path / "imagenet" / "n01440764" / "tench7_1.JPEG")
    items = load_items(DataCfg(source="folders", image_dir_train=tmp_path / "imagenet", image_ext=".JPEG"))
    groups = dict(zip(items["id"], items["group"]))
    assert groups["n01440764/n01440764_1000.JPEG"] == "n01440764/n01440764_1000"
    assert len({groups[f"n01443537/n01443537_{1000 + k}.JPEG"] for k in range(4)}) == 4
    assert groups["n01440764/tench7_0.JPEG"] == groups["n01440764/tench7_1.JPEG"] == "n01440764/tench7"


def test_folders_source_without_class_folders_is_a_user_error(tmp_path):
    touch_image(tmp_path / "flat" / "a.png")
    with pytest.raises(UserError, match="data.image_dir_train"):
        load_items(DataCfg(source="folders", image_dir_train=tmp_path / "flat"))


# ------------------------------------------------------------------------------------------ class names

def test_class_names_fix_the_order():
    import pandas as pd

    items = pd.DataFrame({"label": ["cat", "dog", "cat", "fox"]})
    assert check_classes(items, None) == ["cat", "dog", "fox"]
    assert check_classes(items, ["fox", "cat", "dog"]) == ["fox", "cat", "dog"]
    ints = pd.DataFrame({"label": [0, 1, 2, 1]})
    assert check_classes(ints, ["2", "0", "1"]) == [2, 0, 1]


def test_class_names_mismatch_lists_missing_and_extra_names():
    import pandas as pd

    items = pd.DataFrame({"label": ["cat", "dog", "fox"]})
    with pytest.raises(UserError) as excinfo:
        check_classes(items, ["cat", "dog", "bird", "eel"])
    msg = str(excinfo.value)
    assert msg.startswith("data.class_names")
    assert "bird" in msg and "eel" in msg and "fox" in msg
    assert msg.index("bird") < msg.index("fox")  # missing ones, then extra ones, each labelled
    assert "not in the data" in msg and "not listed" in msg


# ------------------------------------------------------------------------------------------- bad images

def test_corrupt_image_is_listed_and_skipped(tmp_path):
    ds = write_csv_dataset(tmp_path / "d", classes=("a", "b"), per_class=3, size=8)
    broken = ds.image_dir / f"{ds.ids[2]}.png"
    broken.write_bytes(b"this is not a png at all" * 10)
    truncated = ds.image_dir / f"{ds.ids[4]}.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    items = load_items(DataCfg(train_csv=ds.train_csv, image_dir_train=ds.image_dir, image_ext=".png"))
    good, bad = split_bad_images(items, "skip")
    assert sorted(Path(p).name for p in bad["path"]) == sorted([broken.name, truncated.name])
    assert bad["reason"].str.len().gt(0).all()
    assert len(good) == 4
    assert not set(good["path"]) & {str(broken), str(truncated)}
    assert good.index.tolist() == list(range(4))


def test_corrupt_image_with_on_bad_image_error_names_the_file(tmp_path):
    ds = write_csv_dataset(tmp_path / "d", classes=("a", "b"), per_class=3, size=8)
    broken = ds.image_dir / f"{ds.ids[3]}.png"
    broken.write_bytes(b"\x00garbage" * 50)
    items = load_items(DataCfg(train_csv=ds.train_csv, image_dir_train=ds.image_dir, image_ext=".png",
                               on_bad_image="error"))
    with pytest.raises(UserError) as excinfo:
        split_bad_images(items, "error")
    msg = str(excinfo.value)
    assert "data.on_bad_image" in msg
    assert str(broken) in msg
    assert "\n" not in msg


# ------------------------------------------------------------------------------------- min_image_size

def test_min_image_size_drops_small_groups_and_leaves_unreadable_files_to_the_bad_image_check(tmp_path):
    import pandas as pd

    from vistrain.data.sources import drop_small_groups

    small = touch_image(tmp_path / "small.png", size=(8, 30))
    mate = touch_image(tmp_path / "mate.png", size=(40, 40))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image" * 10)
    big = touch_image(tmp_path / "big.png", size=(40, 32))
    items = pd.DataFrame({"path": [str(small), str(mate), str(corrupt), "", str(big)],
                          "id": ["small", "mate", "corrupt", "missing", "big"], "label": "a",
                          "group": ["g1", "g1", "g2", "g3", "g4"]})
    kept, dropped = drop_small_groups(items, 16)
    assert dropped["id"].tolist() == ["small", "mate"]  # the small image and the rest of its group
    assert dropped["reason"].str.contains("smaller than data.min_image_size=16").all()
    assert kept["id"].tolist() == ["corrupt", "missing", "big"]  # reported by split_bad_images, not as small
    good, bad = split_bad_images(kept, "skip")
    assert bad["id"].tolist() == ["corrupt", "missing"] and good["id"].tolist() == ["big"]
