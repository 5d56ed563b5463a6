"""``vistrain audit``: planted label errors, duplicates across folds, groups sharing an image and blank images
are found through the real command (a tiny 2-fold run for the out-of-fold probabilities, and --config)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import describe, only_run_dir, run_cli, tiny_config, write_yaml

CLASSES = ("red", "green", "blue", "yellow")
COLOURS = {"red": (225, 35, 35), "green": (35, 190, 60), "blue": (45, 65, 230), "yellow": (235, 215, 30)}
PER_CLASS = 250  # ~1000 images: 31 flipped labels, so the 80% bar is not decided by one or two of them
SIZE = 64


def shapes_image(colour: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    """A grey gradient background with 3-5 random discs / boxes of the class colour: every image different,
    the class obvious from the colour."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    angle = rng.uniform(0, 2 * np.pi)
    g = (np.cos(angle) * xx + np.sin(angle) * yy)
    lo, hi = rng.uniform(40, 120), rng.uniform(140, 230)
    arr = np.repeat((lo + (hi - lo) * (g - g.min()) / (np.ptp(g) + 1e-9))[..., None], 3, axis=2)
    for _ in range(rng.integers(3, 6)):
        cx, cy, r = rng.uniform(6, SIZE - 6), rng.uniform(6, SIZE - 6), rng.uniform(7, 16)
        mask = (xx * SIZE - cx) ** 2 + (yy * SIZE - cy) ** 2 < r ** 2 if rng.random() < 0.5 else \
            (np.abs(xx * SIZE - cx) < r) & (np.abs(yy * SIZE - cy) < r * rng.uniform(0.4, 1))
        arr[mask] = np.array(colour) * rng.uniform(0.85, 1.0)
    arr += rng.normal(0, 6, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def near_copy(img: Image.Image, how: int) -> Image.Image:
    """Resized, re-encoded (JPEG) or slightly cropped."""
    if how == 0:
        return img.resize((80, 80), Image.BILINEAR)
    if how == 1:
        from io import BytesIO

        buf = BytesIO()
        img.save(buf, format="JPEG", quality=80)
        return Image.open(BytesIO(buf.getvalue())).convert("RGB")
    return img.crop((2, 2, SIZE - 2, SIZE - 2)).resize((SIZE, SIZE), Image.BILINEAR)


def build_dataset(root: Path, seed: int = 3) -> dict:
    """train.csv (ID, target, group, fold) + train/*.png with the planted problems; returns what was planted."""
    rng = np.random.default_rng(seed)
    images = root / "train"
    images.mkdir(parents=True)
    rows = []
    for name in CLASSES:
        for i in range(PER_CLASS):
            image_id = f"{name}_{i:03d}"
            shapes_image(COLOURS[name], rng).save(images / f"{image_id}.png")
            rows.append({"ID": image_id, "target": name, "group": image_id, "fold": i % 2})
    df = pd.DataFrame(rows)
    fold0 = df.index[df["fold"] == 0].to_numpy()
    picks = rng.permutation(fold0)
    exact, near, shared = picks[:10], picks[10:20], picks[20:22]
    planted_pairs, extra = [], []
    for j, i in enumerate(exact):
        copy = f"dup_exact_{j}"
        shutil.copyfile(images / f"{df.at[i, 'ID']}.png", images / f"{copy}.png")
        extra.append({"ID": copy, "target": df.at[i, "target"], "group": copy, "fold": 1})
        planted_pairs.append((df.at[i, "ID"], copy))
    for j, i in enumerate(near):
        copy = f"dup_near_{j}"
        near_copy(Image.open(images / f"{df.at[i, 'ID']}.png").convert("RGB"), j % 3).save(images / f"{copy}.png")
        extra.append({"ID": copy, "target": df.at[i, "target"], "group": copy, "fold": 1})
        planted_pairs.append((df.at[i, "ID"], copy))
    groups = []
    for j, i in enumerate(shared):  # group g{j}a holds the original, g{j}b a copy: two IDs, one image
        df.at[i, "group"] = f"g{j}a"
        copy = f"shared_{j}"
        shutil.copyfile(images / f"{df.at[i, 'ID']}.png", images / f"{copy}.png")
        extra.append({"ID": copy, "target": df.at[i, "target"], "group": f"g{j}b", "fold": 0})
        groups.append(sorted([f"g{j}a", f"g{j}b"]))
    blanks = []
    for j in range(5):
        name = f"blank_{j}"
        Image.new("RGB", (SIZE, SIZE), (30 + 45 * j,) * 3).save(images / f"{name}.png")
        extra.append({"ID": name, "target": CLASSES[j % 4], "group": name, "fold": j % 2})
        blanks.append(name)
    planted_ids = {df.at[i, "ID"] for i in picks[:22]}
    candidates = [i for i in df.index if df.at[i, "ID"] not in planted_ids]
    flipped = rng.choice(candidates, size=math.ceil(0.03 * (len(df) + len(extra))), replace=False)
    for i in flipped:
        others = [c for c in CLASSES if c != df.at[i, "target"]]
        df.at[i, "target"] = others[rng.integers(len(others))]
    df = pd.concat([df, pd.DataFrame(extra)], ignore_index=True)
    df.to_csv(root / "train.csv", index=False)
    return {"pairs": planted_pairs, "groups": groups, "blanks": blanks, "flipped": set(df.loc[flipped, "ID"]),
            "n": len(df)}


def colour_model_oof(run: Path) -> None:
    """Replace the run's out-of-fold logits with those of a 2-fold logistic regression on the fraction of pixels
    near each class colour (same folds and class order as the run). A CPU test cannot afford the epochs a CNN
    needs to be confident on every class, and what is checked here is the audit given out-of-fold probabilities
    of a good model, not the training."""
    from sklearn.linear_model import LogisticRegression

    splits = pd.read_csv(run / "splits.csv", dtype={"label": str})
    classes = [json.loads((run / "class_map.json").read_text())["idx_to_class"][str(i)] for i in range(len(CLASSES))]
    colours = np.array([COLOURS[c] for c in classes], dtype=np.float32)
    feats = np.stack([
        (np.linalg.norm(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).reshape(-1, 1, 3) - colours,
                        axis=2) < 70).mean(axis=0) for p in splits["path"]])
    logits = np.zeros((len(splits), len(classes)), dtype=np.float32)
    for fold in (0, 1):
        held = (splits["fold"] == fold).to_numpy()
        model = LogisticRegression(C=10, max_iter=2000).fit(feats[~held], splits["label"][~held])
        assert list(model.classes_) == classes
        logits[held] = np.log(np.clip(model.predict_proba(feats[held]), 1e-9, 1))
    np.save(run / "oof" / "oof_logits.npy", logits)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("audit")
    truth = build_dataset(root / "data")
    cfg = tiny_config(root / "data", data={"group_col": "group", "folds": 2, "valid_fold": "all"},
                      train={"epochs": 1, "batch_size": 64})
    config = write_yaml(root / "config.yaml", cfg)
    result = run_cli("train", "--config", str(config), "output.exp_dir=" + str(root / "exp"), cwd=root)
    assert result.returncode == 0, describe(result)
    run = only_run_dir(root / "exp")
    colour_model_oof(run)
    code, stdout = audit_in_process(str(run), "--write-clean", str(root / "clean.csv"))
    assert code == 0, stdout
    return {**truth, "root": root, "run": run, "config": config, "out": run / "audit", "stdout": stdout}


