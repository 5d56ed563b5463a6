"""``vistrain import-config``: a vistrain config from timm train.py's ``args.yaml`` or from a re-ID baseline's yacs
file (reid-strong-baseline, fast-reid). The source files are written here from those projects' documented key names
(timm's train.py arguments, reid-strong-baseline's config/defaults.py and configs/*.yml, fast-reid's
fastreid/config/defaults.py and configs/Base-bagtricks.yml); no file of theirs is copied."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import describe, run_cli

import vistrain
from vistrain.api import import_config, train
from vistrain.cli import main
from vistrain.config import load_config
from vistrain.config.bundled import bundled_config
from vistrain.data.demo import write_digits
from vistrain.errors import UserError

PER_CLASS = 20  # 200 digits: one CPU epoch in seconds


def write_source(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def dotted(cfg: Any, key: str) -> Any:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value.model_dump() if hasattr(value, "model_dump") else value


def import_lines(text: str) -> list[str]:
    return [line[line.index("[IMPORT]"):] for line in text.splitlines() if "[IMPORT]" in line]


# ------------------------------------------------------------------------------------------------ timm train.py


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits demo data laid out as timm's train.py reads it: DATA/train/<class>/<image> (ImageFolder)."""
    root = tmp_path_factory.mktemp("digits")
    paths = write_digits(root / "demo")
    table = pd.read_csv(paths["train_csv"], dtype=str).groupby("target").head(PER_CLASS)
    for image_id, target in zip(table["ID"], table["target"]):
        folder = root / "imagenet_style" / "train" / target
        folder.mkdir(parents=True, exist_ok=True)
        # names without an "_<n>" tail: vistrain's folders source would group <ID>_<n> files by <ID>
        shutil.copy(paths["image_dir_train"] / f"{image_id}.png", folder / f"{image_id.replace('_', '')}.png")
    return root / "imagenet_style"


def timm_args(data_dir: Path) -> dict[str, Any]:
    """25 keys of the args.yaml timm's train.py writes into its output folder (its argparse names)."""
    return {
        "data_dir": str(data_dir), "workers": 0, "val_split": "validation", "model": "resnet10t",
        "pretrained": False, "img_size": 32, "batch_size": 32, "epochs": 90, "opt": "adamw", "lr": 0.002,
        "weight_decay": 0.05, "sched": "cosine", "warmup_epochs": 3, "warmup_lr": 1.0e-5, "min_lr": 1.0e-6,
        "smoothing": 0.1, "mixup": 0.2, "cutmix": 1.0, "aa": "rand-m9-mstd0.5-inc1", "reprob": 0.25,
        "remode": "pixel", "drop_path": 0.05, "model_ema": True, "model_ema_decay": 0.999, "amp": True,
    }


# What each timm key became (a key the vistrain config must hold with this value).
TIMM_MAPPED = {
    "data.source": "folders", "model.name": "resnet10t", "model.pretrained": False, "train.img_size": 32,
    "train.batch_size": 32, "train.epochs": 90, "train.optimizer": "adamw", "train.lr": 0.002,
    "train.weight_decay": 0.05, "train.scheduler": "cosine", "train.warmup_epochs": 3,
    "train.warmup_lr_factor": pytest.approx(1.0e-5 / 0.002), "train.min_lr": 1.0e-6, "train.label_smoothing": 0.1,
    "augment.mixup_alpha": 0.2, "augment.cutmix_alpha": 1.0, "augment.auto": "rand-m9-mstd0.5-inc1",
    "augment.random_erasing": 0.25, "augment.erasing_mode": "pixel", "model.drop_path_rate": 0.05,
    "train.ema": True, "train.ema_decay": 0.999, "train.amp": "fp16", "augment.crop": "rrc",
    "augment.color_jitter": 0.0,  # timm turns its colour jitter off under --aa
    "train.num_workers": 0,
}


