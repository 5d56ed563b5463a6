"""timm train.py's ``args.yaml`` (its argparse namespace, written into the run's output folder) -> a vistrain
classification config. Key names and defaults are those of timm's train.py (timm 1.0); a partial file (the YAML
``train.py -c`` reads) takes train.py's defaults for the keys it leaves out, as train.py does."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from vistrain.importers.common import model_defaults, report_rest
from vistrain.importers.draft import Draft, section_block
from vistrain.importers.source import Source, is_unset
from vistrain.importers.timm_keys import DEFAULTS, DEPENDS, REASONS

EXACT_OPT = {"adamw": "adamw", "adam": "adam", "sgd": "sgd", "nesterov": "sgd", "fusedadamw": "adamw",
             "fusedadam": "adam", "fusedsgd": "sgd"}
POOLS = {"avg": "avg", "max": "max", "avgmax": "avgmax", "catavgmax": "catavgmax"}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
MONITORS = {"top1": "accuracy", "loss": "valid_loss"}


def convert(data: dict[str, Any], path: Path) -> Draft:
    src = Source(path, data, DEFAULTS)
    draft = Draft(f"timm train.py's args.yaml {path}")
    model = _model(src, draft, path)
    _data(src, draft)
    _preprocess(src, draft, model_defaults(model))
    lr = _optimizer(src, draft)
    _schedule(src, draft, lr)
    _augment(src, draft)
    _loop(src, draft)
    for key, parent in DEPENDS.items():
        if key in src.left() and is_unset(src.peek(parent)):
            src.inactive(key, f"{parent} unset")
    report_rest(src, draft, REASONS)
    return draft


def _model(src: Source, d: Draft, path: Path) -> str:
    name = src.get("model")
    d.set("project.name", src.get("experiment") or path.resolve().parent.name or str(name))
    d.set("project.seed", src.get("seed"))
    d.set("model.name", name)
    if model_defaults(name) is None:
        d.note("model", name, "not a model name this timm knows: set model.name to one (timm.list_models())",
               target="model.name")
    d.set("model.pretrained", bool(src.get("pretrained")))
    weights = src.get("pretrained_path") or src.get("initial_checkpoint")
    if weights:
        d.set("model.pretrained_path", str(Path(weights).expanduser().resolve()),
              "the tensors whose names and shapes match load; nothing is downloaded")
    pool = src.get("gp")
    if pool in POOLS:
        d.set("model.pooling", POOLS[pool])
    elif pool:
        d.approx("gp", pool, "model.pooling", "avg", "vistrain pools avg, max, avgmax, catavgmax or gem")
    drop_path = src.get("drop_path")
    connect = src.get("drop_connect")
    d.set("model.drop_rate", src.get("drop"))
    if drop_path is not None or connect is not None:
        d.set("model.drop_path_rate", drop_path if drop_path is not None else connect)
    return name


def _data(src: Source, d: Draft) -> None:
    root = src.get("data_dir") or src.get("data")
    kind = src.get("dataset") or ""
    split = src.get("train_split")
    d.set("data.source", "folders")
    if kind and not kind.startswith("folder"):
        d.note("dataset", kind, "vistrain reads image files (class folders, a CSV or a manifest), not timm's "
                                "torch/, hfds/, tfds/ or wds/ data sets: write the images as class folders and set "
                                "data.image_dir_train")
    if root:
        folder = Path(root).expanduser().resolve()
        # timm's folder data set reads root/<split> when that folder exists, else root itself
        train_dir = folder / split if (folder / split).is_dir() or not folder.is_dir() else folder
        d.set("data.image_dir_train", str(train_dir), "one sub-folder per class, as timm's ImageFolder")
    else:
        d.note("data_dir", root, "no data folder in the source: set data.image_dir_train (one sub-folder per class)")
    d.set("data.folds", 5)
    d.set("data.valid_fold", 0)
    d.note("val_split", src.get("val_split"), "vistrain validates on a held-out fold of the training images "
           "(data.folds: 5, data.valid_fold: 0), not on a second folder; to keep timm's split, list both folders "
           "in a data.manifest with a split column and set data.split: ratio")


def _preprocess(src: Source, d: Draft, defaults: dict[str, Any] | None) -> None:
    size = src.get("input_size")
    img = src.get("img_size")
    if size:
        d.set("train.img_size", size[1] if size[1] == size[2] else [size[1], size[2]])
    elif img:
        d.set("train.img_size", img)
    elif defaults:
        h, w = defaults["input_size"][1:]
        d.set("train.img_size", h if h == w else [h, w], "the model's own (timm pretrained_cfg), as train.py")
    interpolation = src.get("interpolation")
    if interpolation in INTERPOLATIONS:
        d.set("preprocess.resize.interpolation", interpolation)
    elif interpolation:
        d.approx("interpolation", interpolation, "preprocess.resize.interpolation", "bilinear",
                 "vistrain resizes with bilinear, bicubic, area or nearest")
    elif defaults and defaults.get("interpolation") in INTERPOLATIONS:
        d.set("preprocess.resize.interpolation", defaults["interpolation"], "the model's own (timm pretrained_cfg)")
    for key in ("mean", "std"):
        value = src.get(key)
        if value:
            d.set(f"preprocess.{key}", list(value) * 3 if len(value) == 1 else list(value))
    if src.given("train_interpolation") and src.get("train_interpolation") not in (interpolation, None, ""):
        d.note("train_interpolation", src.get("train_interpolation"), "vistrain resizes every image once with "
               "preprocess.resize.interpolation (its random resized crop is bilinear); timm's 'random' draws bilinear "
               "or bicubic per training image")


def _optimizer(src: Source, d: Draft) -> float:
    opt = str(src.get("opt")).lower()
    base = opt.removeprefix("lookahead_")
    if base != opt:
        d.note("opt", opt, "no Lookahead in vistrain: the optimizer below runs without it")
    if base in EXACT_OPT:
        d.set("train.optimizer", EXACT_OPT[base])
    elif base in ("momentum", "fusedmomentum"):
        d.approx("opt", opt, "train.optimizer", "sgd", "vistrain's sgd has Nesterov momentum, timm's momentum not")
    else:
        d.approx("opt", opt, "train.optimizer", "adamw", f"no {base} in vistrain (adamw, adam, sgd): the nearest "
                 "general optimizer; check train.lr, which was tuned for the other one")
    lr = _lr(src, d)
    d.set("train.lr", lr)
    d.set("train.weight_decay", src.get("weight_decay"))
    if d.values["train.optimizer"] == "sgd":
        d.set("train.momentum", src.get("momentum"))
    else:
        src.inactive("momentum", f"opt {opt}")
    return lr


def _lr(src: Source, d: Draft) -> float:
    """timm 1.0 leaves --lr unset and derives it from --lr-base at the global batch size (train.py, at start)."""
    lr = src.get("lr")
    keys = ("lr_base", "lr_base_size", "lr_base_scale")
    if lr:
        for key in keys:
            src.inactive(key, "lr set")
        return float(lr)
    base, size, scale = (src.get(k) for k in keys)
    batch = src.get("batch_size") * (src.get("grad_accum_steps") or 1)
    if not scale:
        scale = "sqrt" if any(o in str(src.get("opt")).lower() for o in ("ada", "lamb")) else "linear"
    ratio = batch / size
    value = float(base * (math.sqrt(ratio) if scale == "sqrt" else ratio))
    d.comments.setdefault("train.lr", []).append(
        f"lr_base {base} x ({batch} / {size}) ({scale}), as timm computes it for one process; with N processes "
        f"timm uses the global batch: N x {batch}")
    return value


READ_BY = {"decay_epochs": ("step",), "decay_milestones": ("multistep",), "patience_epochs": ("plateau",),
           "decay_rate": ("step", "multistep", "plateau")}


def _schedule(src: Source, d: Draft, lr: float) -> None:
    sched = str(src.get("sched"))
    epochs = int(src.get("epochs"))
    d.set("train.epochs", epochs)
    for key, scheds in READ_BY.items():
        if sched not in scheds:
            src.inactive(key, f"sched {sched}")
    if sched == "cosine" and (src.get("lr_cycle_limit") or 1) > 1:
        _restarts(src, d, epochs)
    else:
        for key in ("lr_cycle_limit", "lr_cycle_mul", "lr_cycle_decay"):
            src.inactive(key, "lr_cycle_limit 1")
        if sched in ("cosine", "step", "multistep", "plateau"):
            d.set("train.scheduler", {"multistep": "step"}.get(sched, sched))
        else:
            d.approx("sched", sched, "train.scheduler", "cosine", "vistrain schedules cosine, step, plateau, "
                     "cosine_restarts or none; cosine is the nearest decay to zero")
    if src.get("lr_k_decay") not in (1, None):
        d.note("lr_k_decay", src.get("lr_k_decay"), "vistrain's cosine has no k-decay", target="train.scheduler")
    if sched == "step" and src.get("decay_epochs") > 0:
        every = src.get("decay_epochs")
        d.set("train.step_milestones", [round(every * i) for i in range(1, math.ceil(epochs / every))])
    elif sched == "multistep":
        d.set("train.step_milestones", [int(m) for m in src.get("decay_milestones")])
    elif sched == "plateau":
        d.set("train.plateau_patience", src.get("patience_epochs"))
    if sched in READ_BY["decay_rate"]:
        d.set("train.step_gamma", src.get("decay_rate"))
    if sched in ("step", "multistep"):
        src.inactive("min_lr", f"sched {sched} has no floor")
    else:
        d.set("train.min_lr", src.get("min_lr"))
    _warmup(src, d, lr, sched)


def _restarts(src: Source, d: Draft, epochs: int) -> None:
    cycles, mult = int(src.get("lr_cycle_limit")), float(src.get("lr_cycle_mul") or 1.0)
    d.set("train.scheduler", "cosine_restarts")
    d.set("train.restart_epochs", epochs)
    d.set("train.restart_mult", mult)
    d.set("train.epochs", round(sum(epochs * mult**i for i in range(cycles))), "every cycle, as timm trains them")
    decay = src.get("lr_cycle_decay")
    if decay != 1:
        d.note("lr_cycle_decay", decay, "vistrain restarts every cycle at the full train.lr", target="train.scheduler")


def _warmup(src: Source, d: Draft, lr: float, sched: str) -> None:
    warmup = src.get("warmup_epochs")
    d.set("train.warmup_epochs", warmup)
    warmup_lr = src.get("warmup_lr")
    if warmup and lr > 0:
        factor = min(max(float(warmup_lr) / lr, 1e-6), 1.0)
        d.set("train.warmup_lr_factor", float(f"{factor:.6g}"), f"warmup_lr {warmup_lr} / lr")
    else:
        src.inactive("warmup_lr", "warmup_epochs 0")
    if src.get("warmup_prefix"):
        d.note("warmup_prefix", True, "vistrain's warm-up is the first epochs of the schedule, not epochs added "
               "before it", target="train.warmup_epochs")
    if src.given("sched_on_updates") and not src.get("sched_on_updates") and sched != "plateau":
        d.note("sched_on_updates", False, "vistrain moves the rate after every optimizer update (timm's "
               "--sched-on-updates); timm's default moves it once per epoch: the same curve, in finer steps",
               target="train.scheduler")
    cooldown = src.get("cooldown_epochs")
    if cooldown:
        d.note("cooldown_epochs", cooldown, f"vistrain's schedule ends at train.epochs; the {cooldown} epochs at "
               "min_lr after it are not trained (add them to train.epochs to train as long)")


def _augment(src: Source, d: Draft) -> None:
    section_block(d, "augment", "timm's training transform (timm.data.create_transform): random resized crop "
                  "(scale, ratio) -> flips -> auto-augment policy, or colour jitter without one -> normalise -> random "
                  "erasing; then mixup / cutmix on the batch. vistrain's light policy gives the flips (its affine only "
                  "rotates under crop: rrc, and rotate is 0).")
    if src.get("no_aug"):
        d.set("augment.policy", "none", "no_aug: timm resizes and centre-crops, vistrain resizes")
        d.set("augment.crop", "none")
        for key in AUGMENT_KEYS:
            src.inactive(key, "no_aug")
        return
    d.set("augment.policy", "light")
    d.set("augment.crop", "rrc")
    d.set("augment.scale", [float(v) for v in src.get("scale")])
    d.set("augment.ratio", [float(v) for v in src.get("ratio")])
    if src.get("train_crop_mode") not in (None, "", "rrc"):
        d.note("train_crop_mode", src.get("train_crop_mode"), "vistrain's crop: rrc is timm's rrc mode",
               target="augment.crop")
    d.set("augment.hflip", src.get("hflip"))
    d.set("augment.vflip", src.get("vflip"))
    d.set("augment.rotate", 0)
    _colour(src, d)
    _erasing(src, d)
    _mixing(src, d)
    d.set("augment.repeats", round(float(src.get("aug_repeats") or 0)))
    splits = int(src.get("aug_splits") or 0)
    d.set("augment.splits", splits)
    if splits and not src.get("jsd_loss"):
        d.note("jsd_loss", False, "vistrain's augment.splits always trains with timm's JsdCrossEntropy",
               target="augment.splits")
    elif not splits:
        src.inactive("jsd_loss", "aug_splits 0")


AUGMENT_KEYS = ("scale", "ratio", "hflip", "vflip", "color_jitter", "aa", "reprob", "remode", "recount", "mixup",
                "cutmix", "mixup_prob", "mixup_switch_prob", "aug_repeats", "aug_splits", "jsd_loss", "resplit")


def _colour(src: Source, d: Draft) -> None:
    from vistrain.data.auto_augment import check_auto

    aa, jitter = src.get("aa"), float(src.get("color_jitter") or 0)
    if aa and "3a" not in aa:  # timm's create_transform: an auto-augment policy (but 3a) disables the jitter
        d.set("augment.color_jitter", 0.0, f"timm turns its colour jitter ({jitter:g}) off under --aa")
    elif jitter > 1:
        d.approx("color_jitter", jitter, "augment.color_jitter", 1.0, "vistrain's strength is at most 1")
    else:
        d.set("augment.color_jitter", jitter)
    if aa:
        problem = check_auto(aa)
        if problem:
            d.note("aa", aa, f"not carried: {problem}")
        else:
            d.set("augment.auto", aa)


def _erasing(src: Source, d: Draft) -> None:
    reprob = src.get("reprob")
    d.set("augment.random_erasing", reprob)
    if not reprob:
        for key in ("remode", "recount", "resplit"):
            src.inactive(key, "reprob 0")
        return
    mode = src.get("remode")
    if mode in ("const", "rand", "pixel"):
        d.set("augment.erasing_mode", mode)
    else:
        d.approx("remode", mode, "augment.erasing_mode", "pixel", "vistrain erases with const, rand or pixel")
    d.set("augment.erasing_count", int(src.get("recount")))
    if src.get("resplit"):
        d.note("resplit", True, "vistrain erases in every augmented view of augment.splits, the clean one excepted "
               "or not as timm's default")


def _mixing(src: Source, d: Draft) -> None:
    mixup, cutmix, minmax = src.get("mixup"), src.get("cutmix"), src.get("cutmix_minmax")
    d.set("augment.mixup_alpha", mixup)
    d.set("augment.cutmix_alpha", cutmix)
    d.set("train.label_smoothing", src.get("smoothing"))
    keys = ("mixup_prob", "mixup_switch_prob", "mixup_mode", "mixup_off_epoch")
    if not (mixup or cutmix or minmax):
        for key in keys:
            src.inactive(key, "no mixup / cutmix")
        return
    d.set("augment.mix_prob", src.get("mixup_prob"))
    d.set("augment.mix_switch_prob", src.get("mixup_switch_prob"))
    if minmax:
        d.note("cutmix_minmax", minmax, "vistrain's cutmix draws its box from cutmix_alpha")
    if src.get("mixup_mode") not in ("batch", None):
        d.note("mixup_mode", src.get("mixup_mode"), "vistrain mixes per batch (timm's mode batch)")
    if src.get("mixup_off_epoch"):
        d.note("mixup_off_epoch", src.get("mixup_off_epoch"), "vistrain mixes in every epoch")


def _loop(src: Source, d: Draft) -> None:
    d.set("train.batch_size", src.get("batch_size"))
    d.set("train.grad_accum_steps", max(int(src.get("grad_accum_steps") or 1), 1))
    if src.get("amp"):  # timm's --amp: autocast to amp_dtype (float16 with a grad scaler)
        d.set("train.amp", "bf16" if src.get("amp_dtype") == "bfloat16" else "fp16")
    else:
        src.inactive("amp_dtype", "amp off")
        d.set("train.amp", "fp32", "timm without --amp trains in float32 (vistrain's auto: bf16 / fp16 on a GPU)")
    if src.get("channels_last"):  # false: vistrain's auto decides the memory layout, which changes no number
        d.set("train.channels_last", True)
    compile_ = src.get("torchcompile")
    if compile_:
        d.set("train.compile", "max-autotune" if src.get("torchcompile_mode") == "max-autotune" else True)
    _ema(src, d)
    clip = src.get("clip_grad")
    if clip and src.get("clip_mode") == "norm":
        d.set("train.grad_clip_norm", clip)
    elif clip:
        d.note("clip_mode", src.get("clip_mode"), f"vistrain clips the gradient norm only; clip_grad {clip} is not "
               "carried")
    else:
        src.inactive("clip_mode", "clip_grad unset")
    if src.get("sync_bn"):
        d.set("train.sync_bn", True)
    d.set("train.num_workers", src.get("workers"))
    d.set("train.log_interval", src.get("log_interval"))
    d.set("train.eval_every_n_epochs", src.get("val_interval"))
    d.set("train.keep_best_k", src.get("checkpoint_hist"), "timm keeps its best checkpoints too")
    metric = src.get("eval_metric")
    if metric in MONITORS:
        d.set("train.monitor", MONITORS[metric])
    else:
        d.note("eval_metric", metric, "vistrain's classifier picks its best epoch by macro_f1, accuracy or "
               "valid_loss: macro_f1 it is", target="train.monitor")
        d.set("train.monitor", "macro_f1")
    d.set("train.early_stopping_patience", 0, "timm's train.py trains every epoch")
    if src.get("validation_batch_size"):
        d.set("eval.batch_size", src.get("validation_batch_size"))
    if src.get("log_wandb"):
        d.set("tracking.wandb.enabled", True)
        if src.get("wandb_project"):
            d.set("tracking.wandb.project", src.get("wandb_project"))
        if src.get("wandb_tags"):
            d.set("tracking.wandb.tags", list(src.get("wandb_tags")))
    for key, value in EQUIVALENT.items():  # what vistrain does by itself, the same way
        if src.get(key) in value:
            continue
        src.used.discard(key)  # another value: reported with the other keys left


def _ema(src: Source, d: Draft) -> None:
    if not src.get("model_ema"):
        for key in ("model_ema_decay", "model_ema_warmup", "model_ema_force_cpu"):
            src.inactive(key, "model_ema off")
        return
    d.set("train.ema", True)
    d.set("train.ema_decay", src.get("model_ema_decay"))
    if not src.get("model_ema_warmup"):
        default = "" if src.given("model_ema_warmup") else "train.py's default; "
        d.note("model_ema_warmup", False, f"{default}vistrain's average always warms up (timm's ModelEmaV3 "
               "use_warmup): its decay grows towards train.ema_decay over the first updates", target="train.ema_decay")


# Keys whose usual values mean what vistrain does anyway (its device choice, pinned memory, per-item seeds ...).
EQUIVALENT = {"device": ("cuda", "cpu", None), "local_rank": (0, None), "pin_mem": (True, False),
              "no_prefetcher": (True, False), "worker_seeding": ("all", None), "dist_bn": ("reduce", None),
              "fuser": ("", None), "synchronize_step": (False, None), "no_ddp_bb": (False,),
              "use_multi_epochs_loader": (True, False), "torchcompile_mode": (None, "max-autotune", "default")}