def audit_in_process(*args: str) -> tuple[int, str]:
    """``vistrain audit ARGS`` through the CLI's ``main`` in this process (the command path without another
    interpreter's start-up: torch and timm are imported once for the whole module): (exit code, stdout)."""
    import contextlib
    import io

    from vistrain.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["audit", *args])
    return code, out.getvalue()


def _cross_split_found(out: Path, truth: dict) -> tuple[int, int]:
    """(planted pairs found across folds, reported cross-fold pairs that were not planted)."""
    dups = pd.read_csv(out / "duplicates.csv", dtype=str, keep_default_na=False)
    cross = dups[dups["relation"] == "cross_split"]
    found = {frozenset((a, b)) for a, b in zip(cross["id_a"], cross["id_b"])}
    planted = {frozenset(p) for p in truth["pairs"]}
    return len(found & planted), len(found - planted)


def test_audit_finds_flipped_labels_in_its_top_five_percent(planted: dict) -> None:
    issues = pd.read_csv(planted["out"] / "label_issues.csv", dtype=str, keep_default_na=False)
    assert list(issues.columns[:5]) == ["path", "id", "given_label", "suggested_label", "score"]
    top = set(issues["id"].head(math.ceil(0.05 * planted["n"])))
    hit = len(top & planted["flipped"])
    assert hit >= 0.8 * len(planted["flipped"]), (hit, len(planted["flipped"]), issues.head(25))
    scores = issues["score"].astype(float).to_numpy()
    assert (np.diff(scores) <= 1e-9).all(), "most suspicious first"


