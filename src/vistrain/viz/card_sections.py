"""The model card's sections about the data, the preprocessing, the training recipe and the results, each written
from the run's files (``card_files.RunFiles``); a file that is absent turns into the command that writes it."""

from __future__ import annotations

from typing import Any

from vistrain.registry import domain_metrics, higher_is_better
from vistrain.viz.card_files import RunFiles, basename, code, is_number, num, plain, table, text, with_interval

DOMAIN_METRICS = domain_metrics()  # <metric>@<domain> keys: the per-domain tables, not the overall ones
DOMAIN_COLUMNS = ("top1", "top5", "macro_f1", "balanced_accuracy")
# metrics.json entries that count or describe rather than score
NOT_FIGURES = {"n", "n_classes", "top5_k", "ece_n_bins", "num_valid_queries", "num_skipped", "n_query", "n_gallery"}
MAX_CLASSES = 50  # rows of the class table; the rest are in class_map.json
WORST = 5  # weakest classes shown per evaluated split
EVALUATE = "vistrain evaluate RUN --split val"


def is_domain_key(key: str) -> bool:
    metric, sep, _ = key.partition("@")
    return bool(sep) and metric in DOMAIN_METRICS


def figures(values: dict[str, Any]) -> list[str]:
    """The scoring entries of a metrics dict (summary's mean, OOF, metrics.json), in its order."""
    return [k for k, v in values.items() if (is_number(v) or v is None) and k not in NOT_FIGURES
            and not is_domain_key(k)]


# ------------------------------------------------------------------------------------------ data
def data_section(f: RunFiles) -> str:
    out = ["## Data\n\n", _sources(f)]
    m = f.manifest
    if m:
        left = m.get("left_out_images")
        out.append(f"{num(m.get('total_images'))} images, {num(m.get('num_classes'))} "
                   f"{'identities' if f.reid else 'classes'}"
                   + (f"; {num(left)} left out (unreadable, missing or too small: bad_images.csv)" if left else "")
                   + ".\n\n")
        out.append(f"Dataset hash: {code(m.get('dataset_hash', '?'))} (manifest.json: sha256 over every image's "
                   "path, label, size and modification time when training started).\n\n")
    else:
        out.append("No dataset hash: this run has no manifest.json (a run of an older vistrain); the counts below "
                   "are splits.csv's.\n\n")
    counts = _split_counts(f)
    if counts:
        kfold = any(s.startswith("fold") for s in counts)
        out.append("### Images per split\n\n"
                   + ("Every image validates once, in its fold; fold k's model trains on the other folds.\n\n"
                      if kfold else "")
                   + table(["split", "images"], [[code(s), num(n)] for s, n in counts.items()]))
    out.append(_domains(f))
    out.append(_classes(f))
    return "".join(out)


def _sources(f: RunFiles) -> str:
    """Where the images came from, as config.yaml names it (file and folder names, not the machine's paths)."""
    keys = ("train_csv", "image_dir_train", "manifest", "root")
    entries = f.get("data.sources") or []
    if isinstance(entries, list) and entries:
        rows = [[code(e.get("name", "?")), code(e.get("source", "csv")),
                 ", ".join(f"{k} {code(basename(e[k]))}" for k in keys if e.get(k)), plain(e.get("ratio"))]
                for e in entries if isinstance(e, dict)]
        return "Sources (data.sources; each is a domain):\n\n" + table(["source", "kind", "files", "ratio"], rows)
    if not f.config:
        return "config.yaml is absent or unreadable: the sources are not known.\n\n"
    files = ", ".join(f"{k} {code(basename(f.get('data.' + k)))}" for k in keys if f.get("data." + k))
    return f"Source: {code(f.get('data.source', 'csv'))}" + (f" ({files})" if files else "") + ".\n\n"


def _split_names(df: Any) -> Any:
    if "split" in df.columns and (df["split"].astype(str) != "").all():
        return df["split"].astype(str)
    return "fold" + df["fold"].astype(str)


