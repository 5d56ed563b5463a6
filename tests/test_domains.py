"""Per-domain metrics (``top1@<domain>``, ``top5@<domain>``, ``macro_f1@<domain>``) as first-class numbers, the
domain monitor, and display names from class_map.json's metadata: unit tests against scikit-learn, then one tiny
two-domain run (5 classes, 2 epochs, CPU) checked file by file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import read_metrics, run_cli, run_dirs, tiny_config, write_csv_dataset, write_yaml
from sklearn import metrics as skm

from vistrain.config import load_config
from vistrain.config.schema import DOMAIN_MONITORS
from vistrain.engine.tasks import ClassificationTask
from vistrain.errors import ConfigError, UserError
from vistrain.metrics.classification import DOMAIN_METRICS, per_domain_metrics


def sk_domain(logits: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, float]:
    """The reference: scikit-learn on one domain's rows (macro F1 over the classes present in its targets)."""
    pred = logits.argmax(axis=1)
    out = {"top1": skm.accuracy_score(y, pred),
           "macro_f1": skm.f1_score(y, pred, labels=np.unique(y), average="macro", zero_division=0)}
    if n_classes >= 5:
        out["top5"] = skm.top_k_accuracy_score(y, logits, k=5, labels=range(n_classes))
    return out


# ------------------------------------------------------------------------------------------------ unit

@pytest.mark.parametrize("n_classes", [3, 7])
def test_per_domain_metrics_equal_scikit_learn_on_each_domains_rows(n_classes: int) -> None:
    rng = np.random.default_rng(n_classes)
    n = 300
    logits = rng.normal(size=(n, n_classes))
    y = rng.integers(0, n_classes, n)
    logits[np.arange(n), y] += rng.normal(1.0, 1.0, n)  # better than chance, not perfect
    domains = rng.choice(["studio", "real", "phone"], n, p=[0.5, 0.4, 0.1])
    domains[:5] = ""  # rows without a domain count overall only
    y[domains == "phone"] = 0  # a domain holding one class: its macro F1 is that class's F1
    got = per_domain_metrics(logits, y, domains)
    expected = {}
    for dom in ("phone", "real", "studio"):
        rows = domains == dom
        expected.update({f"{k}@{dom}": v for k, v in sk_domain(logits[rows], y[rows], n_classes).items()})
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert ("top5@real" in got) == (n_classes >= 5)  # as the overall top5: only when C >= 5


def test_a_domain_holding_2_of_10_classes_with_perfect_predictions_scores_macro_f1_one() -> None:
    y = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 7, 3, 7])
    domains = np.array(["studio"] * 10 + ["real"] * 4)  # real holds classes 3 and 7 only
    logits = np.eye(10)[y] * 5.0  # every prediction right
    got = per_domain_metrics(logits, y, domains)
    assert got["macro_f1@real"] == 1.0 and got["macro_f1@studio"] == 1.0
    assert got["top1@real"] == 1.0


def test_a_domains_macro_f1_counts_its_false_positives_but_not_the_classes_it_lacks() -> None:
    # real holds classes 0 and 1; one class-1 image is predicted as 2, a class absent from real
    y = np.array([0, 0, 1, 1, 2, 3])
    pred = np.array([0, 0, 1, 2, 2, 3])
    domains = np.array(["real"] * 4 + ["studio"] * 2)
    got = per_domain_metrics(np.eye(4)[pred], y, domains)
    expected = skm.f1_score(y[:4], pred[:4], labels=[0, 1], average="macro", zero_division=0)
    assert got["macro_f1@real"] == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx((1.0 + 2 / 3) / 2)  # class 0: F1 1; class 1: P 1, R 1/2, F1 2/3


def test_per_domain_metrics_accept_tensors_and_check_lengths() -> None:
    import torch

    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    got = per_domain_metrics(logits, y, np.array(["a", "a", "a", "b", "b", "b"]))
    assert set(got) == {"top1@a", "macro_f1@a", "top1@b", "macro_f1@b"}
    with pytest.raises(ValueError, match="domains"):
        per_domain_metrics(logits, y, np.array(["a"] * 5))