def test_audit_finds_cross_split_duplicates_groups_and_blanks(planted: dict) -> None:
    out = planted["out"]
    found, false = _cross_split_found(out, planted)
    assert found >= 0.95 * len(planted["pairs"]) and false <= 5, (found, false)
    summary = json.loads((out / "audit.json").read_text())
    for pair in planted["groups"]:
        assert pair in summary["duplicates"]["groups_sharing_images"], summary["duplicates"]
    outliers = pd.read_csv(out / "outliers.csv", dtype=str, keep_default_na=False)
    assert list(outliers.columns[:4]) == ["path", "id", "reason", "score"]
    blank = set(outliers.loc[outliers["reason"] == "near_constant", "id"])
    assert set(planted["blanks"]) <= blank
    assert summary["duplicates"]["cross_split"] >= found
    assert f"leakage: {summary['duplicates']['cross_split']} duplicate pair(s) across splits" in planted["stdout"]


def test_audit_html_is_self_contained_and_linked_from_the_report(planted: dict) -> None:
    import re

    page = (planted["out"] / "audit.html").read_text()
    assert "Content-Security-Policy" in page
    assert not re.search(r'(src|href)="(?!data:)', page), "nothing fetched from outside the file"
    assert page.count('src="data:image/jpeg;base64,') >= 20  # thumbnails of the top findings
    assert "dup_exact_0" in page or "dup_exact_0.png" in page
    report = (planted["run"] / "report.html").read_text()
    assert 'href="audit/audit.html"' in report


def test_write_clean_drops_the_flagged_rows_and_trains_as_a_manifest(planted: dict) -> None:
    clean = pd.read_csv(planted["root"] / "clean.csv", dtype=str, keep_default_na=False)
    summary = json.loads((planted["out"] / "audit.json").read_text())
    c = summary["clean"]
    assert c["policy"] == "drop" and c["rows_in"] == planted["n"] and c["rows_out"] == len(clean)
    assert c["rows_changed"] == c["dropped"] == planted["n"] - len(clean) > 0
    kept = {Path(p).stem for p in clean["path"]}
    assert not kept & set(planted["blanks"])
    assert all(not (a in kept and b in kept) for a, b in planted["pairs"]), "one copy of each duplicate goes"
    assert len(planted["flipped"] - kept) >= 0.8 * len(planted["flipped"])
    assert list(clean.columns) == ["path", "label", "group"]
    from vistrain.config.schema import DataCfg
    from vistrain.data.sources import manifest_source

    items = manifest_source(DataCfg(source="manifest", manifest=planted["root"] / "clean.csv"))  # what train reads
    assert len(items) == len(clean) and set(items["group"]) == set(clean["group"])


def test_audit_with_config_before_training_finds_duplicates_and_blanks(planted: dict) -> None:
    out = planted["root"] / "config_audit"
    code, stdout = audit_in_process("--config", str(planted["config"]), "--output", str(out),
                                    "data.min_images_per_class=1000")  # train would stop: the audit reports it
    assert code == 0 and f"[DONE] audit written to {out}" in stdout, stdout
    found, false = _cross_split_found(out, planted)
    assert found >= 0.95 * len(planted["pairs"]) and false <= 5, (found, false)
    outliers = pd.read_csv(out / "outliers.csv", dtype=str, keep_default_na=False)
    assert set(planted["blanks"]) <= set(outliers.loc[outliers["reason"] == "near_constant", "id"])
    assert pd.read_csv(out / "label_issues.csv").empty  # nothing trained: no held-out probabilities
    summary = json.loads((out / "audit.json").read_text())
    assert "random init" in summary["sources"]["embeddings"]
    health = summary["class_health"]
    assert health["under_min_images_per_class"] == {c: n for c, n in health["per_class"].items() if n < 1000} != {}