def test_a_timm_args_yaml_becomes_a_config_that_trains_on_the_digits(image_folder: Path, tmp_path: Path) -> None:
    args = timm_args(image_folder)
    assert len(args) == 25
    source = write_source(tmp_path / "output" / "train" / "digits-resnet10t" / "args.yaml", args)
    out = tmp_path / "vistrain.yaml"
    result = run_cli("import-config", str(source), "--output", str(out), cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    assert "[IMPORT]" not in result.stdout, "the [IMPORT] lines go to stderr"
    assert str(out) in result.stdout
    text = out.read_text()
    assert text.startswith(f"# vistrain train --config {out}\n")
    cfg = load_config(out)  # vistrain's own loader and schema
    for key, value in TIMM_MAPPED.items():
        assert dotted(cfg, key) == value, key
    assert cfg.data.image_dir_train == image_folder / "train"
    assert cfg.train.early_stopping_patience == 0, "timm trains every epoch"
    # the values timm's train.py uses when args.yaml leaves a key out (a partial file): its argparse defaults
    assert cfg.augment.hflip == 0.5 and cfg.augment.scale == [0.08, 1.0] and cfg.project.seed == 42
    # the keys with no (or only an approximate) vistrain equivalent: one line each on stderr, a comment in the file
    lines = import_lines(result.stderr)
    assert any(line.startswith("[IMPORT] val_split=validation:") for line in lines), result.stderr
    assert any(line.startswith("[IMPORT] model_ema_warmup=false:") for line in lines), result.stderr
    assert re.search(r"^#\s+val_split=validation: ", text, re.M)

    run = train(out, overrides=["train.epochs=1", "data.folds=2", "train.device=cpu", "train.log_interval=0",
                                f"output.exp_dir={tmp_path / 'exp'}", "output.logs_dir=null"], progress=False)
    trained = load_config(run.path / "config.yaml")
    assert trained.augment.auto == "rand-m9-mstd0.5-inc1" and trained.train.ema and trained.augment.mixup_alpha == 0.2
    assert len(run.metrics) == 1 and run.metrics["train_loss"].iloc[0] > 0
    assert run.summary["folds"], "the imported config trained a fold"


def test_timm_computes_lr_from_lr_base_when_lr_is_null(tmp_path: Path) -> None:
    """timm 1.0's default: --lr unset, lr = lr_base x batch / lr_base_size (sqrt scaling for ada* / lamb)."""
    source = write_source(tmp_path / "args.yaml", {"model": "resnet50", "opt": "sgd", "lr": None, "lr_base": 0.1,
                                                   "lr_base_size": 256, "batch_size": 128, "sched": "multistep",
                                                   "decay_milestones": [30, 60], "decay_rate": 0.2})
    cfg = load_config(yaml.safe_load(import_config(source)))
    assert cfg.train.lr == pytest.approx(0.05)
    assert (cfg.train.optimizer, cfg.train.scheduler, cfg.train.step_milestones, cfg.train.step_gamma) == \
        ("sgd", "step", [30, 60], 0.2)
    assert cfg.train.img_size == 224, "the model's own input size (timm's pretrained_cfg) when img_size is unset"


# ------------------------------------------------------------------------------------------------ re-ID baselines

# reid-strong-baseline's published Market-1501 settings (configs/softmax_triplet.yml, the "all tricks" row):
# key names from its config/defaults.py.
STRONG_BASELINE = {
    "MODEL": {"DEVICE": "cuda", "NAME": "resnet50", "LAST_STRIDE": 1, "PRETRAIN_CHOICE": "imagenet",
              "PRETRAIN_PATH": "/models/resnet50-19c8e357.pth", "NECK": "bnneck", "METRIC_LOSS_TYPE": "triplet",
              "IF_LABELSMOOTH": "on", "IF_WITH_CENTER": "no"},
    "INPUT": {"SIZE_TRAIN": [256, 128], "SIZE_TEST": [256, 128], "PROB": 0.5, "RE_PROB": 0.5, "PADDING": 10,
              "PIXEL_MEAN": [0.485, 0.456, 0.406], "PIXEL_STD": [0.229, 0.224, 0.225]},
    "DATASETS": {"NAMES": "('market1501')", "ROOT_DIR": "/datasets"},
    "DATALOADER": {"SAMPLER": "softmax_triplet", "NUM_INSTANCE": 4, "NUM_WORKERS": 8},
    "SOLVER": {"OPTIMIZER_NAME": "Adam", "MAX_EPOCHS": 120, "BASE_LR": 0.00035, "BIAS_LR_FACTOR": 1,
               "WEIGHT_DECAY": 0.0005, "WEIGHT_DECAY_BIAS": 0.0005, "IMS_PER_BATCH": 64, "STEPS": [40, 70],
               "GAMMA": 0.1, "WARMUP_FACTOR": 0.01, "WARMUP_ITERS": 10, "WARMUP_METHOD": "linear", "MARGIN": 0.3,
               "CENTER_LR": 0.5, "CENTER_LOSS_WEIGHT": 0.0005, "CHECKPOINT_PERIOD": 40, "LOG_PERIOD": 20,
               "EVAL_PERIOD": 40},
    "TEST": {"IMS_PER_BATCH": 128, "RE_RANKING": "no", "NECK_FEAT": "after", "FEAT_NORM": "yes"},
    "OUTPUT_DIR": "/logs/market1501/softmax_triplet",
}

# The keys compared with configs/reid_market.yaml: every key the strong baseline's file maps to, and the ones its
# training chain implies (the augmentation it does not do, no early stopping, the features it evaluates).
REID_COMPARED = [
    "task", "data.source", "model.name", "model.pretrained", "model.last_stride", "model.pooling", "model.neck",
    "model.head", "loss.terms", "sampler.name", "sampler.p", "sampler.k", "train.img_size", "train.batch_size",
    "train.epochs", "train.optimizer", "train.lr", "train.weight_decay", "train.momentum", "train.scheduler",
    "train.step_milestones", "train.step_gamma", "train.warmup_epochs", "train.warmup_lr_factor", "train.monitor",
    "train.early_stopping_patience", "preprocess.mean", "preprocess.std", "augment.policy", "augment.hflip",
    "augment.vflip", "augment.rotate", "augment.color_jitter", "augment.hue", "augment.crop", "augment.pad",
    "augment.random_erasing", "augment.erasing_mode", "augment.erasing_count", "augment.erasing_area",
    "augment.mixup_alpha", "augment.cutmix_alpha", "augment.auto", "eval.feat_norm", "eval.flip_feats",
    "eval.max_rank", "eval.rerank",
]
# Mapped, not compared: where the data and the weights lie on the machine the file came from, and the bookkeeping
# the shipped config leaves at vistrain's defaults (the importer keeps the file's values: DATALOADER.NUM_WORKERS,
# SOLVER.LOG_PERIOD / EVAL_PERIOD / CHECKPOINT_PERIOD, TEST.IMS_PER_BATCH).
REID_BOOKKEEPING = {"data.root": Path("/datasets/market1501"),
                    "model.pretrained_path": Path("/models/resnet50-19c8e357.pth"), "train.num_workers": 8,
                    "train.log_interval": 20, "train.eval_every_n_epochs": 40, "train.save_every_n_epochs": 40,
                    "eval.batch_size": 128}


def assert_same(imported: Any, shipped: Any, keys: list[str]) -> None:
    differ = {k: (dotted(imported, k), dotted(shipped, k)) for k in keys if dotted(imported, k) != dotted(shipped, k)}
    assert differ == {}, "imported vs shipped"


def test_the_strong_baseline_yacs_file_becomes_configs_reid_market_yaml(tmp_path: Path) -> None:
    source = write_source(tmp_path / "softmax_triplet.yml", STRONG_BASELINE)
    out = tmp_path / "reid.yaml"
    assert import_config(source, output=out) == out
    imported = load_config(out)
    assert_same(imported, load_config(bundled_config("reid_market.yaml")), REID_COMPARED)
    for key, value in REID_BOOKKEEPING.items():
        assert dotted(imported, key) == value, key


def test_the_center_loss_variant_becomes_configs_reid_market_center_yaml(tmp_path: Path) -> None:
    center = {**STRONG_BASELINE, "MODEL": {**STRONG_BASELINE["MODEL"], "METRIC_LOSS_TYPE": "triplet_center",
                                           "IF_WITH_CENTER": "yes"}}
    source = write_source(tmp_path / "center.yml", center)
    imported = load_config(yaml.safe_load(import_config(source, from_format="yacs")))
    assert imported.loss.model_dump()["terms"][2] == {"name": "center", "weight": 0.0005, "lr": 0.5}
    assert_same(imported, load_config(bundled_config("reid_market_center.yaml")), REID_COMPARED)


def fast_reid_files(tmp_path: Path) -> Path:
    """A fast-reid bag-of-tricks config (its v1 spellings) inheriting from a base file, as its configs/ do."""
    base = {
        "MODEL": {"META_ARCHITECTURE": "Baseline",
                  "BACKBONE": {"NAME": "build_resnet_backbone", "NORM": "BN", "DEPTH": "50x", "LAST_STRIDE": 1,
                               "FEAT_DIM": 2048, "WITH_IBN": False, "PRETRAIN": True},
                  "HEADS": {"NAME": "EmbeddingHead", "NORM": "BN", "WITH_BNNECK": True, "POOL_LAYER": "GlobalAvgPool",
                            "NECK_FEAT": "before", "CLS_LAYER": "Linear"},
                  "LOSSES": {"NAME": '("CrossEntropyLoss", "TripletLoss",)', "CE": {"EPSILON": 0.1, "SCALE": 1.0},
                             "TRI": {"MARGIN": 0.3, "HARD_MINING": True, "NORM_FEAT": False, "SCALE": 1.0}}},
        "INPUT": {"SIZE_TRAIN": [256, 128], "SIZE_TEST": [256, 128], "REA": {"ENABLED": True, "PROB": 0.5},
                  "FLIP": {"ENABLED": True}, "PADDING": {"ENABLED": True}},
        "DATALOADER": {"SAMPLER_TRAIN": "NaiveIdentitySampler", "NUM_INSTANCE": 4, "NUM_WORKERS": 8},
        "SOLVER": {"AMP": {"ENABLED": True}, "OPT": "Adam", "MAX_EPOCH": 120, "BASE_LR": 0.00035,
                   "WEIGHT_DECAY": 0.0005, "WEIGHT_DECAY_NORM": 0.0005, "IMS_PER_BATCH": 64, "SCHED": "MultiStepLR",
                   # fast-reid steps its MultiStepLR once per epoch from the warm-up's last epoch on: these two
                   # decay after epoch 40 and 70 of the 10-epoch (2020-iteration) warm-up run
                   "STEPS": [31, 61], "GAMMA": 0.1, "WARMUP_FACTOR": 0.01, "WARMUP_ITERS": 2020,
                   "CHECKPOINT_PERIOD": 40},
        "TEST": {"EVAL_PERIOD": 40, "IMS_PER_BATCH": 128},
    }
    write_source(tmp_path / "configs" / "Base-bagtricks.yml", base)
    return write_source(tmp_path / "configs" / "Market1501" / "bagtricks_R50.yml", {
        "_BASE_": "../Base-bagtricks.yml", "DATASETS": {"NAMES": '("Market1501",)', "TESTS": '("Market1501",)'},
        "OUTPUT_DIR": "logs/market1501/bagtricks_R50"})


def test_a_fast_reid_config_maps_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTREID_DATASETS", str(tmp_path / "datasets"))
    imported = load_config(yaml.safe_load(import_config(fast_reid_files(tmp_path))))
    # fast-reid's random erasing is torchvision's (2-33% of the area: vistrain's null), the strong baseline's 2-40%
    compared = [k for k in REID_COMPARED if k not in ("augment.erasing_area", "model.pretrained")]
    assert_same(imported, load_config(bundled_config("reid_market.yaml")), compared)
    assert imported.augment.erasing_area is None and imported.model.pretrained is True
    assert imported.data.root == tmp_path / "datasets" / "Market-1501-v15.09.15"
    assert imported.train.warmup_epochs == 10.0, "2020 iterations of 12,936 // 64 = 202 per epoch"


# ------------------------------------------------------------------------------------------------ [IMPORT] lines


def test_each_key_without_an_equivalent_gets_one_import_line(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    args = {"model": "resnet50", "lr": 0.1, "layer_decay": 0.65, "bce_loss": True, "opt": "lamb",
            "lr_noise": None, "torchscript": False, "cooldown_epochs": 10, "epochs": 100, "mystery_key": 3}
    source = write_source(tmp_path / "args.yaml", args)
    out = tmp_path / "imported.yaml"
    assert main(["import-config", str(source), "--from", "timm", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    lines = import_lines(captured.err)
    for key in ("layer_decay=0.65", "bce_loss=true", "opt=lamb", "cooldown_epochs=10", "mystery_key=3"):
        assert sum(line.startswith(f"[IMPORT] {key}:") for line in lines) == 1, (key, lines)
    # keys the source leaves unset carry nothing: one line names them all
    unset = [line for line in lines if line.startswith("[IMPORT] unset in the source")]
    assert len(unset) == 1 and "lr_noise" in unset[0] and "torchscript" in unset[0]
    assert not any(line.startswith(("[IMPORT] lr=", "[IMPORT] model=")) for line in lines), "mapped keys: no line"
    text = out.read_text()
    assert re.search(r"^# +layer_decay=0.65: ", text, re.M), "the file says what was not carried over"
    assert re.search(r"^  optimizer: adamw +# opt=lamb: ", text, re.M) or "# opt=lamb:" in text
    assert load_config(out).train.optimizer == "adamw"


def test_approximations_of_a_yacs_file_are_said_in_lines_and_comments(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = {**STRONG_BASELINE, "SOLVER": {**STRONG_BASELINE["SOLVER"], "WARMUP_METHOD": "constant",
                                         "BIAS_LR_FACTOR": 2},
           "TEST": {**STRONG_BASELINE["TEST"], "NECK_FEAT": "before"}}
    source = write_source(tmp_path / "baseline.yml", cfg)
    assert main(["import-config", str(source)]) == 0
    captured = capsys.readouterr()
    lines = import_lines(captured.err)
    for key in ("SOLVER.WARMUP_METHOD=constant", "SOLVER.BIAS_LR_FACTOR=2", "TEST.NECK_FEAT=before",
                "OUTPUT_DIR=/logs/market1501/softmax_triplet"):
        assert sum(line.startswith(f"[IMPORT] {key}:") for line in lines) == 1, (key, lines)
        assert f"# {key}:" in captured.out or f"#   {key}:" in captured.out, key
    assert "[IMPORT]" not in captured.out, "stdout is the config alone"
    assert load_config(yaml.safe_load(captured.out)).task == "embedding"


# ------------------------------------------------------------------------------------------------ user mistakes


@pytest.mark.parametrize("case", ["bad_yaml", "unknown_from", "existing_output", "unrecognisable", "missing",
                                  "wrong_from"])
def test_user_mistakes_are_one_line_and_exit_2(case: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    good = write_source(tmp_path / "args.yaml", {"model": "resnet50", "lr": 0.1})
    (tmp_path / "broken.yaml").write_text("model: resnet50\nlr: [0.1\n")
    (tmp_path / "taken.yaml").write_text("# mine\n")
    write_source(tmp_path / "other.yaml", {"name": "a", "items": [1, 2]})
    argv = {
        "bad_yaml": [str(tmp_path / "broken.yaml")],
        "unknown_from": [str(good), "--from", "detectron"],
        "existing_output": [str(good), "--output", str(tmp_path / "taken.yaml")],
        "unrecognisable": [str(tmp_path / "other.yaml")],
        "missing": [str(tmp_path / "nope.yaml")],
        "wrong_from": [str(good), "--from", "yacs"],
    }[case]
    assert main(["import-config", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    expected = {"bad_yaml": "broken.yaml: line 3",
                "unknown_from": "--from: unknown format 'detectron'; valid: timm, yacs",
                "existing_output": "taken.yaml exists; pass --force", "unrecognisable": "other.yaml",
                "missing": "nope.yaml", "wrong_from": "--from yacs"}[case]
    assert expected in lines[0]
    assert (tmp_path / "taken.yaml").read_text() == "# mine\n"


def test_force_replaces_an_existing_output(tmp_path: Path) -> None:
    source = write_source(tmp_path / "args.yaml", {"model": "resnet50", "lr": 0.1})
    out = tmp_path / "taken.yaml"
    out.write_text("# mine\n")
    with pytest.raises(UserError, match="exists"):
        vistrain.import_config(source, output=out)
    assert vistrain.import_config(source, output=out, force=True) == out
    assert load_config(out).model.name == "resnet50"