def test_config_and_metrics_agree_on_the_domain_metric_names() -> None:
    assert tuple(DOMAIN_MONITORS) == tuple(DOMAIN_METRICS) == ("top1", "top5", "macro_f1")


def test_classification_task_adds_the_validation_domains_metrics() -> None:
    import torch
    from torch import nn

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    y = torch.tensor([0, 1, 1, 2])
    task = ClassificationTask(nn.CrossEntropyLoss(), valid_domains=np.array(["real", "real", "studio", "studio"]))
    row = task.metrics(logits, y)
    assert row["top1@real"] == 1.0 and row["top1@studio"] == 0.5 and "accuracy" in row
    assert "top1@real" not in ClassificationTask(nn.CrossEntropyLoss()).metrics(logits, y)


def csv_overrides(root: Path) -> list[str]:
    return ["data.source=csv", f"data.train_csv={root / 'train.csv'}", f"data.image_dir_train={root}"]


@pytest.mark.parametrize("monitor", ["top1@real", "top5@real", "macro_f1@studio photos"])
def test_a_domain_monitor_is_a_valid_classification_monitor(monitor: str, tmp_path: Path) -> None:
    assert load_config(None, overrides=[*csv_overrides(tmp_path), f"train.monitor={monitor}"]).train.monitor == monitor


@pytest.mark.parametrize("monitor", ["recall@real", "top1@", "accuracy@real"])
def test_a_bad_domain_monitor_names_the_valid_forms(monitor: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides=[*csv_overrides(tmp_path), f"train.monitor={monitor}"])
    assert "train.monitor" in str(err.value) and "top1@<domain>" in str(err.value), str(err.value)


def test_the_early_stopping_maximises_a_domain_monitor() -> None:
    from vistrain.engine.hooks import EarlyStopping
    from vistrain.tuning.study import direction_of

    assert EarlyStopping("top1@real", 3).mode == "max" and direction_of("macro_f1@real") == "maximize"


def test_named_sources_fix_the_domains_at_config_load(tmp_path: Path) -> None:
    for name in ("studio", "real"):
        (tmp_path / name / "a").mkdir(parents=True)
    sources = (f"data.sources=[{{name: studio, source: folders, image_dir_train: {tmp_path / 'studio'}}}, "
               f"{{name: real, source: folders, image_dir_train: {tmp_path / 'real'}}}]")
    assert load_config(None, overrides=[sources, "train.monitor=top1@real"]).train.monitor == "top1@real"
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides=[sources, "train.monitor=top1@phone"])
    assert "train.monitor: domain 'phone' is not in the data; domains: real, studio" in str(err.value)


# --------------------------------------------------------------------------------- one two-domain run

CLASSES = ("0", "1", "2", "3", "4", "5")  # top5@<domain> is reported from C >= 5 on; with 6 it is not always 1
SPLIT = ["train", "train", "val", "test"]  # per class and source
# real validates and tests every class; studio only the first three (its other classes train only), so studio's
# macro F1 is a mean over 3 classes, not 6
STUDIO_SPLIT = SPLIT * 3 + ["train"] * 4 * 3