def _split_counts(f: RunFiles) -> dict[str, int]:
    splits = f.manifest.get("splits")
    if isinstance(splits, dict) and splits:
        return {str(k): v.get("num_images") for k, v in splits.items() if isinstance(v, dict)}
    df = f.splits_csv()
    if df is None or ("fold" not in df.columns and "split" not in df.columns):
        return {}
    return {str(k): int(v) for k, v in _split_names(df).value_counts().sort_index().items()}


def _domains(f: RunFiles) -> str:
    domains = f.manifest.get("domains")
    if not isinstance(domains, dict) or not domains:
        return ""
    total = sum(d.get("num_images", 0) for d in domains.values()) or 1
    rows = [[code(name), num(d.get("num_images")), f"{d.get('num_images', 0) / total:.1%}", plain(d.get("ratio"))]
            for name, d in domains.items()]
    out = "### Images per domain\n\n" + table(["domain", "images", "share", "training ratio"], rows)
    df = f.splits_csv()
    if df is not None and "domain" in df.columns:
        cross = df.groupby([df["domain"], _split_names(df)]).size().unstack(fill_value=0)
        out += "Images per domain and split (splits.csv):\n\n" + table(
            ["domain", *(code(c) for c in cross.columns)],
            [[code(d), *(num(int(v)) for v in row)] for d, row in cross.iterrows()])
    return out


def _classes(f: RunFiles) -> str:
    classes = f.classes
    if not classes:
        return "class_map.json is absent: the class order is not known.\n\n"
    counts = f.manifest.get("class_distribution") or {}
    if not counts:
        df = f.splits_csv()
        counts = df["label"].value_counts().to_dict() if df is not None and "label" in df.columns else {}
    meta = f.class_map.get("metadata") if isinstance(f.class_map.get("metadata"), dict) else {}
    shown = classes[:MAX_CLASSES]
    named = any(isinstance(meta.get(c), dict) and (meta[c].get("display_name") or meta[c].get("name")) for c in shown)

    def display(c: str) -> str:
        entry = meta.get(c) if isinstance(meta.get(c), dict) else {}
        return text(entry.get("display_name") or entry.get("name") or "")

    rows = [[num(i), code(c), *([display(c)] if named else []), num(counts.get(c))] for i, c in enumerate(shown)]
    what = "identities" if f.reid else "classes"
    more = (f"{len(classes) - MAX_CLASSES} more {what} are listed in class_map.json.\n\n"
            if len(classes) > MAX_CLASSES else "")
    intro = ("The model's outputs in order (class_map.json), with their images:" if f.task == "classification" else
             f"The training {what} (class_map.json: the training head's outputs; the embedding model itself has "
             "none), with their images:")
    return (f"### Classes\n\n{intro}\n\n"
            + table(["index", "class", *(["display name"] if named else []), "images"], rows) + more)


# ------------------------------------------------------------------------------------------ preprocessing
SHRINKS = {
    "reduced_area": "a large JPEG is first decoded at a reduced DCT scale that keeps at least twice the size, and "
                    "any shrink is an area average (INTER_AREA)",
    "area": "any shrink is an area average (INTER_AREA) of the fully decoded image",
    "interpolation": "shrinks use the same interpolation",
}


def preprocessing_section(f: RunFiles) -> str:
    p = f.preprocess
    head = "## Preprocessing\n\n"
    if not p.get("resize"):
        return head + ("preprocess.json is absent (a run of an older vistrain): each checkpoint carries its "
                       "preprocessing; `vistrain export RUN` writes it beside the ONNX files.\n\n")
    size = p["resize"].get("size") or ["?", "?"]
    clahe, norm = p.get("clahe") or {}, p.get("normalize") or {}
    crop = ("the centred square of side min(H, W) is cut out" if p.get("crop") == "center_square"
            else "no crop (the whole image; its aspect ratio is not kept)")
    steps = [
        f"Decoded to RGB: {text(p.get('input', 'RGB uint8'))}.",
        crop[0].upper() + crop[1:] + ".",
        f"Resized to {size[0]}x{size[1]} (height x width) with OpenCV, {text(p['resize'].get('interpolation'))} "
        f"interpolation; {SHRINKS.get(p['resize'].get('shrink', 'interpolation'), 'shrinks as recorded')}.",
        (f"CLAHE (contrast-limited adaptive histogram equalisation) on the L channel of LAB, clip limit "
         f"{plain(clahe.get('clip_limit'))}, {clahe.get('grid')}x{clahe.get('grid')} tiles."
         if clahe.get("enabled") else "No CLAHE."),
        f"Scaled to [0, 1], then normalised per channel (RGB): (x - mean) / std with mean "
        f"{plain(norm.get('mean'))} and std {plain(norm.get('std'))}.",
    ]
    return (head + "".join(f"{i}. {s}\n" for i, s in enumerate(steps, start=1))
            + f"\npreprocess.json (hash {code(p.get('hash', '?'))}) holds every step; "
              "`vistrain.Preprocessor.from_dict` and `examples/onnx_client.py` rebuild it exactly. The same steps "
              "run in training (before augmentation), evaluation, prediction, export and serving.\n\n")


