"""Near duplicates on real scans and on the pills generator (issue 18, items 1, 2 and 4): planted exact copies and
near copies (JPEG re-encoded, cropped by up to 5% of each side, brightness +-5%) are found, the untouched images
are left alone, test images copied from training are found as leakage, and a run that trained one fold is
audited with its scope stated.

The data: scikit-learn's digits (1,797 real 8x8 scans) in the demo's CSV layout (``write_digits``: 32 px PNGs,
a train part and a labelled test part), and ``write_pills`` (studio renders and "real" photos). The copies get
their own IDs (and groups), so every planted pair must be found by its pixels alone."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from tests.conftest import describe, only_run_dir, run_cli, tiny_config, write_yaml
from tests.test_audit import audit_in_process

KINDS = ("exact", "jpeg", "crop", "bright")
PER_KIND = 15  # planted copies of each kind within the training data (60 in all)
TEST_LEAKS = 8  # training images copied into the test part (2 of each kind)


def near_copy(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A copy as it happens: re-encoded as JPEG (quality 70-90), cropped by 2-5% of each side (kept at its new
    size), or 5% brighter / darker; ``exact``: the same pixels."""
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(70, 91)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "crop":
        w, h = img.size
        f = rng.uniform(0.02, 0.05)
        dx, dy = max(1, int(w * f)), max(1, int(h * f))
        x0, y0 = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
        return img.crop((x0, y0, w - (dx - x0), h - (dy - y0)))
    if kind == "bright":
        return ImageEnhance.Brightness(img).enhance(float(rng.choice([0.95, 1.05])))
    return img.copy()


def plant(sources: list[Path], folder: Path, prefix: str, rng: np.random.Generator) -> list[tuple[Path, Path, str]]:
    """A copy of each source (kinds in turn) saved as PNG under ``folder``: (source, copy, kind)."""
    out = []
    for j, src in enumerate(sources):
        kind = KINDS[j % len(KINDS)]
        dst = folder / f"{prefix}{j:03d}.png"
        near_copy(Image.open(src).convert("RGB"), kind, rng).save(dst)
        out.append((src, dst, kind))
    return out


def found_and_false(out: Path, planted: list[tuple[Path, Path, str]]) -> tuple[dict[str, list[int]], int, int]:
    """Per kind [found, planted]; the pairs of untouched images put in one group (false pairs); the images."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    dups = pd.read_csv(out / "duplicates.csv", dtype=str, keep_default_na=False)
    paths = pd.Index(pd.unique(pd.concat([dups["path_a"], dups["path_b"]])))
    a, b = paths.get_indexer(dups["path_a"]), paths.get_indexer(dups["path_b"])
    # the groups the rows link (whether they list groups or pairs)
    label = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(len(paths),) * 2), directed=False)[1]
    group = dict(zip(paths, label))
    per_kind = {k: [0, 0] for k in KINDS}
    for src, dst, kind in planted:
        g = group.get(str(src)), group.get(str(dst))
        per_kind[kind][0] += g[0] is not None and g[0] == g[1]
        per_kind[kind][1] += 1
    copies = {str(dst) for _, dst, _ in planted}
    untouched = pd.Series([g for p, g in group.items() if p not in copies]).value_counts()
    return per_kind, int((untouched * (untouched - 1) // 2).sum()), json.loads(
        (out / "audit.json").read_text())["num_images"]


def assert_found(out: Path, planted: list[tuple[Path, Path, str]]) -> None:
    per_kind, false, n = found_and_false(out, planted)
    found, total = sum(f for f, _ in per_kind.values()), sum(t for _, t in per_kind.values())
    assert found >= 0.95 * total, (per_kind, false)
    assert false <= max(1, n // 1000), (per_kind, false, n)


# ------------------------------------------------------------------------------------------ digits (demo layout)
@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The digits demo layout with copies planted in train/ (new IDs in train.csv) and train images copied into
    test/ (listed in test_labels.csv); audited with --config, then trained for one epoch on fold 0 only (as the
    demo does) and audited as a run."""
    from vistrain.data.demo import write_digits

    root = tmp_path_factory.mktemp("digits")
    paths = write_digits(root / "data")
    rng = np.random.default_rng(18)
    train = pd.read_csv(paths["train_csv"], dtype=str)
    picks = rng.choice(len(train), PER_KIND * len(KINDS) + TEST_LEAKS, replace=False)
    src = [paths["image_dir_train"] / f"{i}.png" for i in train["ID"].iloc[picks]]
    inside = plant(src[: PER_KIND * len(KINDS)], paths["image_dir_train"], "copy_", rng)
    leaks = plant(src[PER_KIND * len(KINDS):], paths["image_dir_test"], "leak_", rng)
    label = dict(zip(train["ID"], train["target"]))
    pd.concat([train, pd.DataFrame({"ID": [d.stem for _, d, _ in inside],
                                    "target": [label[s.stem] for s, _, _ in inside]})]).to_csv(
        paths["train_csv"], index=False)
    test = pd.read_csv(paths["test_csv"], dtype=str)
    pd.concat([test, pd.DataFrame({"ID": [d.stem for _, d, _ in leaks], "target": [label[s.stem] for s, _, _ in leaks]})
               ]).to_csv(paths["test_csv"], index=False)
    cfg = tiny_config(root / "data", data={**{k: str(v) for k, v in paths.items()}, "folds": 5, "valid_fold": 0},
                      train={"epochs": 1, "batch_size": 64}, augment={"policy": "light", "hflip": 0.0})
    config = write_yaml(root / "config.yaml", cfg)
    code, stdout = audit_in_process("--config", str(config), "--output", str(root / "config_audit"))
    assert code == 0, stdout
    return {"root": root, "config": config, "inside": inside, "leaks": leaks, "train_rows": len(train) + len(inside),
            "test_rows": len(test) + len(leaks), "stdout": stdout}