@pytest.fixture(scope="module")
def domain_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two data.sources (studio, real: 6 classes x 4 images each, the data's own split column; studio's val and
    test hold 3 of the classes) with data.split: ratio, 2 epochs, best epoch by top1@real; training ends with
    eval/test/; then ``evaluate --split val``."""
    from vistrain.engine.evaluation import run_evaluate
    from vistrain.engine.training import run_train

    root = tmp_path_factory.mktemp("domains")
    sources = []
    for seed, name in enumerate(("studio", "real")):
        data = write_csv_dataset(root / name, classes=CLASSES, per_class=4, size=32, seed=seed,
                                 extra_columns={"split": STUDIO_SPLIT if name == "studio" else SPLIT * len(CLASSES)})
        sources.append({"name": name, "source": "csv", "train_csv": str(data.train_csv),
                        "image_dir_train": str(data.image_dir), "ratio": 0.5})
    cfg = tiny_config(root, train={"monitor": "top1@real"}, output={"exp_dir": str(root / "exp"), "logs_dir": None})
    cfg["data"] = {"sources": sources, "split": "ratio", "image_ext": ".png"}
    config = write_yaml(root / "cfg.yaml", cfg)
    run = run_train(load_config(config)).run_dir
    run_evaluate(run, "val", echo=False)
    return {"root": root, "run": run, "config": config, "data": data}


def valid_part(run: Path, split: str = "val") -> pd.DataFrame:
    splits = pd.read_csv(run / "splits.csv", dtype={"label": str, "domain": str}, keep_default_na=False)
    return splits[splits["split"] == split].reset_index(drop=True)


def test_epoch_rows_carry_each_domains_metrics_as_scikit_learn_computes_them(domain_run: dict) -> None:
    run = domain_run["run"]
    rows = read_metrics(run)
    keys = {f"{m}@{d}" for m in ("top1", "top5", "macro_f1") for d in ("real", "studio")}
    assert rows and all(keys <= set(r) for r in rows), rows[0]
    summary = json.loads((run / "summary.json").read_text())
    best = next(r for r in rows if r["epoch"] == summary["folds"][0]["best_epoch"])
    # the best epoch's validation logits, in splits.csv order of fold 0's items
    logits = np.load(run / "oof" / "fold0_valid_logits.npy")
    part = valid_part(run)
    y = part["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    for dom in ("real", "studio"):
        rows_d = (part["domain"] == dom).to_numpy()
        for metric, value in sk_domain(logits[rows_d], y[rows_d], len(CLASSES)).items():
            assert best[f"{metric}@{dom}"] == pytest.approx(value, abs=1e-6), (metric, dom)


def test_the_domain_monitor_picks_the_best_epoch_and_fills_the_summary(domain_run: dict) -> None:
    run = domain_run["run"]
    rows = read_metrics(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["monitor"] == "top1@real"
    values = [r["top1@real"] for r in rows]
    assert summary["folds"][0]["best_epoch"] == rows[int(np.argmax(values))]["epoch"]  # the first of equal bests
    for key in ("top1@real", "top5@studio", "macro_f1@real"):
        assert summary["mean"][key] == summary["folds"][0]["best"][key] and summary["std"][key] == 0.0
    log = (run / "train.log").read_text()
    news = [ln for ln in log.splitlines() if "NEW_BEST" in ln]
    assert news and all("top1@real=" in ln for ln in news), news
    epoch_lines = [ln for ln in log.splitlines() if "[EPOCH] fold=0 epoch=" in ln]
    assert epoch_lines and all("top1@real=" in ln and "macro_f1@studio=" in ln for ln in epoch_lines)


def test_tensorboard_has_a_curve_per_domain_metric(domain_run: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(domain_run["run"] / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"fold0/top1@real", "fold0/top5@studio", "fold0/macro_f1@real", "summary/mean/top1@real"} <= tags, tags
    rows = read_metrics(domain_run["run"])
    assert [e.value for e in acc.Scalars("fold0/top1@real")] == pytest.approx([r["top1@real"] for r in rows])


@pytest.mark.parametrize("split", ["test", "val"])  # test: written by train at the end; val: by evaluate
def test_per_domain_numbers_agree_with_scikit_learn_on_the_domains_rows_of_predictions_csv(domain_run: dict,
                                                                                           split: str) -> None:
    out = domain_run["run"] / "eval" / split
    metrics = json.loads((out / "metrics.json").read_text())
    pred = pd.read_csv(out / "predictions.csv", dtype={"true": str, "pred": str, "domain": str},
                       keep_default_na=False)
    assert pred.columns[:5].tolist() == ["id", "path", "domain", "true", "pred"]
    assert pred["id"].tolist() == valid_part(domain_run["run"], split)["id"].tolist()
    probs = pred[[f"prob_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (np.array(CLASSES)[probs.argmax(axis=1)] == pred["pred"]).all()
    index = {c: i for i, c in enumerate(CLASSES)}
    assert sorted(metrics["per_domain"]) == ["real", "studio"]
    for dom in ("real", "studio"):
        part = pred[pred["domain"] == dom]
        y, p = part["true"].map(index).to_numpy(), part["pred"].map(index).to_numpy()
        top1 = skm.accuracy_score(y, p)
        f1 = skm.f1_score(y, p, labels=np.unique(y), average="macro", zero_division=0)  # the domain's classes
        top5 = skm.top_k_accuracy_score(y, probs[part.index], k=5, labels=range(len(CLASSES)))
        for key, value in (("top1", top1), ("macro_f1", f1), ("top5", top5)):
            assert metrics[f"{key}@{dom}"] == pytest.approx(value, abs=1e-9), (key, dom)
            assert metrics["per_domain"][dom][key] == pytest.approx(value, abs=1e-9), (key, dom)
        assert metrics["per_domain"][dom]["n"] == len(part) == {"real": 6, "studio": 3}[dom]
        assert part["true"].nunique() == len(part)  # one image per class present


def test_summary_json_carries_the_test_splits_per_domain_numbers(domain_run: dict) -> None:
    run = domain_run["run"]
    summary = json.loads((run / "summary.json").read_text())
    test = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert summary["test"]["per_domain"] == test["per_domain"]
    assert {k: summary["test"][k] for k in ("top1@real", "macro_f1@studio")} == \
        {k: test[k] for k in ("top1@real", "macro_f1@studio")}


def test_per_class_csv_has_each_domains_columns(domain_run: dict) -> None:
    out = domain_run["run"] / "eval" / "val"
    per_class = pd.read_csv(out / "per_class.csv", dtype={"class": str})
    pred = pd.read_csv(out / "predictions.csv", dtype={"true": str, "pred": str, "domain": str})
    for dom in ("real", "studio"):
        part = pred[pred["domain"] == dom]
        precision, recall, f1, support = skm.precision_recall_fscore_support(
            part["true"], part["pred"], labels=list(CLASSES), zero_division=0)
        absent = support == 0  # studio's classes 3-5: no images there, so no recall or F1 (empty cells), not 0
        assert absent.sum() == {"real": 0, "studio": 3}[dom]
        assert per_class[f"recall@{dom}"].to_numpy() == pytest.approx(np.where(absent, np.nan, recall), nan_ok=True)
        assert per_class[f"f1@{dom}"].to_numpy() == pytest.approx(np.where(absent, np.nan, f1), nan_ok=True)
        assert per_class[f"support@{dom}"].tolist() == support.tolist()


def test_report_shows_the_per_domain_table(domain_run: dict) -> None:
    from vistrain.viz.report import render_report

    run = domain_run["run"]
    page = render_report(run)
    section = page[page.index("Per-domain metrics"):]
    section = section[: section.index("</section>")]
    for split in ("test", "val"):
        assert f"<h3>eval / {split}</h3>" in section
        metrics = json.loads((run / "eval" / split / "metrics.json").read_text())
        for dom in ("real", "studio"):
            m = metrics["per_domain"][dom]
            lo, hi = m["intervals"]["top1"]  # eval.bootstrap: each figure beside its 95% interval
            assert f"<td>{dom}</td><td>{m['n']}</td><td>{m['top1']:.4f} [{lo:.4f}, {hi:.4f}]</td>" in section


def test_an_unknown_source_domain_in_the_monitor_exits_2_in_one_line(domain_run: dict, tmp_path: Path) -> None:
    res = run_cli("train", "--config", str(domain_run["config"]), "train.monitor=top1@phone",
                  f"output.exp_dir={tmp_path / 'exp'}", cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and "train.monitor: domain 'phone' is not in the data; domains: real, studio" in errors[0]
    assert "Traceback" not in res.stderr and not run_dirs(tmp_path / "exp")


def test_a_kfold_run_with_a_domain_column_reports_domains_per_fold_and_out_of_fold(tmp_path: Path) -> None:
    """data.valid_fold: all over a csv whose domain column puts both domains in each fold: summary.json's mean over
    the folds and its OOF block (all held-out logits) carry the domain keys, and evaluate --split oof agrees."""
    from vistrain.engine.evaluation import run_evaluate
    from vistrain.engine.training import run_train

    classes = ("a", "b", "c")
    config = small_run_config(tmp_path, ["real", "studio"] * 6, classes=classes, monitor="macro_f1@studio")
    cfg = load_config(config, overrides=["data.valid_fold=all", "train.epochs=1"])
    run = run_train(cfg).run_dir
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mean"]["macro_f1@studio"] == pytest.approx(
        np.mean([f["best"]["macro_f1@studio"] for f in summary["folds"]]))
    logits, y = np.load(run / "oof" / "oof_logits.npy"), np.load(run / "oof" / "oof_targets.npy")
    domains = pd.read_csv(run / "splits.csv", dtype=str)["domain"].to_numpy()
    evaluated = run_evaluate(run, "oof", echo=False)
    for dom in ("real", "studio"):
        rows = domains == dom
        for metric, value in sk_domain(logits[rows], y[rows], len(classes)).items():
            assert summary["oof"][f"{metric}@{dom}"] == pytest.approx(value, abs=1e-9), (metric, dom)
            assert evaluated[f"{metric}@{dom}"] == pytest.approx(value, abs=1e-6), (metric, dom)


# ------------------------------------------------------------------------ the monitor against the data

def small_run_config(root: Path, domains: list[str], classes: tuple[str, ...] = ("a", "b", "c"),
                     folds: list[int] | None = None, monitor: str = "top1@real") -> Path:
    extra = {"domain": domains, **({"fold": folds} if folds else {})}
    data = write_csv_dataset(root / "data", classes=classes, per_class=len(domains) // len(classes),
                             extra_columns=extra)
    cfg = tiny_config(data.root, train={"monitor": monitor}, output={"exp_dir": str(root / "exp"), "logs_dir": None})
    return write_yaml(root / "cfg.yaml", cfg)


def train_error(config: Path) -> str:
    from vistrain.engine.training import run_train

    with pytest.raises(UserError) as err:
        run_train(load_config(config))
    assert not run_dirs(config.parent / "exp")  # stopped before the run directory
    return str(err.value)


def test_an_unknown_domain_of_a_csv_domain_column_is_named(tmp_path: Path) -> None:
    msg = train_error(small_run_config(tmp_path, ["real", "studio"] * 6, monitor="top1@reel"))
    assert msg == "train.monitor: domain 'reel' is not in the data; domains: real, studio (did you mean 'real'?)"


def test_top5_of_a_domain_needs_five_classes(tmp_path: Path) -> None:
    msg = train_error(small_run_config(tmp_path, ["real", "studio"] * 6, monitor="top5@real"))
    assert msg == "train.monitor: top5@real is reported only with 5 or more classes; the data has 3; use top1@real " \
                  "or macro_f1@real"


def test_a_domain_missing_from_a_validation_fold_is_named(tmp_path: Path) -> None:
    domains = ["studio"] * 12
    domains[5] = "real"  # the one real image lies in fold 1; fold 0 validates
    msg = train_error(small_run_config(tmp_path, domains, folds=[1 if i % 2 else 0 for i in range(12)]))
    assert msg.startswith("train.monitor: domain 'real' has no validation image in fold 0 (1 image(s) in all)"), msg


def test_a_domain_monitor_on_data_without_domains_says_where_domains_come_from(tmp_path: Path) -> None:
    data = write_csv_dataset(tmp_path / "data", per_class=4)
    cfg = tiny_config(data.root, train={"monitor": "macro_f1@real"}, output={"exp_dir": str(tmp_path / "exp")})
    msg = train_error(write_yaml(tmp_path / "cfg.yaml", cfg))
    assert msg.startswith("train.monitor: domain 'real' is not in the data, which has no domains"), msg


# ------------------------------------------------------------------------------------------ the report

def test_report_lists_the_classes_under_the_threshold_per_domain(tmp_path: Path) -> None:
    from vistrain.viz.report import render_report

    (tmp_path / "eval" / "val").mkdir(parents=True)
    write_yaml(tmp_path / "config.yaml", {"eval": {"failure_threshold": 0.6}})
    pd.DataFrame({"index": [0, 1, 2], "class": ["a", "b", "c"], "display_name": ["Aspirin", "", "Cetirizine"],
                  "recall": [0.9, 0.5, 0.7], "f1": [0.9, 0.5, 0.7], "support": [10, 10, 10],
                  "recall@real": [0.5, 0.25, 1.0], "f1@real": [0.5, 0.3, 1.0], "support@real": [4, 4, 2],
                  "recall@studio": [1.0, 0.0, 0.55], "f1@studio": [1.0, 0.0, 0.6], "support@studio": [6, 0, 8]},
                 ).to_csv(tmp_path / "eval" / "val" / "per_class.csv", index=False)
    summary = {"mean": {"top1@real": 0.625, "macro_f1@real": 0.6, "top1@studio": 0.75, "recall@1": 0.9}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    page = render_report(tmp_path)
    section = page[page.index("Per-domain metrics"):]
    section = section[: section.index("</section>")]
    assert "<td>real</td><td>0.6250</td>" in section and "recall@1" not in section
    low = section[section.index("classes under accuracy 0.6 per domain"):]
    rows = [r.split("</td>")[:4] for r in low.split("<tr>")[2:]]
    got = [[cell.rsplit(">", 1)[-1] for cell in r] for r in rows]
    # worst first within a domain; studio's class b has no image there, so it is not failing there
    assert got == [["real", "b", "", "0.2500"], ["real", "a", "Aspirin", "0.5000"],
                   ["studio", "c", "Cetirizine", "0.5500"]], got


def test_a_class_without_images_in_a_domain_has_no_recall_or_f1_there(tmp_path: Path) -> None:
    """per_class.csv leaves recall@d / f1@d empty (and the report shows a dash) where support@d is 0; the other
    cells are scikit-learn's numbers on that domain's rows."""
    from vistrain.engine.evaluation import per_class_table
    from vistrain.metrics.classification import classification_report
    from vistrain.tracking.files import write_csv
    from vistrain.viz.report import render_report

    names = ["a", "b", "c"]
    targets = np.array([0, 0, 1, 1, 2, 0, 1, 0])
    pred = np.array([0, 1, 1, 1, 2, 2, 1, 0])  # studio: a predicted as c once, although c has no studio image
    domains = np.array(["real"] * 5 + ["studio"] * 3)
    logits = np.eye(3)[pred]
    by_domain = {d: classification_report(logits[domains == d], targets[domains == d], names)
                 for d in ("real", "studio")}
    write_csv(tmp_path / "eval" / "val" / "per_class.csv",
              per_class_table(classification_report(logits, targets, names), by_domain))
    table = pd.read_csv(tmp_path / "eval" / "val" / "per_class.csv")
    rows = domains == "studio"
    recall = skm.recall_score(targets[rows], pred[rows], labels=[0, 1, 2], average=None, zero_division=np.nan)
    f1 = skm.f1_score(targets[rows], pred[rows], labels=[0, 1, 2], average=None)
    assert table["support@studio"].tolist() == [2, 1, 0]
    assert table["recall@studio"].tolist()[:2] == pytest.approx(recall[:2]) and np.isnan(recall[2])
    assert table["f1@studio"].tolist()[:2] == pytest.approx(f1[:2])
    assert table[["recall@studio", "f1@studio"]].iloc[2].isna().all(), "no studio image of c: no recall, no F1"
    assert table[["recall@real", "f1@real"]].notna().all().all()
    line_c = (tmp_path / "eval" / "val" / "per_class.csv").read_text().splitlines()[3]
    assert ",,0" in line_c and ",0.0,0.0,0" not in line_c, line_c  # recall@studio,f1@studio,support@studio

    page = render_report(tmp_path)
    section = page[page.index("Per-class metrics"):]
    row_c = section[section.index("<td>c</td>"):].split("</tr>")[0]
    assert row_c.count("\u2014</td>") == 2 and "<td>0.0000</td><td>0.0000</td><td>0</td>" not in row_c, row_c


# -------------------------------------------------------------------------------------- display names

METADATA = {"0": {"display_name": "Zero tablet", "training_weight": 1.0}, "1": {"name": "One capsule"},
            "2": {"training_weight": 2.0}}
DISPLAY = {"0": "Zero tablet", "1": "One capsule"}  # the others have none


@pytest.fixture(scope="module")
def named_run(domain_run: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the two-domain run whose class_map.json has the optional metadata block."""
    run = tmp_path_factory.mktemp("named") / domain_run["run"].name
    shutil.copytree(domain_run["run"], run)
    class_map = json.loads((run / "class_map.json").read_text())
    (run / "class_map.json").write_text(json.dumps({**class_map, "metadata": METADATA}))
    return run