# ------------------------------------------------------------------------------------------ recipe
def recipe_section(f: RunFiles) -> str:
    if not f.config:
        return "## Training\n\nconfig.yaml is absent or unreadable: the recipe is not known.\n\n"
    g, s = f.get, f.summary
    folds = [fold for fold in s.get("folds") or [] if isinstance(fold, dict)]
    env = s.get("environment") or {}
    size = g("train.img_size", "?")
    size = f"{size}x{size}" if isinstance(size, int) else "x".join(map(str, size)) if isinstance(size, list) else size
    rows = [
        ("architecture", f"{code(g('model.name', '?'))} (timm), {_start(f)}"),
        ("model", _model(f)),
        ("input size", size),
        ("epochs", f"{g('train.epochs', '?')} at most"
         + (f"; best epoch per fold {', '.join(str(x.get('best_epoch')) for x in folds)}, epochs run "
            f"{', '.join(str(x.get('epochs_run')) for x in folds)}" if folds else "")
         + (f"; early stopping after {g('train.early_stopping_patience')} evaluations without improvement"
            if g("train.early_stopping_patience") else "")),
        ("batch size", f"{g('train.batch_size', '?')}" + (f" x {g('train.grad_accum_steps')} accumulation steps"
                                                           if g("train.grad_accum_steps", 1) > 1 else "")
         + (f" per process, {env['processes']} processes" if env.get("processes", 1) > 1 else "")),
        ("optimiser", _optimiser(f)),
        ("schedule", _schedule(f)),
        ("augmentation", _augmentation(f)),
        ("loss", _loss(f)),
        ("sampler", code(g("sampler.name", "random")) + (f" ({g('sampler.p')} x {g('sampler.k')} per batch)"
                                                         if g("sampler.name") == "pk" else "")),
        ("EMA", f"yes, decay {plain(g('train.ema_decay'))}" if g("train.ema") else "no"),
        ("selection", f"best epoch by {code(s.get('monitor') or g('train.monitor', '?'))}"),
        ("split", _split(f)),
        ("precision, device", f"{env.get('precision', '?')}, {text(env.get('device', '?'))}" if env else "—"),
        ("seed", str(g("project.seed", "?"))),
        ("training time", f"{s['timings'].get('total_s')} s" if isinstance(s.get("timings"), dict) else "—"),
        ("software", ", ".join(f"{k} {env[k]}" for k in ("vistrain", "timm", "torch", "python") if k in env) or "—"),
    ]
    if f.status.get("mode"):
        rows.insert(0, ("--mode", code(f.status["mode"])))
    return ("## Training\n\nFrom config.yaml (re-runnable as is: `vistrain train --config RUN/config.yaml`) and "
            "summary.json:\n\n" + table(["setting", "value"], rows))


def _start(f: RunFiles) -> str:
    if f.get("model.init_from"):
        return f"fine-tuned from {code(basename(f.get('model.init_from')))}"
    if f.get("model.pretrained"):
        path = f.get("model.pretrained_path")
        return f"pretrained weights from {code(basename(path))}" if path else "timm's pretrained weights"
    return "from random initialisation"