@pytest.fixture(scope="module")
def digits_run(digits: dict) -> dict:
    root = digits["root"]
    result = run_cli("train", "--config", str(digits["config"]), f"output.exp_dir={root / 'exp'}", cwd=root)
    assert result.returncode == 0, describe(result)
    run = only_run_dir(root / "exp")
    code, stdout = audit_in_process(str(run))
    assert code == 0, stdout  # one trained fold (data.valid_fold=0) is enough
    return {"run": run, "out": run / "audit", "stdout": stdout}


def test_digits_config_audit_finds_planted_copies_and_no_untouched_pairs(digits: dict) -> None:
    assert_found(digits["root"] / "config_audit", digits["inside"] + digits["leaks"])


def test_digits_run_audit_finds_planted_copies_and_no_untouched_pairs(digits_run: dict, digits: dict) -> None:
    assert_found(digits_run["out"], digits["inside"] + digits["leaks"])
    rule = json.loads((digits_run["out"] / "audit.json").read_text())["duplicates"]["rule"]
    assert rule["embeddings_vote"] is True  # a run's trained model has its say


def test_test_images_copied_from_training_are_leakage(digits: dict) -> None:
    out = digits["root"] / "config_audit"
    dups = pd.read_csv(out / "duplicates.csv", dtype=str, keep_default_na=False)
    leak = dups[dups["relation"] == "cross_split"]
    pairs = {frozenset(p) for p in zip(leak["path_a"], leak["path_b"])}
    found = [(s, d) for s, d, _ in digits["leaks"] if frozenset((str(s), str(d))) in pairs]
    assert len(found) == TEST_LEAKS, (len(found), leak.head())
    assert set(leak.loc[leak["path_b"].isin([str(d) for _, d, _ in digits["leaks"]]), "split_b"]) == {"test"}
    summary = json.loads((out / "audit.json").read_text())
    assert summary["num_images"] == digits["train_rows"] + digits["test_rows"]
    assert summary["images_per_split"]["test"] == digits["test_rows"]
    assert sum(summary["images_per_split"].values()) == summary["num_images"]
    assert summary["duplicates"]["cross_split"] >= TEST_LEAKS
    assert any(k.endswith("-test") for k in summary["duplicates"]["split_pairs"]), summary["duplicates"]


