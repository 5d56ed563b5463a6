"""Embedding runs end to end on generated data: re-id (Market-1501 names) and ArcFace retrieval (folders)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli, write_yaml
from PIL import Image
from required_extras import has_extra

from vistrain.config import load_config
from vistrain.config.bundled import bundled_config
from vistrain.data.sources import parse_reid_name


def _person(root: Path, folder: str, pid: int, cam: int, seq: int, rng: np.random.Generator) -> None:
    """A 64x32 'pedestrian': shirt and trousers colours fixed per identity, noise per image."""
    look = np.random.default_rng(1000 + pid)
    top, bottom = look.integers(0, 255, 3), look.integers(0, 255, 3)
    img = np.zeros((64, 32, 3))
    img[:30], img[30:] = top, bottom
    img += rng.normal(0, 25, img.shape)
    (root / folder).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / folder / f"{pid:04d}_c{cam}s1_{seq:06d}_00.jpg")


def write_market(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for pid in range(1, 11):  # training identities
        for j in range(4):
            _person(root, "bounding_box_train", pid, 1 + j % 3, j, rng)
    for pid in range(11, 21):  # test identities: one query on camera 1, gallery on cameras 2 and 3
        _person(root, "query", pid, 1, 0, rng)
        for j in range(2):
            _person(root, "bounding_box_test", pid, 2 + j, 10 + j, rng)
    _person(root, "bounding_box_test", 0, 2, 99, rng)  # a distractor
    _person(root, "bounding_box_test", -1, 1, 98, rng)  # junk: ignored
    return root


@pytest.mark.parametrize("name,expected", [
    ("0002_c1s1_000451_03.jpg", (2, 1)),
    ("-1_c3s2_000001_00.jpg", (-1, 3)),
    ("0000_c6s1_000002_01.jpg", (0, 6)),
    ("0001_c2_f0046182.jpg", (1, 2)),  # DukeMTMC style
    ("Thumbs.jpg", None),
    ("c1_0002.jpg", None),
])
def test_reid_name_parser(name: str, expected: tuple[int, int] | None) -> None:
    assert parse_reid_name(name) == expected


def _reid_config(tmp: Path, root: Path) -> Path:
    cfg = load_config(bundled_config("reid_market.yaml")).model_dump(mode="json")
    cfg["data"]["root"] = str(root)
    cfg["model"].update(name="resnet10t", pretrained=False)
    cfg["sampler"].update(p=4, k=4)
    cfg["train"].update(img_size=[64, 32], epochs=2, warmup_epochs=1, step_milestones=[1], num_workers=0,
                        device="cpu", log_interval=0)
    cfg["output"].update(exp_dir=str(tmp / "exp"), logs_dir=None)
    cfg["eval"]["max_rank"] = 10
    cfg["tracking"]["tensorboard"] = False
    return write_yaml(tmp / "reid.yaml", cfg)


def test_reid_run_reports_map_and_rank1(tmp_path: Path) -> None:
    root = write_market(tmp_path / "market")
    res = run_cli("train", "--config", str(_reid_config(tmp_path, root)), cwd=tmp_path)
    assert res.stdout.strip().splitlines()[-1] == "[EXIT] TRAINING SUCCESS code=0", res.stdout + res.stderr
    run = next((tmp_path / "exp").glob("*/*/summary.json")).parent
    summary = json.loads((run / "summary.json").read_text())
    assert summary["monitor"] == "mAP"
    chance = 2 / 21  # two true matches among 21 gallery items
    assert summary["mean"]["mAP"] > 3 * chance and summary["mean"]["rank1"] > 0.5
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert {"mAP", "rank1", "rank5", "rank10", "mINP", "loss_ce", "loss_triplet"} <= set(r)
        assert 0 <= r["mAP"] <= 1
    log = (run / "train.log").read_text()
    epoch_lines = [ln for ln in log.splitlines() if "[EPOCH]" in ln]
    assert epoch_lines and not any("=None" in ln for ln in epoch_lines), "no valid_loss=None on the epoch line"
    cfg_lines = "\n".join(ln for ln in log.splitlines() if "[CFG]" in ln)
    assert "[CFG] loss:" in cfg_lines and "'query_folder'" in cfg_lines and "'p': 4" in cfg_lines
    for unread in ("'mixup_alpha'", "'failure_threshold'", "'class_weights'", "'valid_fold'", "'train_ratio'"):
        assert unread not in cfg_lines, f"{unread} is not read by a re-id run: [CFG] leaves it out"
    splits = pd.read_csv(run / "splits.csv")
    assert set(splits["split"]) == {"train", "query", "gallery"}
    assert -1 not in set(splits["label"])  # junk dropped
    # evaluate works on embedding runs too
    ev = run_cli("evaluate", str(run), "--split", "val", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    metrics = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    assert metrics["mAP"] == pytest.approx(summary["folds"][0]["best"]["mAP"], abs=1e-4)
    assert metrics["num_valid_queries"] == 10 and metrics["num_skipped"] == 0
    assert metrics["overrides"] == {}
    # evaluation options on the command line, for this evaluation only
    rr = run_cli("evaluate", str(run), "eval.rerank=true", "eval.max_rank=5", cwd=tmp_path)
    assert rr.returncode == 0, rr.stdout + rr.stderr
    reranked = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    assert reranked["overrides"] == {"eval.rerank": True, "eval.max_rank": 5}
    from vistrain.engine.inference import embed_paths, load_run
    from vistrain.metrics.retrieval import reid_evaluate

    items = pd.read_csv(run / "splits.csv")
    q, g = items[items["split"] == "query"], items[items["split"] == "gallery"]
    feats = embed_paths(load_run(run), q["path"].tolist() + g["path"].tolist())
    direct = reid_evaluate(feats[: len(q)], feats[len(q):], q["label"].to_numpy(), g["label"].to_numpy(),
                           q["camera"].to_numpy(), g["camera"].to_numpy(), max_rank=5, rerank=True)
    assert reranked["mAP"] == pytest.approx(direct["mAP"], abs=1e-6)
    # 95% intervals (eval.bootstrap, issue 20 item 11) resample query identities: a loop over the same seeded draw
    # of people, each replicate the mean AP of the drawn people's valid queries
    boot = reranked["bootstrap"]
    assert boot["unit"] == "query identity" and boot["replicates"] == 1000
    assert set(reranked["intervals"]) == {"mAP", "mINP", "rank1", "rank5", "rank10"}
    per_query = reid_evaluate(feats[: len(q)], feats[len(q):], q["label"].to_numpy(), g["label"].to_numpy(),
                              q["camera"].to_numpy(), g["camera"].to_numpy(), max_rank=5, rerank=True,
                              per_query=True)
    people = np.unique(q["label"].to_numpy())
    draw = np.random.default_rng(boot["seed"]).integers(0, len(people), size=(1000, len(people)))
    reps = [np.mean(np.concatenate([per_query["ap"][(q["label"].to_numpy() == people[i])
                                                    & (per_query["first_match_rank"] > 0)] for i in row]))
            for row in draw]
    assert reranked["intervals"]["mAP"] == pytest.approx(list(np.percentile(reps, [2.5, 97.5])), abs=1e-9)
    assert reranked["intervals"]["mAP"][0] <= reranked["mAP"] <= reranked["intervals"]["mAP"][1]
    lo, hi = reranked["intervals"]["rank1"]
    assert f"{reranked['rank1']:.4f} [{lo:.4f}, {hi:.4f}]" in rr.stdout
    bad = run_cli("evaluate", str(run), "--split", "test", cwd=tmp_path)  # re-id has query vs gallery only
    assert bad.returncode == 2 and bad.stderr.startswith("error: --split test:"), bad.stderr
    # search: junk (person -1) is never a result; cosine runs show similarity and distance 1 - similarity
    query = next((root / "query").iterdir())
    se = run_cli("search", str(run), "--gallery", str(root / "bounding_box_test"), "--query", str(query),
                 "--top-k", "50", cwd=tmp_path)
    assert se.returncode == 0, se.stderr
    table = pd.read_csv(run / "search" / f"{query.stem}.csv")
    assert len(table) == 21 and not table["path"].str.contains("/-1_").any()  # 20 people + 1 distractor
    assert np.allclose(table["distance"], 1 - table["similarity"])
    zero = run_cli("search", str(run), "--gallery", str(root / "bounding_box_test"), "--query", str(query),
                   "--top-k", "0", cwd=tmp_path)
    assert zero.returncode == 2 and len(zero.stderr.strip().splitlines()) == 1 and "--top-k" in zero.stderr


def test_reid_missing_query_folder_is_a_user_error(tmp_path: Path) -> None:
    root = write_market(tmp_path / "market")
    for f in (root / "query").iterdir():
        f.unlink()
    (root / "query").rmdir()
    res = run_cli("train", "--config", str(_reid_config(tmp_path, root)), cwd=tmp_path)
    assert res.returncode == 2
    assert "query" in res.stderr and "unzipped" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_reid_queries_whose_only_matches_share_their_camera_stop_before_training(tmp_path: Path) -> None:
    root = write_market(tmp_path / "market")
    for f in (root / "bounding_box_test").iterdir():  # every gallery image moved to camera 1, the queries' camera
        pid, rest = f.name.split("_c", 1)
        f.rename(f.with_name(f"{pid}_c1{rest[1:]}"))
    res = run_cli("train", "--config", str(_reid_config(tmp_path, root)), cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.query_folder: none of the 10 queries"), lines
    assert not (tmp_path / "exp").exists()  # stopped before a run directory or an epoch


def write_products(root: Path, classes: int = 4, objects: int = 8, views: int = 2) -> Path:
    rng = np.random.default_rng(1)
    for k in range(classes):
        base = np.random.default_rng(50 + k).integers(30, 225, 3)
        for j in range(objects):
            for seq in range(views):
                img = np.tile(base, (48, 48, 1)).astype(np.float64) + rng.normal(0, 20, (48, 48, 3))
                folder = root / f"class{k}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"p{k}{j:02d}_{seq}.jpg")
    return root


def _tiny_image(path: Path, size: tuple[int, int] = (16, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 90, 90)).save(path)


def _retrieval_config(tmp: Path, root: Path, **data: object) -> dict:
    cfg = load_config(bundled_config("arcface_retrieval.yaml")).model_dump(mode="json")
    cfg["data"].update({"image_dir_train": str(root), "min_image_size": None, **data})
    cfg["output"].update(exp_dir=str(tmp / "exp"), logs_dir=None)
    return cfg


def test_arcface_retrieval_run_on_folders(tmp_path: Path) -> None:
    root = write_products(tmp_path / "products")
    write_products(tmp_path / "more", classes=5, objects=2)
    (tmp_path / "more" / "class4").rename(root / "class4")  # a class that data.class_names leaves out
    _tiny_image(root / "class0" / "tiny_0.jpg")  # with its group, dropped by data.min_image_size
    _tiny_image(root / "class0" / "tiny_1.jpg", (48, 48))
    cfg = _retrieval_config(tmp_path, root, min_image_size=40, class_names=[f"class{k}" for k in range(4)])
    cfg["model"].update(name="resnet10t", pretrained=False, embedding_dim=32, arcface_s=16.0, margin_ramp_epochs=1)
    cfg["sampler"].update(p=4, k=2)
    cfg["train"].update(img_size=32, epochs=2, freeze_backbone_epochs=1, warmup_epochs=0, num_workers=0,
                        device="cpu", log_interval=0, channels_last=False, restart_epochs=2)
    cfg["augment"]["policy"] = "none"
    cfg["output"].update(exp_dir=str(tmp_path / "exp"), logs_dir=None)
    cfg["tracking"]["tensorboard"] = False
    cfg["eval"]["flip_feats"] = True  # search / evaluate / export must all average with the mirror image
    res = run_cli("train", "--config", str(write_yaml(tmp_path / "arc.yaml", cfg)), cwd=tmp_path)
    assert res.stdout.strip().splitlines()[-1] == "[EXIT] TRAINING SUCCESS code=0", res.stdout + res.stderr
    run = next((tmp_path / "exp").glob("*/*/summary.json")).parent
    summary = json.loads((run / "summary.json").read_text())
    assert summary["monitor"] == "knn_recall@1"  # validation images against the training images of their classes
    assert summary["mean"]["knn_recall@1"] > 0.5 and summary["mean"]["knn_acc"] > 0.5  # chance: 0.25
    splits = pd.read_csv(run / "splits.csv")
    assert set(splits["label"]) == {f"class{k}" for k in range(4)} and not splits["id"].str.contains("tiny").any()
    log = (run / "train.log").read_text()
    assert "[DATA] data.class_names keeps 4 of 5 classes: 4 image(s) of 1 class(es) left out" in log
    assert "[DATA] 2 image(s) dropped: smaller than data.min_image_size=40" in log
    assert "unreadable" not in log
    sides = splits.groupby("group")["split"].nunique()
    assert (sides == 1).all()  # no object on two sides
    assert set(splits["split"]) == {"train", "val", "test"}
    # eval.rerank re-ranks the retrieval protocol too: the figures of the re-ranked distances of the same features
    rr = run_cli("evaluate", str(run), "eval.rerank=true", cwd=tmp_path)
    assert rr.returncode == 0, rr.stdout + rr.stderr
    reranked = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    from test_retrieval import reranked_reference

    from vistrain.engine.inference import embed_paths, load_run

    query, gallery = splits[splits["split"] == "val"], splits[splits["split"] == "train"]
    feats = embed_paths(load_run(run), query["path"].tolist() + gallery["path"].tolist())
    labels = pd.concat([query["label"], gallery["label"]]).astype("category").cat.codes.to_numpy()
    want = reranked_reference(feats, labels, len(query), ks=(1, 5), knn_k=5)
    assert {k: reranked[k] for k in want} == pytest.approx(want, abs=1e-9)
    tta = run_cli("evaluate", str(run), "eval.tta=[hflip]", cwd=tmp_path)  # a classifier's option
    assert tta.returncode == 2 and "eval.flip_feats" in tta.stderr, tta.stdout + tta.stderr
    # predict = kNN classification against the training images
    test_items = splits[splits["split"] == "test"]
    csv = tmp_path / "q.csv"
    pd.DataFrame({"ID": test_items["id"]}).to_csv(csv, index=False)
    pr = run_cli("predict", str(run), "--input", str(csv), "--image-dir", str(root), "--output",
                 str(tmp_path / "pred.csv"), cwd=tmp_path)
    assert pr.returncode == 0, pr.stderr
    pred = pd.read_csv(tmp_path / "pred.csv", dtype=str)
    assert (pred["target"].to_numpy() == test_items["label"].astype(str).to_numpy()).mean() > 0.5
    # search prints neighbours and writes the grid
    query = Path(test_items["path"].iloc[0])
    se = run_cli("search", str(run), "--gallery", str(root), "--query", str(query), "--top-k", "5", cwd=tmp_path)
    assert se.returncode == 0, se.stderr
    grid = run / "search" / f"{query.stem}.png"
    assert grid.is_file() and grid.with_suffix(".csv").is_file()
    table = pd.read_csv(grid.with_suffix(".csv"))
    assert len(table) == 5 and table["similarity"].is_monotonic_decreasing
    # export: an ONNX graph whose output is the unit embedding, equal to PyTorch's on the run's images
    if has_extra("onnxruntime") and has_extra("onnxscript"):
        import onnxruntime as ort

        ex = run_cli("export", str(run), "--verify", cwd=tmp_path)
        assert ex.returncode == 0, ex.stdout + ex.stderr
        (entry,) = json.loads((run / "export" / "export.json").read_text())["models"]
        assert entry["verify"]["passed"] and entry["verify"]["min_cosine"] > 0.9999
        session = ort.InferenceSession(str(run / "export" / "model_fold0.onnx"), providers=["CPUExecutionProvider"])
        (emb,) = session.run(["embedding"], {"image": np.random.default_rng(0).normal(size=(3, 3, 32, 32))
                                              .astype(np.float32)})
        assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
        # the served / exported embedding of an image is the one search and evaluate compute for it
        from vistrain.data.images import load_rgb
        from vistrain.engine.inference import embed_paths, load_run
        from vistrain.serving.app import load_predictor

        predictor = load_predictor(run / "export" / "model_fold0.onnx")
        paths = test_items["path"].tolist()[:3]
        served = predictor(np.stack([predictor.preprocess(load_rgb(p)).numpy() for p in paths]))["embedding"]
        assert np.allclose(served, embed_paths(load_run(run), paths), atol=1e-5)


def test_center_loss_centers_survive_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The centers are in the last checkpoint and a resumed run starts from them, not from zero."""
    import torch

    from vistrain.engine.hooks import Reporter
    from vistrain.engine.training import run_train
    from vistrain.models.losses import CenterTerm

    root = write_market(tmp_path / "market")
    terms = ["loss.terms=[{name: ce}, {name: triplet, margin: 0.3}, {name: center, weight: 0.0005, lr: 0.5}]"]
    cfg = load_config(_reid_config(tmp_path, root), overrides=terms)

    def stop(row: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, hooks=[Reporter(stop)])
    (last,) = (tmp_path / "exp").glob("*/*/ckpt/last_fold0.pth")
    saved = torch.load(last, map_location="cpu", weights_only=False)["task_state"]["center"]["centers"]
    assert saved.abs().sum() > 0  # one epoch of updates moved them from zero

    loaded = []
    original = CenterTerm.load_state_dict

    def spy(self, state, *args, **kwargs):
        loaded.append(state["centers"].clone())
        return original(self, state, *args, **kwargs)

    monkeypatch.setattr(CenterTerm, "load_state_dict", spy)
    run_train(cfg, resume=True)
    assert len(loaded) == 1 and torch.equal(loaded[0], saved)