def _model(f: RunFiles) -> str:
    g = f.get
    if f.task == "embedding":
        head = g("model.head", "linear")
        margin = (f" (scale {plain(g('model.arcface_s'))}, margin {plain(g('model.arcface_m_finetune'))})"
                  if head in ("arcface", "cosface") else "")
        return (f"{g('model.pooling', 'avg')} pooling, projection to {g('model.embedding_dim') or 'the backbone width'}"
                f", neck {g('model.neck', 'bnneck')}, {head} head{margin} for training"
                + (f"; last stride {g('model.last_stride')}" if g("model.last_stride") else "")
                + ("; embeddings L2-normalised" if g("eval.feat_norm", True) else ""))
    return (f"{g('model.pooling', 'avg')} pooling, linear classifier over {len(f.classes) or '?'} classes"
            + (f", dropout {plain(g('model.drop_rate'))}" if g("model.drop_rate") else "")
            + (f", drop path {plain(g('model.drop_path_rate'))}" if g("model.drop_path_rate") else ""))


def _optimiser(f: RunFiles) -> str:
    g = f.get
    out = f"{code(g('train.optimizer', '?'))}, lr {plain(g('train.lr'))}, weight decay {plain(g('train.weight_decay'))}"
    if g("train.optimizer") in ("sgd", "momentum"):
        out += f", momentum {plain(g('train.momentum'))}"
    if g("train.backbone_lr_mult", 1.0) != 1.0:
        out += f", backbone lr x {plain(g('train.backbone_lr_mult'))}"
    if g("train.grad_clip_norm"):
        out += f", gradients clipped at norm {plain(g('train.grad_clip_norm'))}"
    return out


def _schedule(f: RunFiles) -> str:
    g = f.get
    name = g("train.scheduler", "?")
    detail = {"cosine": f"down to {plain(g('train.min_lr'))}",
              "step": f"lr x {plain(g('train.step_gamma'))} at epochs {plain(g('train.step_milestones'))}",
              "cosine_restarts": f"first cycle {g('train.restart_epochs')} epochs, x {plain(g('train.restart_mult'))}",
              "plateau": f"lr x {plain(g('train.step_gamma'))} after {g('train.plateau_patience')} epochs flat"}
    warm = g("train.warmup_epochs", 0)
    return (code(name) + (f" ({detail[name]})" if name in detail else "")
            + (f", {plain(warm)} warm-up epoch(s) from {plain(g('train.warmup_lr_factor'))} x lr" if warm else "")
            + (f", backbone frozen for {g('train.freeze_backbone_epochs')} epoch(s)"
               if g("train.freeze_backbone_epochs") else ""))


def _augmentation(f: RunFiles) -> str:
    g = f.get
    policy = g("augment.policy", "light")
    parts = [f"policy {code(policy)}"]
    if policy != "none":
        parts.append(f"horizontal flip p={plain(g('augment.hflip'))}")
        if g("augment.vflip"):
            parts.append(f"vertical flip p={plain(g('augment.vflip'))}")
        for key, what in (("rotate", "rotation up to (degrees)"), ("color_jitter", "colour jitter"), ("hue", "hue")):
            if g(f"augment.{key}"):
                parts.append(f"{what} {plain(g('augment.' + key))}")
    if g("augment.crop", "auto") not in ("auto", "none"):
        parts.append(f"crop {g('augment.crop')}")
    erasing = g("augment.random_erasing") or (0.25 if policy == "hard" else 0)
    if erasing:
        parts.append(f"random erasing p={plain(erasing)} ({g('augment.erasing_mode', 'const')})")
    for key, what in (("auto", "auto-augment"), ("mixup_alpha", "mixup alpha"), ("cutmix_alpha", "cutmix alpha"),
                      ("repeats", "repeated augmentation x"), ("splits", "AugMix splits")):
        if g(f"augment.{key}"):
            parts.append(f"{what} {plain(g('augment.' + key))}")
    if g("augment.albumentations"):
        parts.append(f"Albumentations pipeline {code(basename(g('augment.albumentations')))}")
    return ", ".join(parts)