def test_a_ratio_split_test_part_is_checked_for_leakage(digits: dict, tmp_path: Path) -> None:
    """The data's own split column (data.split: ratio): copies of training images in its test part are leakage."""
    root = digits["root"] / "data"
    train = pd.read_csv(root / "train.csv", dtype=str).iloc[:300]
    train = train[~train["ID"].str.startswith("copy_")].reset_index(drop=True)
    train["split"] = np.where(np.arange(len(train)) % 5 == 0, "val", np.where(np.arange(len(train)) % 5 == 1, "test",
                                                                              "train"))
    sources = [root / "train" / f"{i}.png" for i in train.loc[train["split"] == "train", "ID"].iloc[:8]]
    leaks = plant(sources, tmp_path, "ratio_leak_", np.random.default_rng(5))
    label = dict(zip(train["ID"], train["target"]))
    rows = pd.concat([train, pd.DataFrame({"ID": [str(d) for _, d, _ in leaks],
                                           "target": [label[s.stem] for s, _, _ in leaks], "split": "test"})])
    rows["ID"] = [i if i.endswith(".png") else str(root / "train" / f"{i}.png") for i in rows["ID"]]
    rows.to_csv(tmp_path / "ratio.csv", index=False)
    cfg = tiny_config(root, data={"train_csv": str(tmp_path / "ratio.csv"), "image_dir_train": "/",
                                  "split": "ratio"})
    config = write_yaml(tmp_path / "c.yaml", cfg)
    code, stdout = audit_in_process("--config", str(config), "--output", str(tmp_path / "audit"))
    assert code == 0, stdout
    dups = pd.read_csv(tmp_path / "audit" / "duplicates.csv", dtype=str, keep_default_na=False)
    leak = dups[(dups["relation"] == "cross_split")]
    pairs = {frozenset(p) for p in zip(leak["path_a"], leak["path_b"])}
    assert sum(frozenset((str(s), str(d))) in pairs for s, d, _ in leaks) == len(leaks), leak
    assert set(zip(leak["split_a"], leak["split_b"])) == {("train", "test")}
    summary = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert summary["images_per_split"]["test"] == int((rows["split"] == "test").sum())


def test_a_one_fold_run_is_audited_with_its_scope_stated(digits_run: dict, digits: dict) -> None:
    out = digits_run["out"]
    summary = json.loads((out / "audit.json").read_text())
    splits = pd.read_csv(digits_run["run"] / "splits.csv")
    fold0 = int((splits["fold"] == 0).sum())
    assert summary["label_issues"]["checked"] == fold0 < len(splits)
    scope = summary["label_issues"]["scope"]
    assert f"{fold0} of {len(splits)} training images" in scope and "fold(s) 0" in scope, scope
    assert scope in (out / "audit.html").read_text()
    issues = pd.read_csv(out / "label_issues.csv", dtype=str, keep_default_na=False)
    assert set(issues["split"]) <= {"fold0"}


