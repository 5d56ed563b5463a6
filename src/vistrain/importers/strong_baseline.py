"""reid-strong-baseline's yacs config (Luo et al. 2019, "Bag of Tricks and a Strong Baseline for Deep Person
Re-identification") -> a vistrain re-ID config. Key names and defaults are its config/defaults.py; a file leaves most
keys to them (configs/softmax_triplet.yml sets two dozen), and so does the import."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vistrain.importers.common import report_rest
from vistrain.importers.draft import Draft
from vistrain.importers.source import Source
from vistrain.importers.yacs import data_root, flag, names, normalisation, pk_sampler, reid_task

# config/defaults.py (the keys the mapping reads)
DEFAULTS = {
    "MODEL.DEVICE": "cuda", "MODEL.NAME": "resnet50", "MODEL.LAST_STRIDE": 1, "MODEL.PRETRAIN_PATH": "",
    "MODEL.PRETRAIN_CHOICE": "imagenet", "MODEL.NECK": "bnneck", "MODEL.IF_WITH_CENTER": "no",
    "MODEL.METRIC_LOSS_TYPE": "triplet", "MODEL.IF_LABELSMOOTH": "on", "INPUT.SIZE_TRAIN": [384, 128],
    "INPUT.SIZE_TEST": [384, 128], "INPUT.PROB": 0.5, "INPUT.RE_PROB": 0.5, "INPUT.PIXEL_MEAN": [0.485, 0.456, 0.406],
    "INPUT.PIXEL_STD": [0.229, 0.224, 0.225], "INPUT.PADDING": 10, "DATASETS.NAMES": "market1501",
    "DATASETS.ROOT_DIR": "./data", "DATALOADER.NUM_WORKERS": 8, "DATALOADER.SAMPLER": "softmax",
    "DATALOADER.NUM_INSTANCE": 16, "SOLVER.OPTIMIZER_NAME": "Adam", "SOLVER.MAX_EPOCHS": 50, "SOLVER.BASE_LR": 3e-4,
    "SOLVER.BIAS_LR_FACTOR": 2, "SOLVER.MOMENTUM": 0.9, "SOLVER.MARGIN": 0.3, "SOLVER.CENTER_LR": 0.5,
    "SOLVER.CENTER_LOSS_WEIGHT": 0.0005, "SOLVER.WEIGHT_DECAY": 0.0005, "SOLVER.WEIGHT_DECAY_BIAS": 0.0,
    "SOLVER.GAMMA": 0.1, "SOLVER.STEPS": [30, 55], "SOLVER.WARMUP_FACTOR": 1.0 / 3, "SOLVER.WARMUP_ITERS": 500,
    "SOLVER.WARMUP_METHOD": "linear", "SOLVER.CHECKPOINT_PERIOD": 50, "SOLVER.LOG_PERIOD": 100,
    "SOLVER.EVAL_PERIOD": 50, "SOLVER.IMS_PER_BATCH": 64, "TEST.IMS_PER_BATCH": 128, "TEST.RE_RANKING": "no",
    "TEST.NECK_FEAT": "after", "TEST.FEAT_NORM": "yes",
}
# data/datasets: name -> (folder under DATASETS.ROOT_DIR, train, query, gallery folders)
LAYOUTS = {"market1501": ("market1501", "bounding_box_train", "query", "bounding_box_test"),
           "dukemtmc": ("dukemtmc-reid/DukeMTMC-reID", "bounding_box_train", "query", "bounding_box_test"),
           "veri": ("veri", "image_train", "image_query", "image_test")}
# modeling/baseline.py's backbones -> timm's names (resnet50_ibn_a has none)
MODELS = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50", "resnet101": "resnet101",
          "resnet152": "resnet152", "se_resnet50": "seresnet50", "se_resnet101": "seresnet101",
          "se_resnet152": "seresnet152", "se_resnext50": "seresnext50_32x4d", "se_resnext101": "seresnext101_32x4d",
          "senet154": "senet154"}
OPTIMIZERS = {"Adam": "adam", "AdamW": "adamw", "SGD": "sgd"}
CHAIN = ("The strong baseline's training transform (data/transforms/build.py): resize to INPUT.SIZE_TRAIN (the "
         "preprocessor) -> horizontal flip (INPUT.PROB) -> pad INPUT.PADDING (black) -> random crop back -> "
         "normalise -> random erasing (INPUT.RE_PROB) of 2-40% of the area, filled with the mean.")
REASONS = {
    "MODEL.DEVICE_ID": "vistrain uses the GPUs CUDA_VISIBLE_DEVICES shows it (torchrun for several)",
    "TEST.WEIGHT": "vistrain evaluates a run: vistrain evaluate RUN",
    "OUTPUT_DIR": "vistrain writes each run under output.exp_dir/YYYYMMDD/<run_id>/",
}


def convert(keys: dict[str, Any], path: Path) -> Draft:
    src = Source(path, keys, DEFAULTS)
    d = Draft(f"reid-strong-baseline's yacs file {path} (keys it leaves out take the values of its "
              "config/defaults.py)")
    reid_task(d, path.stem, CHAIN)
    model = _model(src, d)
    root = Path(str(src.get("DATASETS.ROOT_DIR"))).expanduser().resolve()
    found = names(src.get("DATASETS.NAMES"))
    data_root(src, d, "DATASETS.NAMES", found[0], root, LAYOUTS)
    _loss(src, d)
    _solver(src, d)
    _input(src, d, model)
    _test(src, d)
    if src.get("MODEL.DEVICE") == "cpu":
        d.set("train.device", "cpu")
    report_rest(src, d, REASONS)
    return d


def _model(src: Source, d: Draft) -> str:
    name = str(src.get("MODEL.NAME"))
    model = MODELS.get(name, name)
    d.set("model.name", model)
    if name not in MODELS:
        d.note("MODEL.NAME", name, "no timm model of that name (IBN-a nets are not in timm): set model.name",
               target="model.name")
    stride = src.get("MODEL.LAST_STRIDE")
    if stride in (1, 2):
        d.set("model.last_stride", stride)
    else:
        d.note("MODEL.LAST_STRIDE", stride, "vistrain's last stride is 1 or 2", target="model.last_stride")
    choice, weights = src.get("MODEL.PRETRAIN_CHOICE"), src.get("MODEL.PRETRAIN_PATH")
    d.set("model.pretrained", choice == "imagenet")
    if choice == "imagenet" and weights:
        d.set("model.pretrained_path", str(Path(weights).expanduser().resolve()),
              "ImageNet weights (torchvision's names are timm's resnet names); nothing is downloaded")
    elif choice == "self":
        d.note("MODEL.PRETRAIN_CHOICE", choice, f"the baseline's own checkpoint {weights} names its backbone base.*: "
               "save those tensors without the prefix and set model.pretrained_path (or model.init_from to a "
               "vistrain run)")
    d.set("model.neck", "bnneck" if src.get("MODEL.NECK") == "bnneck" else "none")
    return model


def _loss(src: Source, d: Draft) -> None:
    """layers/__init__.py: with IF_WITH_CENTER the METRIC_LOSS_TYPE decides; without, DATALOADER.SAMPLER does
    (softmax: plain cross-entropy, triplet: triplet alone, softmax_triplet: both)."""
    sampler, metric = src.get("DATALOADER.SAMPLER"), src.get("MODEL.METRIC_LOSS_TYPE")
    smooth = flag(src.get("MODEL.IF_LABELSMOOTH"))
    ce = {"name": "ce", "weight": 1.0, "label_smoothing": 0.1 if smooth else 0.0}  # CrossEntropyLabelSmooth's 0.1
    triplet = {"name": "triplet", "weight": 1.0, "margin": src.get("SOLVER.MARGIN")}
    center = {"name": "center", "weight": src.get("SOLVER.CENTER_LOSS_WEIGHT"), "lr": src.get("SOLVER.CENTER_LR")}
    if flag(src.get("MODEL.IF_WITH_CENTER")):
        terms = [ce, center] if metric == "center" else [ce, triplet, center]
        d.note("SOLVER.CENTER_LR", center["lr"], "vistrain moves the centers by the center-loss paper's update with "
               "this step size, not by SGD on learnable centers", target="loss.terms")
    else:
        terms = {"softmax": [{**ce, "label_smoothing": 0.0}], "triplet": [triplet]}.get(sampler, [ce, triplet])
        for key in ("SOLVER.CENTER_LR", "SOLVER.CENTER_LOSS_WEIGHT"):
            src.inactive(key, "IF_WITH_CENTER no")
        if sampler == "softmax":
            src.inactive("MODEL.IF_LABELSMOOTH", "the softmax sampler's loss is plain cross-entropy")
    if all(t["name"] != "triplet" for t in terms):
        src.inactive("SOLVER.MARGIN", "no triplet loss")
    if metric not in ("triplet", "center", "triplet_center"):
        d.note("MODEL.METRIC_LOSS_TYPE", metric, "the baseline's code trains triplet, center or triplet_center only",
               target="loss.terms")
    for key in ("SOLVER.CLUSTER_MARGIN", "SOLVER.RANGE_K", "SOLVER.RANGE_MARGIN", "SOLVER.RANGE_ALPHA",
                "SOLVER.RANGE_BETA", "SOLVER.RANGE_LOSS_WEIGHT"):
        src.inactive(key, "no cluster or range loss in the baseline's code")
    d.set("loss.terms", terms)
    pk_sampler(src, d, sampler != "softmax", "SOLVER.IMS_PER_BATCH", "DATALOADER.NUM_INSTANCE")
    d.set("train.num_workers", src.get("DATALOADER.NUM_WORKERS"))


def _solver(src: Source, d: Draft) -> None:
    opt = str(src.get("SOLVER.OPTIMIZER_NAME"))
    if opt in ("Adam", "AdamW"):
        d.set("train.optimizer", OPTIMIZERS[opt])
        src.inactive("SOLVER.MOMENTUM", f"OPTIMIZER_NAME {opt}")
    elif opt == "SGD":
        d.approx("SOLVER.OPTIMIZER_NAME", opt, "train.optimizer", "sgd", "vistrain's sgd has Nesterov momentum")
        d.set("train.momentum", src.get("SOLVER.MOMENTUM"))
    else:
        d.approx("SOLVER.OPTIMIZER_NAME", opt, "train.optimizer", "adam", "vistrain has adam, adamw and sgd")
    d.set("train.epochs", src.get("SOLVER.MAX_EPOCHS"))
    d.set("train.lr", src.get("SOLVER.BASE_LR"))
    d.set("train.weight_decay", src.get("SOLVER.WEIGHT_DECAY"))
    d.note("SOLVER.WEIGHT_DECAY_BIAS", src.get("SOLVER.WEIGHT_DECAY_BIAS"), "vistrain decays no bias and no norm "
           "layer's weight (timm's rule); the baseline decays biases by this and BatchNorm weights by WEIGHT_DECAY",
           target="train.weight_decay")
    if src.get("SOLVER.BIAS_LR_FACTOR") != 1:
        d.note("SOLVER.BIAS_LR_FACTOR", src.get("SOLVER.BIAS_LR_FACTOR"), "vistrain trains biases at train.lr",
               target="train.lr")
    d.set("train.scheduler", "step")
    d.set("train.step_milestones", [int(s) for s in src.get("SOLVER.STEPS")])
    d.set("train.step_gamma", src.get("SOLVER.GAMMA"))
    d.set("train.warmup_lr_factor", src.get("SOLVER.WARMUP_FACTOR"))
    warmup = src.get("SOLVER.WARMUP_ITERS")
    d.set("train.warmup_epochs", warmup, "epochs: the baseline steps its schedule once per epoch")
    # ignite's EPOCH_STARTED steps the scheduler before each epoch, counting from 1 (solver/lr_scheduler.py)
    if warmup:
        d.note("SOLVER.WARMUP_ITERS", warmup, "the baseline's first epoch is already 1/WARMUP_ITERS into its warm-up "
               "and the rate rises once per epoch; vistrain's rises every update from WARMUP_FACTOR x lr over these "
               "epochs", target="train.warmup_epochs")
    d.note("SOLVER.STEPS", src.get("SOLVER.STEPS"), "the baseline decays at the start of epoch STEP counting from 1, "
           "one epoch before vistrain's milestone (which counts finished epochs)", target="train.step_milestones")
    if src.get("SOLVER.WARMUP_METHOD") != "linear":
        d.note("SOLVER.WARMUP_METHOD", src.get("SOLVER.WARMUP_METHOD"), "vistrain's warm-up is linear",
               target="train.warmup_epochs")
    d.set("train.save_every_n_epochs", src.get("SOLVER.CHECKPOINT_PERIOD"))
    d.set("train.log_interval", src.get("SOLVER.LOG_PERIOD"))
    d.set("train.eval_every_n_epochs", src.get("SOLVER.EVAL_PERIOD"))


def _input(src: Source, d: Draft, model: str) -> None:
    size = [int(v) for v in src.get("INPUT.SIZE_TRAIN")]
    d.set("train.img_size", size)
    if [int(v) for v in src.get("INPUT.SIZE_TEST")] != size:
        d.note("INPUT.SIZE_TEST", src.get("INPUT.SIZE_TEST"), "vistrain evaluates at train.img_size")
    d.set("augment.hflip", src.get("INPUT.PROB"))
    pad = int(src.get("INPUT.PADDING"))
    d.set("augment.crop", "pad_crop" if pad else "none")
    if pad:
        d.set("augment.pad", pad)
    erase = src.get("INPUT.RE_PROB")
    d.set("augment.random_erasing", erase)
    if erase:
        d.set("augment.erasing_mode", "const")
        d.set("augment.erasing_area", [0.02, 0.4], "the baseline's RandomErasing sl 0.02, sh 0.4")
        d.note("INPUT.RE_PROB", erase, "vistrain fills the erased rectangle with the mean pixel (0 after normalising); "
               "the baseline writes the mean's numbers into the normalised tensor", target="augment.erasing_mode")
    normalisation(src, d, model, ("INPUT.PIXEL_MEAN", "INPUT.PIXEL_STD"))


def _test(src: Source, d: Draft) -> None:
    d.set("eval.batch_size", src.get("TEST.IMS_PER_BATCH"))
    d.set("eval.feat_norm", flag(src.get("TEST.FEAT_NORM")))
    d.set("eval.rerank", flag(src.get("TEST.RE_RANKING")))
    if src.get("TEST.NECK_FEAT") != "after":
        d.note("TEST.NECK_FEAT", src.get("TEST.NECK_FEAT"), "vistrain evaluates the feature after the BNNeck "
               "(model.neck: none has no BNNeck, and trains without it too)")
