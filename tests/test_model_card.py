"""RUN/MODEL_CARD.md: a Hugging Face style model card in every run, read as a user reads it (PyYAML for the front
matter, the ``markdown`` library for the body, pandas for per_class.csv), its numbers held to the run's JSON and CSV
files."""

from __future__ import annotations

import html
import json
import logging
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import tiny_config, write_csv_dataset, write_yaml

import vistrain

markdown = pytest.importorskip("markdown")  # the dev extra: the card is read as a Markdown library renders it
CLASSES = tuple(str(k) for k in range(7))  # class 6 looks like class 0 (conftest's palette cycles): real confusions
DESCRIPTION = "Sorts striped test cards by colour; for the model-card tests only"
TOL = 5e-5 + 1e-12  # the card shows 4 decimals


# ------------------------------------------------------------------------------------------ reading a card
def split_card(text: str) -> tuple[dict, str]:
    """(front matter as PyYAML reads it, the Markdown body)."""
    assert text.startswith("---\n"), text[:80]
    head, sep, body = text[4:].partition("\n---\n")
    assert sep, "the front matter is not closed by a --- line"
    return yaml.safe_load(head), body


class Tables(HTMLParser):
    """Every <table> of rendered HTML as a list of rows (cell texts), keyed by the heading (h1-h4) above it."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[tuple[str, list[list[str]]]] = []
        self.heading, self._in_heading, self._cell, self._row = "", False, None, None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("h1", "h2", "h3", "h4"):
            self._in_heading, self.heading = True, ""
        elif tag == "table":
            self.tables.append((self.heading, []))
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h1", "h2", "h3", "h4"):
            self._in_heading = False
        elif tag in ("td", "th") and self._row is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1][1].append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._in_heading:
            self.heading += data
        if self._cell is not None:
            self._cell += data


def render(body: str) -> tuple[str, Tables]:
    html = markdown.markdown(body, extensions=["tables", "fenced_code"])  # GitHub / the hub render both
    parser = Tables()
    parser.feed(html)
    return html, parser


def table_under(tables: Tables, heading: str, index: int = 0) -> list[dict[str, str]]:
    """The ``index``-th table under a heading containing ``heading``, as dicts keyed by its header row."""
    found = [rows for title, rows in tables.tables if heading in title]
    assert len(found) > index, f"no table {index} under {heading!r}; headings: {[t for t, _ in tables.tables]}"
    return [dict(zip(found[index][0], r)) for r in found[index][1:]]


def by_metric(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {r["metric"]: r for r in rows}


def number(cell: str) -> float:
    return float(cell.replace("−", "-"))


def section(body: str, title: str) -> str:
    """The Markdown of the ``## title`` section (up to the next ``## ``)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", body, re.S | re.M)
    assert match, f"no section '## {title}'"
    return match.group(1)


# ------------------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 7-class, 2-fold run (both folds: OOF logits), its card as train left it, then ``evaluate --split val``."""
    root = tmp_path_factory.mktemp("card")
    data = write_csv_dataset(root / "data", classes=CLASSES, per_class=6, size=32)
    cfg = write_yaml(root / "cfg.yaml", tiny_config(data.root, project={"name": "cards", "seed": 7,
                                                                        "description": DESCRIPTION},
                                                    output={"exp_dir": str(root / "exp"), "logs_dir": None},
                                                    tracking={"tensorboard": False}))
    run = vistrain.train(cfg, overrides={"data.valid_fold": "all"}, progress=False)
    after_train = (run.path / "MODEL_CARD.md").read_text(encoding="utf-8")
    run.evaluate("val")
    return {"root": root, "run": run, "after_train": after_train}


def copy_run(run: vistrain.Run, dest: Path, *, without: tuple[str, ...] = ()) -> Path:
    """The run's files (no checkpoints, nor the parts named) in ``dest``: a card reads only JSON, CSV and YAML."""
    return Path(shutil.copytree(run.path, dest, ignore=shutil.ignore_patterns("ckpt", *without)))