def _loss(f: RunFiles) -> str:
    g = f.get
    if f.task == "embedding":
        terms = g("loss.terms") or []
        return " + ".join(f"{code(t.get('name'))} x {plain(t.get('weight', 1.0))}"
                          + (f" ({plain({k: v for k, v in t.items() if k not in ('name', 'weight')})})"
                             if len(t) > 2 else "") for t in terms if isinstance(t, dict)) or "—"
    out = f"{code(g('train.loss', 'ce'))} (cross-entropy)"
    if g("train.label_smoothing"):
        out += f", label smoothing {plain(g('train.label_smoothing'))}"
    if g("train.class_weights", "none") != "none":
        out += f", class weights {g('train.class_weights')}"
    return out


def _split(f: RunFiles) -> str:
    folds = [x.get("fold") for x in f.summary.get("folds") or [] if isinstance(x, dict)]
    if f.task == "embedding":
        return "re-id: the data set's query / gallery folders" if f.reid else "train / val / test by ratio"
    if f.get("data.split") == "ratio":
        return "one train / val / test split (data.split: ratio)"
    trained = ", ".join(map(str, folds)) if folds else "?"
    return f"{f.get('data.folds', '?')} folds, trained: {trained}"


# ------------------------------------------------------------------------------------------ results
def results_section(f: RunFiles) -> str:
    return "## Results\n\n" + "".join([_training(f), _oof(f), _evaluations(f), _domains_results(f), _worst(f)])


def _training(f: RunFiles) -> str:
    s = f.summary
    folds = [x for x in s.get("folds") or [] if isinstance(x, dict)]
    if not folds:
        status = f.status.get("status", "unknown")
        return (f"### Validation during training\n\nsummary.json has no folds (run status {code(status)})"
                + (": the run has not finished training" if status != "success" else "") + ".\n\n")
    monitor = str(s.get("monitor", ""))
    mean, std = s.get("mean") or {}, s.get("std") or {}
    # the monitor, the other figures, then the losses; a figure no fold has (valid_loss of a re-id run) left out
    names = sorted((n for n in figures(mean) if mean.get(n) is not None),
                   key=lambda n: (n != monitor, "loss" in n))
    try:
        better = "higher" if higher_is_better(monitor) else "lower"
    except Exception:  # noqa: BLE001 - a metric an older vistrain named: its direction is not known here
        better = "?"
    headers = ["metric", "mean", "std", *(f"fold {x.get('fold')} (epoch {x.get('best_epoch')})" for x in folds)]
    rows = [[code(n), num(mean.get(n)), num(std.get(n)), *(num((x.get("best") or {}).get(n)) for x in folds)]
            for n in names]
    held_out = ("the query images against the gallery" if f.reid else "its validation images" if len(folds) == 1
                else "that fold's validation images")
    return (f"### Validation during training\n\nEach fold's best epoch by {code(monitor)} ({better} is better), "
            f"scored on {held_out} during training (summary.json); mean and standard deviation over {len(folds)} "
            "fold(s) (0 with one).\n\n" + table(headers, rows))


def _oof(f: RunFiles) -> str:
    oof = f.summary.get("oof")
    if not isinstance(oof, dict) or not oof:
        return ""
    return ("### Out of fold\n\nEvery image scored by the fold model that did not train on it (summary.json, "
            "oof/oof_logits.npy):\n\n" + table(["metric", "value"], [[code(k), num(oof[k])] for k in figures(oof)]))


def _evaluations(f: RunFiles) -> str:
    if not f.evals:
        cmds = [EVALUATE]
        if f.summary.get("oof"):
            cmds.append("vistrain evaluate RUN --split oof")
        cmds.append("vistrain evaluate RUN --split test")
        return ("### Held-out evaluation\n\nNot evaluated yet: run " + code(cmds[0]) + " for each fold's model on "
                "its own validation images with 95% intervals (also " + ", ".join(code(c) for c in cmds[1:])
                + (" with labelled test images)" if f.task == "classification" else ")") + ".\n\n")
    return "".join(_evaluation(split, m) for split, m in f.evals.items())