def test_loaded_run_gives_display_names_in_class_order(named_run: Path, domain_run: dict) -> None:
    from vistrain.engine.inference import load_run

    assert load_run(named_run).display_names() == ["Zero tablet", "One capsule", None, None, None, None]
    assert load_run(domain_run["run"]).display_names() == [None] * len(CLASSES)


def test_predict_adds_the_display_name_column(named_run: Path, domain_run: dict, tmp_path: Path) -> None:
    from vistrain.engine.prediction import run_predict

    table = run_predict(named_run, domain_run["data"].image_dir, output=tmp_path / "p.csv")
    written = pd.read_csv(tmp_path / "p.csv", dtype=str, keep_default_na=False)
    assert written.columns.tolist() == ["ID", "target", "display_name"]
    assert written["display_name"].tolist() == [DISPLAY.get(t, "") for t in written["target"]]
    assert len(table) == len(CLASSES) * 4
    plain = run_predict(domain_run["run"], domain_run["data"].image_dir, output=tmp_path / "q.csv")
    assert plain.columns.tolist() == ["ID", "target"]  # no metadata: the file is as before


def test_serve_answers_with_the_display_name(named_run: Path, domain_run: dict) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from vistrain.serving.app import create_app, load_predictor

    files = sorted(domain_run["data"].image_dir.glob("*.png"))[::7]
    client = TestClient(create_app(load_predictor(named_run)))
    res = client.post("/predict", files=[("files", (f.name, f.read_bytes(), "image/png")) for f in files])
    assert res.status_code == 200, res.text
    for row in res.json()["results"]:
        assert row["display_name"] == DISPLAY.get(row["class"])
        assert all(t["display_name"] == DISPLAY.get(t["class"]) for t in row["top"])