def test_reid_queries_without_a_cross_camera_match_are_counted(tmp_path: Path) -> None:
    from vistrain.data.prepare import prepare_data

    root = write_market(tmp_path / "market")
    for f in (root / "bounding_box_test").glob("0011_*"):  # person 11's gallery images onto the query's camera
        pid, rest = f.name.split("_c", 1)
        f.rename(f.with_name(f"{pid}_c1{rest[1:]}"))
    data = prepare_data(load_config(_reid_config(tmp_path, root)))
    assert data.queries_without_match == 1  # the other 9 queries still count


def test_class_names_pick_the_classes_of_an_embedding_run(tmp_path: Path) -> None:
    from vistrain.data.prepare import prepare_data
    from vistrain.errors import UserError

    root = write_products(tmp_path / "products", classes=5, objects=4)
    cfg = _retrieval_config(tmp_path, root, class_names=["class3", "class0", "class1"])
    data = prepare_data(load_config(write_yaml(tmp_path / "r.yaml", cfg)))
    assert set(data.items["label"]) == {"class0", "class1", "class3"}
    assert data.classes == ["class0", "class1", "class3"] and len(data.items) == 3 * 4 * 2
    res = run_cli("split", "--config", str(tmp_path / "r.yaml"), "--output", str(tmp_path / "s.csv"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[DATA] data.class_names keeps 3 of 5 classes: 16 image(s) of 2 class(es) left out" in res.stdout
    assert set(pd.read_csv(tmp_path / "s.csv")["label"]) == {"class0", "class1", "class3"}
    cfg["data"]["class_names"] = ["class0", "shoes", "class1", "hats"]
    with pytest.raises(UserError, match=r"^data.class_names: shoes, hats not in the data"):
        prepare_data(load_config(write_yaml(tmp_path / "r2.yaml", cfg)))


def test_images_dropped_by_min_image_size_are_not_called_unreadable(tmp_path: Path) -> None:
    root = write_products(tmp_path / "products", classes=2, objects=4)
    _tiny_image(root / "class0" / "tiny_0.jpg")
    _tiny_image(root / "class0" / "tiny_1.jpg", (48, 48))
    (root / "class1" / "broken_0.jpg").write_bytes(b"not a jpeg" * 20)
    cfg = _retrieval_config(tmp_path, root, min_image_size=40)
    res = run_cli("split", "--config", str(write_yaml(tmp_path / "r.yaml", cfg)), "--output", str(tmp_path / "s.csv"),
                  cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if "[DATA]" in ln]
    assert any("[DATA] 1 unreadable or missing image(s) left out: class1/broken_0.jpg" in ln for ln in lines), lines
    assert any("[DATA] 2 image(s) dropped: smaller than data.min_image_size=40 or in a group with such an image"
               in ln for ln in lines), lines