def test_train_writes_a_card_that_says_the_run_succeeded(trained: dict) -> None:
    front, body = split_card(trained["after_train"])
    assert front["library_name"] == "timm"
    status = re.search(r"status:\**\s*`?(\w+)", body)
    assert status and status.group(1) == "success", body[:600]
    assert "running" not in body.split("\n## ")[0]


def test_card_after_evaluate_renders_and_its_numbers_are_the_runs(trained: dict) -> None:
    run = trained["run"]
    front, body = split_card((run.path / "MODEL_CARD.md").read_text(encoding="utf-8"))
    summary = json.loads((run.path / "summary.json").read_text())
    metrics = json.loads((run.path / "eval" / "val" / "metrics.json").read_text())
    # the front matter: Hugging Face's fields, read by PyYAML
    assert front["library_name"] == "timm"
    assert {"image-classification", "vistrain", "resnet10t"} <= set(front["tags"])
    assert "license" not in front  # unknown: never invented
    assert {"accuracy", "f1"} <= set(front["metrics"])
    results = front["model-index"][0]["results"]
    reported = {(r["dataset"].get("split"), m["name"]): m["value"] for r in results for m in r["metrics"]}
    assert reported[("val", "macro_f1")] == pytest.approx(metrics["macro_f1"], abs=1e-12)
    assert reported[("val", "top1")] == pytest.approx(metrics["top1"], abs=1e-12)
    # the body renders with the markdown library, every table as a table
    html, tables = render(body)
    assert len(tables.tables) == len(re.findall(r"^\|(?: ?:?-{3,}:? ?\|)+$", body, re.M)) >= 6
    assert "<h2>" in html and "{" not in re.sub(r"<(pre|code)>.*?</\1>", "", html, flags=re.S)  # no JSON dumped
    # validation during training: mean, std and each fold's best value, as summary.json has them
    rows = by_metric(table_under(tables, "Validation during training"))
    for name in ("macro_f1", "accuracy", "valid_loss"):
        assert number(rows[name]["mean"]) == pytest.approx(summary["mean"][name], abs=TOL), name
        assert number(rows[name]["std"]) == pytest.approx(summary["std"][name], abs=TOL), name
        for fold in summary["folds"]:
            cell = next(v for k, v in rows[name].items() if k.startswith(f"fold {fold['fold']}"))
            assert number(cell) == pytest.approx(fold["best"][name], abs=TOL), (name, fold["fold"])
    oof = by_metric(table_under(tables, "Out of fold"))
    assert number(oof["macro_f1"]["value"]) == pytest.approx(summary["oof"]["macro_f1"], abs=TOL)
    # the held-out evaluation: every figure with its 95% bootstrap interval, as metrics.json has them
    rows = by_metric(table_under(tables, "eval/val"))
    for name in ("top1", "top5", "macro_f1", "weighted_f1", "balanced_accuracy", "nll", "ece"):
        assert number(rows[name]["value"]) == pytest.approx(metrics[name], abs=TOL), name
        lo, hi = metrics["intervals"][name]
        assert number(rows[name]["95% low"]) == pytest.approx(lo, abs=TOL), name
        assert number(rows[name]["95% high"]) == pytest.approx(hi, abs=TOL), name
    assert f"{metrics['n']} images" in section(body, "Results")
    # what the model is for, from project.description
    assert DESCRIPTION in section(body, "What the model is for")
    # data: class map and counts from manifest.json
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["dataset_hash"] in section(body, "Data")
    classes = {r["class"]: r for r in table_under(tables, "Classes")}
    assert {c: int(r["images"]) for c, r in classes.items()} == manifest["class_distribution"]
    splits = {r["split"]: int(r["images"]) for r in table_under(tables, "Images per split")}
    assert splits == {k: v["num_images"] for k, v in manifest["splits"].items()}
    # the recipe and the preprocessing, in words
    recipe = {r["setting"]: r["value"] for r in table_under(tables, "Training")}
    assert recipe["seed"] == "7" and "resnet10t" in recipe["architecture"] and "adamw" in recipe["optimiser"]
    assert "32x32" in section(body, "Preprocessing")