# ------------------------------------------------------------------------------------------ pills
@pytest.fixture(scope="module")
def pills(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """write_pills' 1,220 images as a manifest (group: the pill), copies of 60 of them as new pills."""
    from vistrain.data.synthetic_pills import write_pills

    root = tmp_path_factory.mktemp("pills")
    write_pills(root / "pills")
    files = sorted(p for p in (root / "pills").rglob("*") if p.suffix in (".png", ".jpg"))
    rows = pd.DataFrame({"path": [str(p) for p in files], "label": [p.parent.name for p in files],
                         "group": [f"{p.parent.parent.name}/{p.parent.name}/{p.stem.split('_')[0]}" for p in files]})
    rng = np.random.default_rng(3)
    picks = rng.choice(len(files), PER_KIND * len(KINDS), replace=False)
    (root / "copies").mkdir()
    planted = plant([files[i] for i in picks], root / "copies", "copy_", rng)
    label = dict(zip(rows["path"], rows["label"]))
    copies = pd.DataFrame({"path": [str(d) for _, d, _ in planted], "label": [label[str(s)] for s, _, _ in planted],
                           "group": [d.stem for _, d, _ in planted]})
    pd.concat([rows, copies]).to_csv(root / "manifest.csv", index=False)
    cfg = tiny_config(root, data={"source": "manifest", "manifest": str(root / "manifest.csv"), "folds": 3})
    for key in ("train_csv", "image_dir_train", "image_ext"):
        cfg["data"].pop(key)
    config = write_yaml(root / "config.yaml", cfg)
    code, stdout = audit_in_process("--config", str(config), "--output", str(root / "audit"))
    assert code == 0, stdout
    return {"root": root, "planted": planted, "out": root / "audit"}


def test_pills_config_audit_finds_copies_of_photos_and_no_untouched_pairs(pills: dict) -> None:
    """Every exact, brightness and crop copy (a crop of a studio render too: the crop stage), and every copy of a
    "real" photo, is found; the 1,220 untouched images make at most one pair (two studio renders of one unmarked
    round pill can be pixel-identical)."""
    photos = [p for p in pills["planted"] if "real" in p[0].parts or p[2] in ("exact", "bright", "crop")]
    per_kind, false, n = found_and_false(pills["out"], photos)
    found, total = sum(f for f, _ in per_kind.values()), sum(t for _, t in per_kind.values())
    assert found >= 0.95 * total and per_kind["exact"][0] == per_kind["exact"][1], per_kind
    assert per_kind["crop"][0] == per_kind["crop"][1], per_kind
    assert false <= max(1, n // 1000), (false, n)


@pytest.mark.xfail(strict=True, reason="the pills generator's studio views of one object are near duplicates of "
                                       "each other by their pixels: at 128 px, 6.7-30.6% of untouched renders have "
                                       "a sibling closer than the median JPEG (q70-90) copy is to its source "
                                       "(benchmarks/audit_pills_siblings.py), so no pixel rule finds 95% of the "
                                       "copies with <= 1 false pair per 1,000 images (49 of 60: the 11 JPEG "
                                       "copies of studio renders are not found); nor does their geometry: 0.7% of "
                                       "sibling pairs move no more than a copy (--motion: ECC shift <= 0.46 px, "
                                       "angle <= 0.29 deg)")
def test_pills_copies_of_studio_renders_are_found_too(pills: dict) -> None:
    per_kind, _, _ = found_and_false(pills["out"], pills["planted"])
    found, total = sum(f for f, _ in per_kind.values()), sum(t for _, t in per_kind.values())
    assert found >= 0.95 * total, per_kind


# ------------------------------------------------------------------------------------------ crops kept at size
def test_crops_kept_at_their_size_are_found_among_real_scans_of_compatible_sizes() -> None:
    """The crop stage on scikit-learn's digits (real scans, 32 px as the demo writes them): 20 crops of 1-2 px a
    side kept at their size are each paired with their source; 200 other scans resized to 30 x 31 and 31 x 30
    (sizes a crop could have, but no crop of anything here) and the 300 untouched scans give no pair."""
    from sklearn.datasets import load_digits

    from vistrain.audit import crops
    from vistrain.audit.scan import THUMB_SIDE

    scans = (load_digits().images * (255.0 / 16.0)).astype(np.uint8)
    rng = np.random.default_rng(7)
    order = rng.permutation(len(scans))[:500]

    def scan(i: int, size: tuple[int, int]) -> np.ndarray:
        return np.asarray(Image.fromarray(scans[i]).resize(size, Image.Resampling.BICUBIC).convert("RGB"))

    images = [scan(i, (32, 32)) for i in order[:300]]
    images += [scan(i, (30, 31) if k % 2 else (31, 30)) for k, i in enumerate(order[300:])]
    sources = rng.choice(300, 20, replace=False)
    for s in sources:
        left, top = int(rng.integers(0, 2)), int(rng.integers(0, 2))
        right, bottom = 32 - int(rng.integers(0, 2)) - (left == 0), 32 - int(rng.integers(0, 2)) - (top == 0)
        images.append(images[s][top:bottom, left:right].copy())
    thumbs = np.stack([np.asarray(Image.fromarray(im).resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR))
                       for im in images])
    height, width = np.array([im.shape[0] for im in images]), np.array([im.shape[1] for im in images])
    pairs, figures = crops.crop_pairs(thumbs, width, height, np.arange(len(images)), lambda i: images[i])
    found = set(zip(pairs["a"].astype(int), pairs["b"].astype(int)))
    assert found == {(500 + k, int(s)) for k, s in enumerate(sources)}, (sorted(found), figures)
    assert figures["size_pairs_skipped"] == 0 and figures["crops"] == 20


def test_window_distance_is_opencvs_normalised_correlation_at_the_best_offset() -> None:
    """The full-resolution evidence against an independent reference: OpenCV's TM_CCOEFF_NORMED (channel means
    removed, normalised) maximised over the offsets; a window cut from the image is at distance ~0."""
    import cv2

    from vistrain.audit.crops import window_distance

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 36, 3)).astype(np.uint8)
    assert window_distance(image, image[3:39, 1:35].copy()) <= 1e-6
    other = (image[:37, :33] * 0.5 + rng.integers(0, 128, (37, 33, 3))).astype(np.uint8)
    ref = 1.0 - float(cv2.matchTemplate(image.astype(np.float32), other.astype(np.float32),
                                        cv2.TM_CCOEFF_NORMED).max())
    assert window_distance(image, other) == pytest.approx(ref, abs=1e-5)
    assert window_distance(other, image) == np.inf  # a larger window does not fit