@pytest.mark.parametrize("args, expected", [
    (["--policy", "keep"], "--policy: unknown policy 'keep'; valid: drop, relabel, review"),
    (["audit.near_dup_threshold=1.5"], "audit.near_dup_threshold"),
    (["audit.hash_threshold=-0.1"], "audit.hash_threshold"),
])
def test_audit_bad_input_is_one_line_and_exit_2(planted: dict, args: list[str], expected: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from vistrain.cli import main

    extra = ["--write-clean", str(planted["root"] / "x.csv")] if "--policy" in args else []
    assert main(["audit", str(planted["run"]), *extra, *args]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err, err


def test_audit_of_a_run_without_out_of_fold_predictions_says_how_to_make_them(
        planted: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vistrain.cli import main

    run = tmp_path / "run"
    shutil.copytree(planted["run"], run, ignore=shutil.ignore_patterns("oof_logits.npy", "audit", "tensorboard"))
    assert main(["audit", str(run)]) == 2
    err = capsys.readouterr().err
    assert "no out-of-fold predictions" in err and "data.valid_fold=all" in err, err
    assert not (run / "audit").exists()


# ------------------------------------------------------------------------------------------ unit checks (no images)
def _items(n: int, splits: list[str], labels: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"path": [f"/d/{i}.png" for i in range(n)], "id": [str(i) for i in range(n)],
                         "label": labels, "group": [str(i) for i in range(n)], "split_name": splits})


def test_duplicate_table_ranks_conflicts_then_leakage() -> None:
    from vistrain.audit.duplicates import duplicate_table

    items = _items(6, ["train", "train", "train", "val", "train", "train"], ["a", "a", "a", "a", "a", "b"])
    pairs = pd.DataFrame({"a": [0, 2, 4], "b": [1, 3, 5], "kind": ["exact", "near", "near"],
                          "similarity": [1.0, 0.97, 0.96], "hash_distance": [0, 4, 6]})
    table = duplicate_table(items, pairs, groups_meaningful=False)
    assert table["id_a"].tolist() == ["4", "2", "0"]  # conflict (labels a / b), then train-val leakage, then the rest
    assert table["relation"].tolist() == ["within_split", "cross_split", "within_split"]
    assert table["conflict"].tolist() == [True, False, False]


@pytest.mark.parametrize("policy, rows_out, labels", [
    ("drop", 2, ["a", "a"]),  # the label issue, the blank and one copy of the duplicate go
    ("relabel", 3, ["a", "b", "a"]),  # the label issue takes the suggested class
    ("review", 5, ["a", "a", "a", "a", "a"]),  # every row stays, flagged
])
def test_write_clean_policies(tmp_path: Path, policy: str, rows_out: int, labels: list[str]) -> None:
    from vistrain.audit.clean import write_clean

    items = _items(5, ["train", "train", "train", "train", "val"], ["a"] * 5)
    issues = pd.DataFrame({"path": ["/d/1.png"], "suggested_label": ["b"]})
    dups = pd.DataFrame({"path_a": ["/d/3.png"], "path_b": ["/d/4.png"], "split_a": ["train"], "split_b": ["val"],
                         "conflict": [False]})
    outliers = pd.DataFrame({"path": ["/d/2.png"], "reason": ["near_constant"]})
    out = write_clean(tmp_path / "m.csv", items, policy, issues, dups, outliers, keep_split=False, keep_group=False)
    table = pd.read_csv(tmp_path / "m.csv", dtype=str, keep_default_na=False)
    assert len(table) == out["rows_out"] == rows_out and table["label"].tolist() == labels
    assert "/d/4.png" not in table["path"].tolist() or policy == "review"  # leakage: the val copy goes
    if policy == "review":
        assert table["audit_flags"].tolist() == ["", "label_issue", "outlier:near_constant", "duplicate", "duplicate"]
        assert out["rows_changed"] == 4
    else:
        assert out["rows_changed"] == 5 - rows_out + (policy == "relabel")


@pytest.mark.slow
def test_audit_of_a_ratio_split_run_checks_its_val_and_test_labels(tmp_path: Path) -> None:
    """A ratio split has no out-of-fold logits: its validation logits and test predictions are the held-out
    probabilities; the clean manifest keeps the split."""
    from tests.conftest import write_csv_dataset

    ds = write_csv_dataset(tmp_path / "data", per_class=10)
    cfg = tiny_config(ds.root, data={"split": "ratio", "train_ratio": 0.6, "val_ratio": 0.2, "test_ratio": 0.2},
                      train={"epochs": 1})
    config = write_yaml(tmp_path / "c.yaml", cfg)
    assert run_cli("train", "--config", str(config), f"output.exp_dir={tmp_path / 'exp'}",
                   cwd=tmp_path).returncode == 0
    run = only_run_dir(tmp_path / "exp")
    result = run_cli("audit", str(run), "--write-clean", str(tmp_path / "clean.csv"), "--policy", "review",
                     cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    summary = json.loads((run / "audit" / "audit.json").read_text())
    splits = pd.read_csv(run / "splits.csv")
    held_out = int(splits["split"].isin(["val", "test"]).sum())
    assert summary["label_issues"]["checked"] == held_out
    assert summary["label_issues"]["source"] == "ratio split: validation logits and test predictions"
    clean = pd.read_csv(tmp_path / "clean.csv", dtype=str, keep_default_na=False)
    assert len(clean) == len(splits) and clean["split"].tolist() == splits["split"].tolist()
    assert summary["clean"]["policy"] == "review"


@pytest.mark.slow
def test_audit_of_an_embedding_run_uses_its_embeddings_and_skips_label_issues(tmp_path: Path) -> None:
    from tests.conftest import write_folders_dataset

    root = write_folders_dataset(tmp_path / "f", classes=("cat", "dog", "cow"), objects=6, views=3)
    shutil.copyfile(root / "cat" / "obj0_0.png", root / "dog" / "obj5_9.png")  # one image under two identities
    cfg = tiny_config(tmp_path, data={"source": "folders", "image_dir_train": str(root)},
                      train={"epochs": 1, "monitor": "recall@1"}, sampler={"name": "pk", "p": 2, "k": 2})
    for key in ("train_csv", "folds", "valid_fold"):
        cfg["data"].pop(key)
    config = write_yaml(tmp_path / "c.yaml", {"task": "embedding", **cfg})
    train = run_cli("train", "--config", str(config), f"output.exp_dir={tmp_path / 'exp'}", cwd=tmp_path)
    assert train.returncode == 0, describe(train)
    run = only_run_dir(tmp_path / "exp")
    code, stdout = audit_in_process(str(run))
    assert code == 0, stdout
    summary = json.loads((run / "audit" / "audit.json").read_text())
    assert summary["label_issues"]["count"] == 0
    assert summary["sources"]["note"] == "no label issues: an embedding run has no class probabilities"
    assert ["cat/obj0", "dog/obj5"] in summary["duplicates"]["groups_sharing_images"]


def test_near_pairs_need_hash_and_embedding_to_agree() -> None:
    from vistrain.audit.duplicates import near_pairs

    far = np.random.default_rng(0).integers(0, 2**62, size=3)  # three hashes ~31 bits apart
    hashes = np.array([far[0], far[0] ^ 0b11, far[1], far[1] ^ (2**10 - 1), far[2], far[2] ^ (2**10 - 1)],
                      dtype=np.int64)  # pairs (0,1) 2 bits apart, (2,3) and (4,5) 10 bits apart
    unit = np.eye(6, dtype=np.float32)
    feats = np.stack([unit[0], -unit[0], unit[1], unit[1] * 0.99 + unit[2] * 0.1, unit[3], unit[3] + unit[4]])
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    everyone = np.ones(6, dtype=bool)
    with_emb = near_pairs(hashes, everyone, 6, feats, 0.95)
    # (0,1): hashes agree but the model says opposite (a colour-blind hash match); (2,3): the model confirms a
    # pair the hash alone misses; (4,5): neither close enough
    assert list(zip(with_emb["a"], with_emb["b"])) == [(2, 3)]
    hash_only = near_pairs(hashes, everyone, 6, None, 0.95)
    assert list(zip(hash_only["a"], hash_only["b"])) == [(0, 1)]