def test_worst_classes_are_the_lowest_f1_of_per_class_csv(trained: dict) -> None:
    run = trained["run"]
    _, body = split_card((run.path / "MODEL_CARD.md").read_text(encoding="utf-8"))
    per_class = pd.read_csv(run.path / "eval" / "val" / "per_class.csv", dtype={"class": str})
    assert len(per_class) == 7
    want = per_class.nsmallest(5, "f1")
    rows = table_under(render(body)[1], "Weakest classes (val)")
    assert [r["class"] for r in rows] == want["class"].tolist()
    assert [number(r["F1"]) for r in rows] == pytest.approx(want["f1"].tolist(), abs=TOL)
    failing = per_class[(per_class["f1"] < 0.7) & (per_class["support"] > 0)]
    limits = section(body, "Known limits")
    assert "eval.failure_threshold" in limits and "0.7" in limits
    for name in failing["class"]:
        assert re.search(rf"`{name}` \(F1 ", limits), (name, limits)


def test_calibrate_adds_the_temperature_and_ece(trained: dict) -> None:
    run = trained["run"]
    before = (run.path / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "vistrain calibrate RUN" in section(split_card(before)[1], "Calibration")
    cal = run.calibrate()
    _, body = split_card((run.path / "MODEL_CARD.md").read_text(encoding="utf-8"))
    rows = {r["quantity"]: r["value"] for r in table_under(render(body)[1], "Calibration")}
    assert number(rows["temperature"]) == pytest.approx(cal["temperature"], abs=TOL)
    assert number(rows["ECE, T = 1"]) == pytest.approx(cal["ece_before"], abs=TOL)
    assert number(rows["ECE after (cross-fitted)"]) == pytest.approx(cal["ece_after"], abs=TOL)
    assert rows["kept"] == ("yes" if cal["applied"] else "no: reverted to T = 1")


def test_card_without_a_description_or_an_evaluation_says_so(trained: dict, tmp_path: Path) -> None:
    from vistrain.viz.model_card import write_model_card

    run = copy_run(trained["run"], tmp_path / "old", without=("eval", "calibration.json", "MODEL_CARD.md"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["project"].pop("description")  # a run of a vistrain before the key
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "manifest.json").unlink()
    path = write_model_card(run)
    assert path == run / "MODEL_CARD.md"
    front, body = split_card(path.read_text(encoding="utf-8"))
    assert front["library_name"] == "timm"
    purpose = section(body, "What the model is for")
    assert "not set" in purpose and "project.description" in purpose
    results = section(body, "Results")
    assert "vistrain evaluate RUN --split val" in results
    assert "vistrain evaluate RUN --split val" in section(body, "Known limits")
    assert "manifest.json" in section(body, "Data")  # no hash recorded: said, not made up
    render(body)


def test_a_failing_card_is_a_warning_and_the_report_is_still_written(trained: dict, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    from vistrain.viz.report import write_report

    run = copy_run(trained["run"], tmp_path / "run", without=("MODEL_CARD.md",))
    (run / "MODEL_CARD.md").mkdir()  # the card cannot be written there
    with caplog.at_level(logging.WARNING):
        assert write_report(run).is_file()
    assert any("MODEL_CARD.md" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_the_run_api_writes_the_card(trained: dict, tmp_path: Path) -> None:
    run = vistrain.Run(copy_run(trained["run"], tmp_path / "run", without=("MODEL_CARD.md",)))
    path = run.model_card()
    assert path == run.path / "MODEL_CARD.md" and split_card(path.read_text())[0]["library_name"] == "timm"


def test_a_timm_folder_card_leads_with_timm(trained: dict) -> None:
    from vistrain.viz.model_card import model_card_text

    export = {"folder": "/models/cards-timm", "fold": 1, "not_expressed": ["CLAHE on the L channel"],
              "embedding_head": None,
              "config": {"architecture": "resnet10t", "num_classes": 7, "label_names": list(CLASSES),
                         "pretrained_cfg": {"input_size": [3, 32, 32], "interpolation": "bilinear", "crop_pct": 1.0,
                                            "crop_mode": "center", "mean": [0.485, 0.456, 0.406],
                                            "std": [0.229, 0.224, 0.225]}}}
    front, body = split_card(model_card_text(trained["run"].path, timm_export=export))
    assert front["library_name"] == "timm"
    load = section(body, "How to load")
    first = load.index('timm.create_model("local-dir:/models/cards-timm", pretrained=True)')
    assert first < load.index("vistrain.Run(") and "hf-hub:" in load
    assert "CLAHE on the L channel" in load and "fold 1" in load
    assert "--format timm --output DIR" not in load  # it is that folder: no advice to write one
    # export's embedding_head (engine/timm_folder.py): the formula and the code a timm user runs, shown verbatim
    head = {"kind": "embedding", "file": "vistrain_head.safetensors", "output": "embedding [B, D]",
            "formula": ["f = GeM(feature maps, p = pool.p)", "embedding = f / max(||f||, 1e-12)"],
            "code": "def embed(x):\n    f = model.forward_features(x)\n    return f  # < & > kept\n",
            "call": "embed(x)"}
    _, body = split_card(model_card_text(trained["run"].path, timm_export={**export, "embedding_head": head}))
    part = section(body, "How to load")
    assert "#### Embedding head" in part and "vistrain_head.safetensors" in part
    assert all(step in part for step in head["formula"]) and head["code"] in part and "embed(x)" in part
    assert head["code"].strip() in html.unescape(render(body)[0])  # a code block


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_embedding_e2e import _retrieval_config, write_products

    from vistrain.config import load_config
    from vistrain.engine.evaluation import run_evaluate
    from vistrain.engine.training import run_train

    root = tmp_path_factory.mktemp("card-retrieval")
    cfg = _retrieval_config(root, write_products(root / "products"))
    cfg["model"].update(name="resnet10t", pretrained=False, embedding_dim=32)
    cfg["sampler"].update(p=4, k=2)
    cfg["train"].update(img_size=32, epochs=1, warmup_epochs=0, num_workers=0, device="cpu", log_interval=0)
    cfg["augment"]["policy"] = "none"
    cfg["tracking"]["tensorboard"] = False
    run = run_train(load_config(write_yaml(root / "arc.yaml", cfg))).run_dir
    run_evaluate(run, "val", echo=False)
    return run


def test_an_embedding_run_gets_a_card_with_its_retrieval_metrics(retrieval_run: Path) -> None:
    front, body = split_card((retrieval_run / "MODEL_CARD.md").read_text(encoding="utf-8"))
    metrics = json.loads((retrieval_run / "eval" / "val" / "metrics.json").read_text())
    assert front["library_name"] == "timm" and "image-feature-extraction" in front["tags"]
    assert "image-classification" not in front["tags"]
    _, tables = render(body)
    rows = by_metric(table_under(tables, "eval/val"))
    for name in ("knn_recall@1", "knn_recall@5", "knn_acc", "knn_macro_f1"):
        assert number(rows[name]["value"]) == pytest.approx(metrics[name], abs=TOL), name
        lo, hi = metrics["intervals"][name]
        assert (number(rows[name]["95% low"]), number(rows[name]["95% high"])) == pytest.approx((lo, hi), abs=TOL)
    assert "not set" in section(body, "What the model is for")  # the config has no project.description
    assert "embed(" in section(body, "How to load")
    assert "temperature scaling is for classifiers" in section(body, "Calibration")


def test_a_description_leaves_the_config_hash_as_it_is(tmp_path: Path) -> None:
    """Words about the model are not how it trains: ``--resume`` and a tune study find the same run with or without
    (or after editing) ``project.description``."""
    from vistrain.config.loader import validate
    from vistrain.tracking.rundir import config_hash

    bare = config_hash(validate(tiny_config(tmp_path)))
    assert config_hash(validate(tiny_config(tmp_path, project={"description": DESCRIPTION}))) == bare
    assert config_hash(validate(tiny_config(tmp_path, project={"seed": 8}))) != bare


def test_an_exported_runs_card_shows_int8_agreement_and_latency(trained: dict, tmp_path: Path) -> None:
    """export.json as engine/export.py and engine/deploy.py write it (a float and an int8 file of fold 0)."""
    from vistrain.viz.model_card import write_model_card

    run = copy_run(trained["run"], tmp_path / "run", without=("MODEL_CARD.md",))
    timing = {"1": {"threads": 1, "p50_ms": 1.234, "p95_ms": 1.5, "runs": 20, "stable": True},
              "all": {"threads": 4, "p50_ms": 0.61, "p95_ms": 0.9, "runs": 20, "stable": True}}
    files = [{"kind": "float", "path": str(run / "export" / "model_fold0.onnx"), "size_mb": 18.8, "top1_agreement": 1.0,
              "val_top1": 0.5, "val_top1_change": 0.0, "latency": timing, "budget": None},
             {"kind": "int8", "path": str(run / "export" / "model_fold0.int8.onnx"), "size_mb": 4.8,
              "top1_agreement": 0.975, "val_top1": 0.475, "val_top1_change": -0.025, "latency": timing, "budget": None}]
    (run / "export").mkdir()
    (run / "export" / "export.json").write_text(json.dumps({"format": "onnx", "task": "classification", "models": [
        {"fold": 0, "path": files[0]["path"], "size_mb": 18.8, "outputs": ["logits", "probs"], "opset": 20,
         "verify": {"passed": True, "outputs": {"logits": {"max_abs_diff": 8.9e-8, "within_tolerance": True}}},
         "files": files, "validation": {"images": 40, "source": "fold 0's validation rows"}}], "fallbacks": []}))
    _, body = split_card(write_model_card(run).read_text(encoding="utf-8"))
    assert "Not exported" not in body
    files_table = table_under(render(body)[1], "Deployment", index=1)  # after the one of the exported models
    int8 = {r["file"]: r for r in files_table}["model_fold0.int8.onnx"]
    assert int8["top-1 agreement with float"] == "97.50% of 40"
    assert number(int8["change"]) == pytest.approx(-0.025, abs=TOL)
    assert int8["p50 / p95 ms, 4 threads"] == "0.61 / 0.90"


def test_files_in_shapes_the_card_does_not_expect_still_give_a_card(trained: dict, tmp_path: Path) -> None:
    """A card is best effort: files an older or a broken run left in other shapes cost the section that reads them,
    never the card (nor the command writing it)."""
    from vistrain.viz.model_card import write_model_card

    run = copy_run(trained["run"], tmp_path / "odd", without=("MODEL_CARD.md",))
    (run / "summary.json").write_text(json.dumps({"folds": [1, "two"], "mean": [], "std": 3, "oof": "none"}))
    (run / "manifest.json").write_text(json.dumps({"splits": [], "domains": {"a": 5}, "class_distribution": 7}))
    (run / "eval" / "val" / "per_class.csv").write_text("name,score\nx,1\n")
    (run / "eval" / "val" / "metrics.json").write_text(json.dumps({"top1": "high", "intervals": {"top1": 4}}))
    (run / "calibration.json").write_text(json.dumps({"temperature": "warm", "cross_fit": [], "ensemble": 1}))
    (run / "config.yaml").write_text("train: [1, 2\n")  # not YAML
    front, body = split_card(write_model_card(run).read_text(encoding="utf-8"))
    assert front["library_name"] == "timm"
    for title in ("What the model is for", "Data", "Preprocessing", "Training", "Results", "Calibration",
                  "Deployment (ONNX)", "Known limits", "How to load"):
        section(body, title)
    render(body)
