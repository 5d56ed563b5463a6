"""data.source: manifest (a CSV / JSON-lines list of images) and ``vistrain manifest`` (the dataset's manifest.json)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import PALETTE, Started, describe, write_yaml
from PIL import Image

from vistrain.config.loader import load_config
from vistrain.data.sources import load_items
from vistrain.errors import UserError

CLASSES = ("k1", "k2", "k3")


def write_manifest_data(root: Path, per_class: int = 6) -> pd.DataFrame:
    """root/images/<domain>/<class>_<i>.png and the rows of a manifest (paths relative to root)."""
    rows = []
    for k, label in enumerate(CLASSES):
        for i in range(per_class):
            domain = "real" if i % 3 == 0 else "studio"
            path = root / "images" / domain / f"{label}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 12), PALETTE[k]).save(path)
            split = "test" if i == per_class - 1 else "val" if i == per_class - 2 else "train"
            obj = i // 2 if split == "train" else i  # two training views per object; val and test objects apart
            rows.append({"path": f"images/{domain}/{label}_{i}.png", "label": label, "domain": domain,
                         "group": f"{label}-obj{obj}", "split": split})
    return pd.DataFrame(rows)


def manifest_config(root: Path, manifest: Path, **data: object) -> Path:
    """A config in root/cfg/ naming the manifest relative to itself."""
    cfg = {"data": {"source": "manifest", "manifest": os.path.relpath(manifest, root / "cfg"), "folds": 2, **data},
           "model": {"name": "resnet10t"}, "train": {"img_size": 32, "batch_size": 4, "num_workers": 0},
           "preprocess": {"crop": "center_square", "clahe": {"enabled": True}},
           "augment": {"policy": "light", "rotate": 30}}
    return write_yaml(root / "cfg" / "config.yaml", cfg)


@pytest.fixture
def rows(tmp_path: Path) -> pd.DataFrame:
    return write_manifest_data(tmp_path / "data")


# ------------------------------------------------------------------------------------------ the source

@pytest.mark.parametrize("kind", ["csv", "jsonl", "json"])
def test_manifest_rows_become_items_with_paths_relative_to_the_manifest(tmp_path, rows, kind):
    path = tmp_path / "data" / f"list.{kind}"
    if kind == "csv":
        rows.to_csv(path, index=False)
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n\n" for r in rows.to_dict("records")))  # blank lines allowed
    else:
        path.write_text(json.dumps(rows.to_dict("records")))
    cfg = load_config(manifest_config(tmp_path, path))
    items = load_items(cfg.data)
    assert items["path"].tolist() == [str(tmp_path / "data" / p) for p in rows["path"]]
    assert items["id"].tolist() == rows["path"].tolist()
    for col in ("label", "domain", "group", "split"):
        assert items[col].tolist() == rows[col].tolist()


def test_manifest_without_optional_columns_makes_each_image_its_own_group(tmp_path, rows):
    path = tmp_path / "data" / "list.jsonl"
    path.write_text("".join(json.dumps({"path": p, "label": k}) + "\n" for p, k in zip(rows["path"], range(18))))
    items = load_items(load_config(manifest_config(tmp_path, path)).data)
    assert items["group"].tolist() == rows["path"].tolist()
    assert "domain" not in items.columns and items["label"].tolist() == list(range(18))  # integer labels stay ints


@pytest.mark.parametrize(("row", "col", "value", "needle"), [
    (3, "path", "images/studio/gone.png", "line 5: file not found: "),
    (2, "split", "holdout", "line 4: split 'holdout' is not one of train, val, test"),
    (1, "path", "images/real/k1_0.png", "line 3: 'images/real/k1_0.png' is listed twice (line 2 too)"),
])
def test_a_bad_manifest_row_is_an_error_naming_its_line(tmp_path, rows, row, col, value, needle):
    rows.loc[row, col] = value
    path = tmp_path / "data" / "list.csv"
    rows.to_csv(path, index=False)
    with pytest.raises(UserError) as err:
        load_items(load_config(manifest_config(tmp_path, path)).data)
    assert str(err.value).startswith(f"data.manifest: {path} ") and needle in str(err.value), err.value


def test_a_manifest_label_not_in_the_class_map_names_the_row(tmp_path, rows):
    class_map = tmp_path / "class_map.json"
    class_map.write_text(json.dumps({"class_to_idx": {"k1": 0, "k2": 1}}))
    path = tmp_path / "data" / "list.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows.to_dict("records")))
    with pytest.raises(UserError) as err:
        load_items(load_config(manifest_config(tmp_path, path, class_map=str(class_map))).data)
    assert str(err.value) == f"data.manifest: {path} line 13: label 'k3' is not in data.class_map {class_map}"


def test_jsonl_rows_need_a_path_and_a_label(tmp_path, rows):
    path = tmp_path / "data" / "list.jsonl"
    path.write_text(json.dumps({"path": rows.loc[0, "path"], "label": "k1"}) + "\n" + json.dumps({"path": "x"}) + "\n")
    with pytest.raises(UserError, match=r"line 2: no label; every row needs path and label"):
        load_items(load_config(manifest_config(tmp_path, path)).data)


# -------------------------------------------------------------------------------------- vistrain manifest

@pytest.fixture(scope="module")
def commands(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("manifest_cli")
    rows = write_manifest_data(root / "data")
    rows.to_csv(root / "data" / "list.csv", index=False)
    good = manifest_config(root, root / "data" / "list.csv", split="ratio")
    bad_rows = rows.copy()
    bad_rows.loc[4, "path"] = "images/studio/missing.png"
    bad_rows.to_csv(root / "data" / "bad.csv", index=False)
    bad = write_yaml(root / "bad" / "config.yaml", {**_raw(good), "data": {
        "source": "manifest", "manifest": str(root / "data" / "bad.csv")}})
    started = {"good": Started("manifest", "--config", str(good), "--output", "out/manifest.json", cwd=root / "work"),
               "default": Started("manifest", "--config", str(good), cwd=root / "work2"),
               "bad": Started("manifest", "--config", str(bad), cwd=root / "work3")}
    out: dict[str, object] = {k: s.wait() for k, s in started.items()}
    out.update(root=root, rows=rows, config=good)
    return out


def _raw(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_manifest_command_writes_the_datasets_manifest(commands):
    r: subprocess.CompletedProcess = commands["good"]  # type: ignore[assignment]
    assert r.returncode == 0, describe(r)
    out = commands["root"] / "work" / "out" / "manifest.json"
    assert "[DONE] manifest written to out/manifest.json" in r.stdout
    m = json.loads(out.read_text())
    rows: pd.DataFrame = commands["rows"]  # type: ignore[assignment]
    assert m["version"] == 1 and m["num_classes"] == 3 and m["classes"] == list(CLASSES)
    assert m["total_images"] == len(rows) and len(m["dataset_hash"]) == 64
    # distributions against a plain count of the manifest file
    for kind, col in (("splits", "split"), ("domains", "domain")):
        table = pd.crosstab(rows[col], rows["label"])
        assert sorted(m[kind]) == sorted(table.index)
        for name in table.index:
            assert m[kind][name]["class_distribution"] == {c: int(table.loc[name, c]) for c in CLASSES}
            assert m[kind][name]["num_images"] == int(table.loc[name].sum())
    assert m["class_distribution"] == rows["label"].value_counts().to_dict()
    assert m["split"] == {"type": "ratio"}
    from vistrain.data.preprocess import Preprocessor

    cfg = load_config(commands["config"])
    assert m["preprocessing"] == Preprocessor.from_config(cfg).to_dict()
    assert m["preprocessing"]["crop"] == "center_square" and m["preprocessing"]["clahe"]["enabled"] is True
    assert m["augmentation"]["train"]["rotate"] == 30 and m["augmentation"]["val"] is None
    assert (commands["root"] / "work2" / "manifest.json").is_file()  # --output defaults to ./manifest.json


def test_manifest_command_with_a_missing_file_exits_2_naming_the_row(commands):
    r: subprocess.CompletedProcess = commands["bad"]  # type: ignore[assignment]
    assert r.returncode == 2, describe(r)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.manifest: ") and "line 6: file not found" in lines[0]


def test_dataset_hash_changes_with_any_file_or_label(tmp_path, rows):
    from vistrain.data.manifest import dataset_hash

    rows.to_csv(tmp_path / "data" / "list.csv", index=False)
    items = load_items(load_config(manifest_config(tmp_path, tmp_path / "data" / "list.csv")).data)
    before = dataset_hash(items)
    assert dataset_hash(items.sample(frac=1, random_state=0)) == before  # row order does not matter
    relabelled = items.copy()
    relabelled.loc[0, "label"] = "k2"
    assert dataset_hash(relabelled) != before
    assert dataset_hash(items.iloc[1:]) != before
    first = Path(items.loc[0, "path"])
    st = first.stat()
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert dataset_hash(items) != before
    noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(first)
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns))  # rewritten, then its old time restored: the size differs
    assert first.stat().st_size != st.st_size and dataset_hash(items) != before
