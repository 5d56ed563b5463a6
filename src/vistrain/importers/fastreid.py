"""fast-reid's yacs config (v1: MODEL.BACKBONE / HEADS / LOSSES, SOLVER.MAX_EPOCH, INPUT.REA ...) -> a vistrain re-ID
config. Key names and defaults are its fastreid/config/defaults.py; ``_BASE_`` files are merged first (yacs.py).
fast-reid counts its warm-up in iterations and starts its MultiStepLR after it: both become epochs when the data
set's size is known (its documented training-image counts), else the [IMPORT] line says what to set."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from vistrain.importers.common import model_defaults, report_rest, same_floats
from vistrain.importers.draft import Draft
from vistrain.importers.fastreid_keys import DEFAULTS, LAYOUTS, POOLS, REASONS, TRAIN_IMAGES
from vistrain.importers.source import Source
from vistrain.importers.yacs import IMAGENET_MEAN, data_root, names, normalisation, pk_sampler, reid_task

CHAIN = ("fast-reid's training transform (fastreid/data/transforms/build.py): resize to INPUT.SIZE_TRAIN (bicubic) -> "
         "pad INPUT.PADDING.SIZE and random crop back -> horizontal flip -> random erasing (INPUT.REA, torchvision's: "
         "2-33% of the area, filled with the mean).")
OPTIMIZERS = {"Adam": "adam", "AdamW": "adamw", "SGD": "sgd"}
HEADS = {"Linear": "linear", "ArcSoftmax": "arcface", "CosSoftmax": "cosface"}


def convert(keys: dict[str, Any], path: Path) -> Draft:
    src = Source(path, keys, DEFAULTS)
    d = Draft(f"fast-reid's yacs file {path} (keys it and its _BASE_ files leave out take the values of "
              "fastreid/config/defaults.py)")
    reid_task(d, path.stem, CHAIN)
    found = names(src.get("DATASETS.NAMES"))
    root = Path(os.environ.get("FASTREID_DATASETS", "datasets")).expanduser().resolve()  # fastreid/data/build.py
    data_root(src, d, "DATASETS.NAMES", found[0], root, LAYOUTS)
    if len(found) > 1 or src.get("DATASETS.COMBINEALL"):
        d.note("DATASETS.NAMES", found, "vistrain trains on one re-ID data set (data.root)", target="data.root")
    if names(src.get("DATASETS.TESTS")) != found[:1]:
        d.note("DATASETS.TESTS", src.get("DATASETS.TESTS"), "vistrain evaluates on the query / gallery folders of "
               "data.root")
    batch = int(src.get("SOLVER.IMS_PER_BATCH"))
    images = sum(TRAIN_IMAGES.get(name, 0) for name in found) if all(n in TRAIN_IMAGES for n in found) else 0
    per_epoch = images // batch if images else None  # fast-reid's iters_per_epoch (fastreid/engine/defaults.py)
    model = _model(src, d)
    _heads(src, d)
    _losses(src, d)
    pk_sampler(src, d, src.get("DATALOADER.SAMPLER_TRAIN") != "TrainingSampler", "SOLVER.IMS_PER_BATCH",
               "DATALOADER.NUM_INSTANCE")
    d.set("train.num_workers", src.get("DATALOADER.NUM_WORKERS"))
    _solver(src, d, per_epoch, found)
    _input(src, d, model)
    _test(src, d)
    if src.get("MODEL.DEVICE") == "cpu":
        d.set("train.device", "cpu")
    src.get("CUDNN_BENCHMARK")  # vistrain turns cuDNN's benchmark mode on for its GPU runs
    _switched_off(src)
    report_rest(src, d, REASONS)
    return d


def _model(src: Source, d: Draft) -> str:
    backbone = src.get("MODEL.BACKBONE.NAME")
    depth = str(src.get("MODEL.BACKBONE.DEPTH")).removesuffix("x")
    model = f"resnet{depth}" if backbone == "build_resnet_backbone" else str(backbone)
    d.set("model.name", model)
    if backbone != "build_resnet_backbone":
        d.note("MODEL.BACKBONE.NAME", backbone, "set model.name to the timm name of this backbone",
               target="model.name")
    for key, what in (("MODEL.BACKBONE.WITH_IBN", "IBN-a blocks (not in timm)"),
                      ("MODEL.BACKBONE.WITH_SE", "SE blocks (timm: seresnet50 ...)"),
                      ("MODEL.BACKBONE.WITH_NL", "non-local blocks")):
        if src.get(key):
            d.note(key, True, f"vistrain's {model} has no {what}", target="model.name")
    d.set("model.last_stride", src.get("MODEL.BACKBONE.LAST_STRIDE"))
    d.set("model.pretrained", bool(src.get("MODEL.BACKBONE.PRETRAIN")))
    weights = src.get("MODEL.BACKBONE.PRETRAIN_PATH")
    if src.get("MODEL.BACKBONE.PRETRAIN") and weights:
        d.set("model.pretrained_path", str(Path(weights).expanduser().resolve()), "nothing is downloaded")
    norm = src.get("MODEL.BACKBONE.NORM")
    if norm == "syncBN":
        d.set("train.sync_bn", True)
    elif norm != "BN":
        d.note("MODEL.BACKBONE.NORM", norm, "vistrain keeps the model's BatchNorm (train.sync_bn for SyncBN)")
    src.get("MODEL.BACKBONE.FEAT_DIM")  # vistrain reads the backbone's width from timm
    if src.get("MODEL.META_ARCHITECTURE") != "Baseline":
        d.note("MODEL.META_ARCHITECTURE", src.get("MODEL.META_ARCHITECTURE"), "vistrain's embedding model is "
               "fast-reid's Baseline: backbone -> pooling -> BNNeck -> classifier")
    return model


def _heads(src: Source, d: Draft) -> None:
    d.set("model.neck", "bnneck" if src.get("MODEL.HEADS.WITH_BNNECK") else "none")
    pool = src.get("MODEL.HEADS.POOL_LAYER")
    if pool in POOLS:
        d.set("model.pooling", POOLS[pool])
    else:
        d.approx("MODEL.HEADS.POOL_LAYER", pool, "model.pooling", "avg", "vistrain pools avg, max, avgmax, "
                 "catavgmax or gem")
    dim = src.get("MODEL.HEADS.EMBEDDING_DIM")
    if dim:
        d.set("model.embedding_dim", dim, "a bias-free projection after the pooling, as fast-reid's 1x1 conv")
    cls = src.get("MODEL.HEADS.CLS_LAYER")
    head = HEADS.get(cls[:1].upper() + cls[1:] if isinstance(cls, str) else cls)
    if head is None:
        d.approx("MODEL.HEADS.CLS_LAYER", cls, "model.head", "linear", "vistrain's heads: linear, arcface, cosface")
        head = "linear"
    d.set("model.head", head)
    if cls in ("Linear", "linear"):
        for key in ("MODEL.HEADS.SCALE", "MODEL.HEADS.MARGIN"):
            src.inactive(key, f"CLS_LAYER {cls}")
    elif head == "linear":  # a margin head vistrain has not: its CLS_LAYER note covers its scale and margin
        src.get("MODEL.HEADS.SCALE")
        src.get("MODEL.HEADS.MARGIN")
    else:
        d.set("model.arcface_s", float(src.get("MODEL.HEADS.SCALE")))
        d.set("model.arcface_m_finetune", float(src.get("MODEL.HEADS.MARGIN")))
    if src.get("MODEL.HEADS.NECK_FEAT") != "before":
        d.note("MODEL.HEADS.NECK_FEAT", src.get("MODEL.HEADS.NECK_FEAT"), "vistrain's triplet and center terms see "
               "the feature before the BNNeck (fast-reid's before)", target="loss.terms")
    if src.get("MODEL.HEADS.NAME") != "EmbeddingHead":
        d.note("MODEL.HEADS.NAME", src.get("MODEL.HEADS.NAME"), "vistrain's head is fast-reid's EmbeddingHead")
    for key in ("MODEL.HEADS.NORM", "MODEL.HEADS.NUM_CLASSES"):  # BN neck; the classes come from the data
        src.get(key)


def _losses(src: Source, d: Draft) -> None:
    chosen = names(src.get("MODEL.LOSSES.NAME"))
    terms: list[dict[str, Any]] = []
    if "CrossEntropyLoss" in chosen:
        eps = float(src.get("MODEL.LOSSES.CE.EPSILON"))
        terms.append({"name": "ce", "weight": float(src.get("MODEL.LOSSES.CE.SCALE")),
                      "label_smoothing": max(eps, 0.0)})
        if eps < 0:
            d.note("MODEL.LOSSES.CE.EPSILON", eps, "no adaptive label smoothing in vistrain: none", target="loss.terms")
        elif eps > 0:
            d.note("MODEL.LOSSES.CE.EPSILON", eps, "fast-reid spreads it over the other C-1 classes, torch's "
                   "label_smoothing over all C (the true class keeps 1-eps+eps/C): equal up to eps/C",
                   target="loss.terms")
        if eps >= 0:
            src.inactive("MODEL.LOSSES.CE.ALPHA", "EPSILON >= 0")
    if "TripletLoss" in chosen:
        margin = float(src.get("MODEL.LOSSES.TRI.MARGIN"))
        terms.append({"name": "triplet", "weight": float(src.get("MODEL.LOSSES.TRI.SCALE")),
                      "margin": margin if margin > 0 else None})  # fast-reid: margin 0 is the soft margin
        if not src.get("MODEL.LOSSES.TRI.HARD_MINING"):
            d.note("MODEL.LOSSES.TRI.HARD_MINING", False, "vistrain mines the hardest positive and negative "
                   "(fast-reid's weighted mining is not in vistrain)", target="loss.terms")
        if src.get("MODEL.LOSSES.TRI.NORM_FEAT"):
            d.note("MODEL.LOSSES.TRI.NORM_FEAT", True, "vistrain's triplet term uses Euclidean distances of the raw "
                   "features", target="loss.terms")
    for other in [n for n in chosen if n not in ("CrossEntropyLoss", "TripletLoss")]:
        d.note("MODEL.LOSSES.NAME", other, "no such loss term in vistrain (ce, triplet, center)", target="loss.terms")
    for key in [k for k in src.keys if k.startswith("MODEL.LOSSES.") and k not in src.used]:
        src.inactive(key, "a loss not in MODEL.LOSSES.NAME")
    d.set("loss.terms", terms or [{"name": "ce", "weight": 1.0}])


def _solver(src: Source, d: Draft, per_epoch: int | None, found: list[str]) -> None:
    opt = str(src.get("SOLVER.OPT"))
    d.set("train.optimizer", OPTIMIZERS.get(opt, "adam"))
    if opt not in OPTIMIZERS:
        d.note("SOLVER.OPT", opt, "vistrain has adam, adamw and sgd", target="train.optimizer")
    if opt == "SGD":
        d.set("train.momentum", src.get("SOLVER.MOMENTUM"))
        if not src.get("SOLVER.NESTEROV"):
            d.note("SOLVER.NESTEROV", False, "vistrain's sgd has Nesterov momentum", target="train.optimizer")
    else:
        for key in ("SOLVER.MOMENTUM", "SOLVER.NESTEROV"):
            src.inactive(key, f"OPT {opt}")
    lr, heads = float(src.get("SOLVER.BASE_LR")), float(src.get("SOLVER.HEADS_LR_FACTOR"))
    d.set("train.lr", lr * heads)
    if heads != 1:
        d.set("train.backbone_lr_mult", 1 / heads, f"the heads train at BASE_LR x {heads:g}, the backbone at BASE_LR")
    d.set("train.weight_decay", src.get("SOLVER.WEIGHT_DECAY"))
    for key in ("SOLVER.WEIGHT_DECAY_NORM", "SOLVER.WEIGHT_DECAY_BIAS"):
        if src.get(key):
            d.note(key, src.get(key), "vistrain decays no bias and no norm layer's weight (timm's rule)",
                   target="train.weight_decay")
    if src.get("SOLVER.BIAS_LR_FACTOR") != 1:
        d.note("SOLVER.BIAS_LR_FACTOR", src.get("SOLVER.BIAS_LR_FACTOR"), "vistrain trains biases at train.lr")
    d.set("train.epochs", src.get("SOLVER.MAX_EPOCH"))
    if src.get("SOLVER.AMP.ENABLED"):
        d.set("train.amp", "fp16", "torch.cuda.amp's float16 with a grad scaler, as fast-reid")
    else:
        d.set("train.amp", "fp32", "fast-reid without AMP trains in float32")
    _schedule(src, d, per_epoch, found)
    if src.get("SOLVER.CLIP_GRADIENTS.ENABLED"):
        d.approx("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", src.get("SOLVER.CLIP_GRADIENTS.CLIP_VALUE"),
                 "train.grad_clip_norm", float(src.get("SOLVER.CLIP_GRADIENTS.CLIP_VALUE")),
                 "vistrain clips the norm of all gradients together, fast-reid each parameter's "
                 f"{src.get('SOLVER.CLIP_GRADIENTS.CLIP_TYPE')}")
    else:
        for key in ("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
                    "SOLVER.CLIP_GRADIENTS.NORM_TYPE"):
            src.inactive(key, "CLIP_GRADIENTS off")
    d.set("train.save_every_n_epochs", src.get("SOLVER.CHECKPOINT_PERIOD"))


def _schedule(src: Source, d: Draft, per_epoch: int | None, found: list[str]) -> None:
    warm, factor = int(src.get("SOLVER.WARMUP_ITERS")), src.get("SOLVER.WARMUP_FACTOR")
    unknown = (f"iterations; the epoch length (training images // IMS_PER_BATCH) of {', '.join(found)} is not known "
               "here")
    if warm and per_epoch:
        d.set("train.warmup_epochs", round(warm / per_epoch, 4), f"{warm} iterations / {per_epoch} per epoch")
    elif warm:
        d.note("SOLVER.WARMUP_ITERS", warm, f"{unknown}: set train.warmup_epochs to it / that length",
               target="train.warmup_epochs")
    else:
        d.set("train.warmup_epochs", 0)
    d.set("train.warmup_lr_factor", factor)
    if src.get("SOLVER.WARMUP_METHOD") != "linear":
        d.note("SOLVER.WARMUP_METHOD", src.get("SOLVER.WARMUP_METHOD"), "vistrain's warm-up is linear",
               target="train.warmup_epochs")
    sched, delay = src.get("SOLVER.SCHED"), int(src.get("SOLVER.DELAY_EPOCHS") or 0)
    # fastreid/engine/hooks.py: the epoch scheduler steps after each epoch whose last iteration ends the warm-up or
    # comes later (and after DELAY_EPOCHS): the epochs before it do not count towards STEPS
    skipped = max(math.ceil(warm / per_epoch) - 1, delay) if per_epoch else delay
    if sched == "MultiStepLR":
        d.set("train.scheduler", "step")
        steps = [int(s) + skipped for s in src.get("SOLVER.STEPS")]
        d.set("train.step_milestones", steps, f"STEPS + {skipped}: fast-reid counts them from the warm-up's last "
              "epoch" if skipped else None)
        if warm and not per_epoch:
            d.note("SOLVER.STEPS", src.get("SOLVER.STEPS"), f"fast-reid counts them after the warm-up ({unknown}): "
                   "add its epochs", target="train.step_milestones")
        d.set("train.step_gamma", src.get("SOLVER.GAMMA"))
        src.inactive("SOLVER.ETA_MIN_LR", "SCHED MultiStepLR")
    else:
        d.set("train.scheduler", "cosine")
        d.set("train.min_lr", src.get("SOLVER.ETA_MIN_LR"))
        for key in ("SOLVER.STEPS", "SOLVER.GAMMA"):
            src.inactive(key, f"SCHED {sched}")
        if sched != "CosineAnnealingLR":
            d.note("SOLVER.SCHED", sched, "vistrain schedules step or cosine here", target="train.scheduler")
        if delay:
            d.note("SOLVER.DELAY_EPOCHS", delay, "vistrain's cosine starts after the warm-up, with no constant "
                   "epochs before it", target="train.scheduler")
    freeze = int(src.get("SOLVER.FREEZE_ITERS") or 0)
    layers = src.get("MODEL.FREEZE_LAYERS") or []
    if freeze and "backbone" in layers and per_epoch:
        d.set("train.freeze_backbone_epochs", max(round(freeze / per_epoch), 1), f"{freeze} iterations")
    elif freeze and layers:
        d.note("SOLVER.FREEZE_ITERS", freeze, f"vistrain freezes the whole backbone for whole epochs "
               f"(train.freeze_backbone_epochs), not {', '.join(map(str, layers))} for iterations")
    elif freeze:
        src.inactive("SOLVER.FREEZE_ITERS", "FREEZE_LAYERS empty")
    elif layers:
        src.inactive("MODEL.FREEZE_LAYERS", "FREEZE_ITERS 0")


def _input(src: Source, d: Draft, model: str) -> None:
    size = [int(v) for v in src.get("INPUT.SIZE_TRAIN")]
    d.set("train.img_size", size)
    d.set("preprocess.resize.interpolation", "bicubic", "fast-reid's T.Resize(interpolation=3)")
    if [int(v) for v in src.get("INPUT.SIZE_TEST")] != size:
        d.note("INPUT.SIZE_TEST", src.get("INPUT.SIZE_TEST"), "vistrain evaluates at train.img_size")
    d.set("augment.hflip", src.get("INPUT.FLIP.PROB") if src.get("INPUT.FLIP.ENABLED") else 0.0)
    if not src.get("INPUT.FLIP.ENABLED"):
        src.inactive("INPUT.FLIP.PROB", "FLIP off")
    pad, crop = src.get("INPUT.PADDING.ENABLED"), src.get("INPUT.CROP.ENABLED")
    d.set("augment.crop", "pad_crop" if pad else "rrc" if crop else "none")
    if pad:
        d.set("augment.pad", int(src.get("INPUT.PADDING.SIZE")))
        if src.get("INPUT.PADDING.MODE") != "constant":
            d.note("INPUT.PADDING.MODE", src.get("INPUT.PADDING.MODE"), "vistrain pads black (constant)",
                   target="augment.pad")
    else:
        for key in ("INPUT.PADDING.SIZE", "INPUT.PADDING.MODE"):
            src.inactive(key, "PADDING off")
    if crop:
        d.note("INPUT.CROP.ENABLED", True, "fast-reid's random resized crop to CROP.SIZE" + (
            " beside the pad-and-crop: vistrain has one crop, pad_crop" if pad else
            ": vistrain's crop: rrc with its scale and ratio, at train.img_size"), target="augment.crop")
        if not pad:
            d.set("augment.scale", [float(v) for v in src.get("INPUT.CROP.SCALE")])
            d.set("augment.ratio", [float(v) for v in src.get("INPUT.CROP.RATIO")])
    else:
        for key in ("INPUT.CROP.SIZE", "INPUT.CROP.SCALE", "INPUT.CROP.RATIO"):
            src.inactive(key, "CROP off")
    _colour(src, d)
    erase = src.get("INPUT.REA.PROB") if src.get("INPUT.REA.ENABLED") else 0.0
    d.set("augment.random_erasing", erase)
    if erase:
        d.set("augment.erasing_mode", "const")
        fill = [float(v) / 255 for v in src.get("INPUT.REA.VALUE")]
        if not same_floats(fill, (model_defaults(model) or {}).get("mean", IMAGENET_MEAN), tol=5e-3):
            d.note("INPUT.REA.VALUE", src.get("INPUT.REA.VALUE"), "vistrain's const erasing fills the model's mean "
                   "pixel", target="augment.erasing_mode")
    else:
        for key in ("INPUT.REA.PROB", "INPUT.REA.VALUE"):
            src.inactive(key, "REA off")
    normalisation(src, d, model, ("MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD"), scale=255.0)


def _colour(src: Source, d: Draft) -> None:
    for part, what in (("AFFINE", "a random affine"), ("AUTOAUG", "AutoAugment"), ("AUGMIX", "AugMix"),
                       ("RPT", "random patch")):
        if src.get(f"INPUT.{part}.ENABLED"):
            d.note(f"INPUT.{part}.ENABLED", True, f"not carried: {what} is not in vistrain's re-ID chain "
                   "(augment.auto takes timm's policies; augment.albumentations a pipeline)")
            src.get(f"INPUT.{part}.PROB")
    if not src.get("INPUT.CJ.ENABLED"):
        for key in ("INPUT.CJ.PROB", "INPUT.CJ.BRIGHTNESS", "INPUT.CJ.CONTRAST", "INPUT.CJ.SATURATION", "INPUT.CJ.HUE"):
            src.inactive(key, "CJ off")
        return
    strength = max(float(src.get(f"INPUT.CJ.{k}")) for k in ("BRIGHTNESS", "CONTRAST", "SATURATION"))
    d.approx("INPUT.CJ.PROB", src.get("INPUT.CJ.PROB"), "augment.color_jitter", strength, "vistrain jitters every "
             "image, with one strength for brightness, contrast and saturation (their largest)")
    d.set("augment.hue", float(src.get("INPUT.CJ.HUE")))


def _test(src: Source, d: Draft) -> None:
    d.set("train.eval_every_n_epochs", src.get("TEST.EVAL_PERIOD"))
    d.set("eval.batch_size", src.get("TEST.IMS_PER_BATCH"))
    d.set("eval.feat_norm", src.get("TEST.METRIC") == "cosine")
    d.set("eval.flip_feats", bool(src.get("TEST.FLIP.ENABLED")))
    d.set("eval.rerank", bool(src.get("TEST.RERANK.ENABLED")))
    if src.get("TEST.RERANK.ENABLED"):
        given = tuple(src.get(f"TEST.RERANK.{k}") for k in ("K1", "K2", "LAMBDA"))
        if given != (20, 6, 0.3):
            d.note("TEST.RERANK", list(given), "vistrain re-ranks with k1 20, k2 6, lambda 0.3", target="eval.rerank")
    else:
        for key in ("TEST.RERANK.K1", "TEST.RERANK.K2", "TEST.RERANK.LAMBDA"):
            src.inactive(key, "RERANK off")


def _switched_off(src: Source) -> None:
    """fast-reid's sections with an ENABLED key (INPUT.REA, SOLVER.SWA, TEST.AQE ...): when it is off, their other
    keys change nothing; when it is on and has no vistrain equivalent, its own note covers them."""
    for key in [k for k in src.keys if k.endswith(".ENABLED")]:
        section = key.removesuffix("ENABLED")
        rest = [k for k in src.keys if k.startswith(section) and k != key and k not in src.used]
        for other in rest:
            if src.peek(key):
                src.used.add(other)
            else:
                src.inactive(other, f"{section[:-1]} off")