def test_evaluate_and_report_show_the_display_names(named_run: Path) -> None:
    from vistrain.engine.evaluation import run_evaluate
    from vistrain.viz.report import render_report

    run_evaluate(named_run, "val")
    per_class = pd.read_csv(named_run / "eval" / "val" / "per_class.csv", dtype=str, keep_default_na=False)
    assert per_class.columns[:3].tolist() == ["index", "class", "display_name"]
    assert per_class["display_name"].tolist() == [DISPLAY.get(c, "") for c in CLASSES]
    page = render_report(named_run)
    per_class_section = page[page.index("Per-class metrics"):]
    assert "<th>display_name</th>" in per_class_section and "<td>Zero tablet</td>" in per_class_section


def test_export_metadata_carries_the_display_names(named_run: Path) -> None:
    from types import SimpleNamespace

    from vistrain.data.preprocess import Preprocessor
    from vistrain.engine.export import metadata, read_onnx_metadata
    from vistrain.engine.inference import load_run

    meta = metadata(load_run(named_run), 0, Preprocessor(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3))
    assert json.loads(meta["vistrain.display_names"]) == ["Zero tablet", "One capsule", None, None, None, None]
    session = SimpleNamespace(
        get_modelmeta=lambda: SimpleNamespace(custom_metadata_map=meta),
        get_inputs=lambda: [SimpleNamespace(name="image", shape=["N", 3, 32, 32])],
        get_outputs=lambda: [SimpleNamespace(name="probs", shape=["N", len(CLASSES)])])
    assert read_onnx_metadata(Path("m.onnx"), session)["display_names"] == json.loads(meta["vistrain.display_names"])
    plain = {k: v for k, v in meta.items() if k != "vistrain.display_names"}  # a file from before: no names
    session.get_modelmeta = lambda: SimpleNamespace(custom_metadata_map=plain)
    assert read_onnx_metadata(Path("m.onnx"), session)["display_names"] is None