def _evaluation(split: str, m: dict[str, Any]) -> str:
    intervals = m.get("intervals") if isinstance(m.get("intervals"), dict) else {}
    if "n_query" in m:
        what = f"{num(m.get('n_query'))} queries against {num(m.get('n_gallery'))} gallery images"
    else:
        what = f"{num(m.get('n'))} images" + (f", folds {plain(m['folds'])}" if m.get("folds") is not None else "")
    cal = m.get("calibration") if isinstance(m.get("calibration"), dict) else {}
    if cal:
        t = cal.get("temperature")
        what += ("; T = 1" if t is None else f"; temperature {plain(t)}") + (f" ({text(cal['note'])})"
                                                                            if cal.get("note") else "")
    if m.get("tta"):
        what += f"; TTA views {plain(m['tta'])}"
    if m.get("overrides"):
        what += "; options " + ", ".join(code(f"{k}={v}") for k, v in m["overrides"].items())
    boot = m.get("bootstrap") if isinstance(m.get("bootstrap"), dict) else {}
    note = (f"95% intervals: percentile bootstrap, {boot.get('replicates')} resamples (unit: "
            f"{text(boot.get('unit', 'image'))}, seed {boot.get('seed')}).\n\n" if boot
            else "No intervals (eval.bootstrap: 0, or an evaluation by an older vistrain).\n\n")
    if not intervals:
        rows = [[code(k), num(m[k])] for k in figures(m)]
        return f"### Held-out evaluation: eval/{split}\n\n{what} (eval/{split}/metrics.json). {note}" + table(
            ["metric", "value"], rows)
    rows = []
    for k in figures(m):
        lo, hi = intervals[k][:2] if isinstance(intervals.get(k), list) and len(intervals[k]) == 2 else (None, None)
        rows.append([code(k), num(m[k]), num(lo), num(hi)])
    return (f"### Held-out evaluation: eval/{split}\n\n{what} (eval/{split}/metrics.json). {note}"
            + table(["metric", "value", "95% low", "95% high"], rows))


def _domains_results(f: RunFiles) -> str:
    out = []
    during: dict[str, dict[str, Any]] = {}
    for key, value in (f.summary.get("mean") or {}).items():
        if is_domain_key(key):
            metric, _, domain = key.partition("@")
            during.setdefault(domain, {})[metric] = value
    if during:
        cols = [c for c in DOMAIN_METRICS if any(c in v for v in during.values())]
        rows = [[code(d), *(num(v.get(c)) for c in cols)] for d, v in sorted(during.items())]
        out.append("Validation during training (summary.json, mean over folds):\n\n"
                   + table(["domain", *map(code, cols)], rows))
    for split, m in f.evals.items():
        per = m.get("per_domain")
        if not isinstance(per, dict) or not per:
            continue
        cols = [c for c in DOMAIN_COLUMNS if any(c in v for v in per.values() if isinstance(v, dict))]
        rows = [[code(d), num(v.get("n")), *(with_interval(v.get(c), (v.get("intervals") or {}).get(c)) for c in cols)]
                for d, v in sorted(per.items()) if isinstance(v, dict)]
        out.append(f"eval/{split} (value [95% interval]):\n\n" + table(["domain", "images", *map(code, cols)], rows))
    return "### Per domain\n\n" + "".join(out) if out else ""


def _worst(f: RunFiles) -> str:
    if f.task != "classification":
        return ("### Per class\n\nAn embedding run's evaluation scores queries (retrieval), not classes: no per-class "
                "table.\n\n")
    out = []
    for split in f.evals:
        df = f.csv(f"eval/{split}/per_class.csv")
        if df is None or "f1" not in df.columns:
            continue
        worst = df.nsmallest(WORST, "f1")
        named = "display_name" in df.columns
        rows = [[code(r["class"]), *([text(r["display_name"]) if isinstance(r["display_name"], str) else ""]
                                     if named else []), num(r["f1"]), num(r.get("precision")), num(r.get("recall")),
                 num(int(r["support"]) if is_number(r.get("support")) else None)] for _, r in worst.iterrows()]
        out.append(f"### Weakest classes ({split})\n\nThe {len(worst)} lowest F1 of the {int(df['f1'].notna().sum())} "
                   f"classes with images in eval/{split}/per_class.csv (which has every class):\n\n"
                   + table(["class", *(["display name"] if named else []), "F1", "precision", "recall", "support"],
                           rows))
    return "".join(out) or f"### Per class\n\nNo per-class figures yet: {code(EVALUATE)} writes them.\n\n"
