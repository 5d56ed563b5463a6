"""``RUN/MODEL_CARD.md``: what a trained model is for, what it learnt from, how well it does and how to load it, in
the Hugging Face model card layout, so the same text is the README.md of a timm / hub folder.

The layout: YAML front matter (``library_name: timm``, ``tags``, ``pipeline_tag``, ``metrics`` and the results as
``model-index``, written by ``huggingface_hub``'s ``ModelCardData``; no ``license``: a run does not know one), then
sections: what the model is for (``project.description``), data, preprocessing, training, results (per split with
95% intervals, per domain, the weakest classes), calibration, deployment (ONNX, int8, latency), known limits, how
to load it. Every number is read from the run's files as they hold it (``card_files``, ``card_sections``); a
section whose file is absent names the command that writes it. ``train`` writes the card once its status is
final, and ``evaluate``, ``calibrate``, ``export`` and ``report`` refresh it (``refresh_model_card``: a card that
cannot be written is a warning, never a failed command).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vistrain.tracking.files import atomic_write_text
from vistrain.viz.card_files import RunFiles, basename, code, num, plain, read_run, table, text
from vistrain.viz.card_sections import (
    EVALUATE,
    data_section,
    figures,
    preprocessing_section,
    recipe_section,
    results_section,
)

log = logging.getLogger(__name__)
CARD_FILE = "MODEL_CARD.md"
DEFAULT_FAILURE_THRESHOLD = 0.7  # eval.failure_threshold's default, for a config.yaml without it
MAX_NAMED = 15  # classes named per line of the known limits
# vistrain figure -> Hugging Face metric id (model-index ``type``); the vistrain name is the result's ``name``
HF_METRICS = {"top1": "accuracy", "accuracy": "accuracy", "knn_acc": "accuracy", "macro_f1": "f1",
              "knn_macro_f1": "f1", "mAP": "mean_average_precision", "mINP": "mean_inverse_negative_penalty"}
HEADLINE = ("top1", "macro_f1")  # a classifier's figures in model-index; an embedding model gives all of its own


def write_model_card(run_dir: Path) -> Path:
    """Write ``run_dir/MODEL_CARD.md`` (atomically) from the run's files and return its path."""
    path = Path(run_dir) / CARD_FILE
    atomic_write_text(path, model_card_text(run_dir))
    return path


def refresh_model_card(run_dir: Path) -> Path | None:
    """``write_model_card`` for the commands that add numbers to a run: a card that cannot be written is one
    ``[CARD]`` warning (the command's own results are written and stand), and None."""
    try:
        return write_model_card(run_dir)
    except Exception as err:  # noqa: BLE001 - best effort: the card must never fail training or evaluation
        from vistrain.errors import describe

        log.warning("[CARD] could not write %s: %s", Path(run_dir) / CARD_FILE, describe(err))
        return None


def model_card_text(run_dir: Path, *, timm_export: dict | None = None) -> str:
    """The card of the run at ``run_dir``. ``timm_export`` ({"folder", "fold", "not_expressed", "embedding_head",
    "config"}: the exported folder, the fold whose weights it holds, what timm's transforms cannot reproduce, an
    embedding model's head after the timm features, and the folder's config.json) makes it that folder's README.md:
    "How to load" then leads with ``timm.create_model("local-dir:<folder>")``."""
    f = read_run(Path(run_dir))
    sections = (("What the model is for", _purpose), ("Data", data_section), ("Preprocessing", preprocessing_section),
                ("Training", recipe_section), ("Results", results_section), ("Calibration", _calibration),
                ("Deployment (ONNX)", _deployment), ("Known limits", lambda f: _limits(f, timm_export)),
                ("How to load", lambda f: _how_to_load(f, timm_export)))
    front = _part("front matter", _front_matter, f, lambda _: "library_name: timm\ntags:\n- vistrain")
    body = _part("title", _header, f, lambda _: f"# {text(_run_id(f))}\n\n")
    body += "".join(_part(title, write, f, lambda why, t=title: f"## {t}\n\nNot written: the run's files are not in "
                          f"the shape this vistrain reads ({text(why)}).\n\n") for title, write in sections)
    return f"---\n{front}\n---\n\n{body.rstrip()}\n"


def _part(title: str, write: Any, f: RunFiles, instead: Any) -> str:
    """One part of the card; a run file in a shape it does not expect (an older or a damaged run) costs that part
    (``instead(why)``) and a [CARD] warning, never the card."""
    try:
        return write(f)
    except Exception as err:  # noqa: BLE001 - best effort, part by part
        from vistrain.errors import describe

        log.warning("[CARD] %s: %s left out: %s", f.path / CARD_FILE, title, describe(err))
        return instead(describe(err))


# ------------------------------------------------------------------------------------------ front matter
def _front_matter(f: RunFiles) -> str:
    from huggingface_hub import ModelCardData

    task = "image-classification" if f.task == "classification" else "image-feature-extraction"
    arch = f.get("model.name")
    results = _eval_results(f, task)
    types = sorted({r.metric_type for r in results}) or (["accuracy", "f1"] if f.task == "classification" else None)
    data = ModelCardData(library_name="timm", pipeline_tag=task, tags=[task, "vistrain", *([arch] if arch else [])],
                         metrics=types, model_name=_run_id(f) if results else None, eval_results=results or None)
    return data.to_yaml()


def _eval_results(f: RunFiles, task: str) -> list[Any]:
    """model-index entries: each eval/<split>/metrics.json's figures (a classifier's top1 and macro_f1), as the
    file holds them; without an evaluation, the monitored metric's mean over the folds' best epochs."""
    from huggingface_hub import EvalResult

    dataset = str(f.manifest.get("dataset_name") or f.get("project.name") or "local data")
    task_name = "Image Classification" if f.task == "classification" else "Image Feature Extraction"

    def result(split: str, name: str, value: float, label: str) -> EvalResult:
        return EvalResult(task_type=task, task_name=task_name, dataset_type=dataset, dataset_name=dataset,
                          dataset_split=split, metric_type=HF_METRICS.get(name, _metric_type(name)),
                          metric_value=value, metric_name=label)

    out = []
    for split, m in f.evals.items():
        names = [n for n in figures(m) if f.task != "classification" or n in HEADLINE]
        out += [result(split, n, float(m[n]), n) for n in names if isinstance(m.get(n), int | float)]
    monitor, mean = f.summary.get("monitor"), f.summary.get("mean") or {}
    if not out and isinstance(mean.get(monitor), int | float):
        folds = len(f.summary.get("folds") or [])
        out.append(result("val", str(monitor), float(mean[monitor]),
                          f"{monitor} (validation, mean of {folds} fold(s)' best epochs)"))
    return out


def _metric_type(name: str) -> str:
    """rank1, recall@5, knn_recall@1 ... are recalls at a rank; anything else keeps its vistrain name."""
    return "recall" if name.startswith(("rank", "recall@", "knn_recall@")) else name


def _run_id(f: RunFiles) -> str:
    return str(f.summary.get("run_id") or f.status.get("run_id") or f.path.name)


# ------------------------------------------------------------------------------------------ opening
def _header(f: RunFiles) -> str:
    arch = f.get("model.name", "?")
    if f.task == "classification":
        kind = f"image classifier over {len(f.classes) or '?'} classes"
    else:
        kind = "re-identification embedding model" if f.reid else "image embedding model for retrieval"
    version = (f.summary.get("environment") or {}).get("vistrain") or f.manifest.get("vistrain_version")
    status = f.status.get("status", "unknown")
    facts = [f"run {code(_run_id(f))}", f"started {text(f.status.get('started', '?'))}"]
    if version:
        facts.append(f"vistrain {text(version)}")
    if f.status.get("config_hash"):
        facts.append(f"config hash {code(f.status['config_hash'])}")
    return (f"# {text(f.get('project.name') or _run_id(f))}: {code(arch)}\n\n"
            f"A timm {code(arch)} {kind}, trained with vistrain.\n\n"
            f"**Run status:** {code(status)} · " + " · ".join(facts) + "\n\n")


def _purpose(f: RunFiles) -> str:
    description = f.get("project.description")
    if description:
        return f"## What the model is for\n\n{text(description)}\n\n"
    return ("## What the model is for\n\nThe run does not say: `project.description` is not set in its config. Set "
            "it to what the model is for (which images, which answer, for whom) when training.\n\n")


# ------------------------------------------------------------------------------------------ calibration, deployment
def _calibration(f: RunFiles) -> str:
    head = "## Calibration\n\n"
    if f.task != "classification":
        return head + "Not applicable: temperature scaling is for classifiers; this model returns embeddings.\n\n"
    c = f.calibration
    if not c:
        return head + ("Not calibrated: `vistrain calibrate RUN` fits a temperature on the out-of-fold (or "
                       "validation) logits and reports ECE and NLL before and after, out of sample.\n\n")
    applied = c.get("applied", True)
    rows = [("temperature", num(c.get("temperature"))), ("fitted temperature", num(c.get("fitted_temperature"))),
            ("kept", "yes" if applied else "no: reverted to T = 1"), ("fitted on", text(c.get("source", "?"))),
            ("images", num(c.get("n"))), ("ECE, T = 1", num(c.get("ece_before"))),
            ("ECE after (cross-fitted)", num(c.get("ece_after"))), ("NLL, T = 1", num(c.get("nll_before"))),
            ("NLL after (cross-fitted)", num(c.get("nll_after")))]
    notes = []
    if isinstance(c.get("cross_fit"), dict):
        notes.append("The after-figures are out of sample: each group's rows at the temperature fitted without them "
                     f"(by {text(c['cross_fit'].get('by'))}); T = 1 is kept when scaling made ECE worse.")
    ensemble = c.get("ensemble")
    if isinstance(ensemble, dict) and ensemble.get("note"):
        notes.append(f"Fold ensemble: {text(ensemble['note'])}.")
    return head + "From calibration.json:\n\n" + table(["quantity", "value"], rows) + "".join(
        f"{n}\n\n" for n in notes)


def _deployment(f: RunFiles) -> str:
    head = "## Deployment (ONNX)\n\n"
    models = [m for m in f.export.get("models") or [] if isinstance(m, dict)]
    if not models:
        return head + ("Not exported: `vistrain export RUN --verify --quantize int8` writes ONNX files (float and "
                       "int8) into RUN/export/ with the parity check against PyTorch, the int8 file's top-1 "
                       "agreement with the float one and CPU latency.\n\n")
    rows = []
    for m in models:
        v = m.get("verify") if isinstance(m.get("verify"), dict) else None
        diffs = ", ".join(f"{k} {num(o.get('max_abs_diff'), 2)}" for k, o in ((v or {}).get("outputs") or {}).items())
        check = "—" if v is None else f"{'passed' if v.get('passed') else 'FAILED'}, largest difference {diffs}"
        rows.append([num(m.get("fold")), code(basename(m.get("path", "?"))), num(m.get("size_mb"), 1),
                     num(m.get("opset")), check])
    out = head + "From export/export.json:\n\n" + table(["fold", "file", "MB", "opset", "verify"], rows)
    variants = [(m.get("fold"), v, m.get("validation") or {}) for m in models for v in m.get("files") or []
                if isinstance(v, dict)]
    if variants:
        threads = next((v["latency"]["all"].get("threads") for _, v, _ in variants
                        if isinstance((v.get("latency") or {}).get("all"), dict)), "all")
        out += ("Each file on the same validation images (disjoint from the int8 calibration images), and its batch-1 "
                "CPU latency on the machine that ran the export:\n\n" + table(
                    ["fold", "file", "kind", "MB", "top-1 agreement with float", "val top-1", "change",
                     "p50 / p95 ms, 1 thread", f"p50 / p95 ms, {threads} threads"],
                    [_variant_row(fold, v, val) for fold, v, val in variants]))
    return out


def _variant_row(fold: Any, v: dict[str, Any], validation: dict[str, Any]) -> list[str]:
    """One file of export.json's ``files``: its size, agreement with the float file (an embedding model's: cosine
    similarity), validation top-1 and its change, and batch-1 latency p50 / p95 at 1 thread and at all."""
    if v.get("top1_agreement") is not None:
        agree = f"{v['top1_agreement']:.2%} of {validation.get('images', '?')}"
    elif isinstance(v.get("cosine_to_float"), dict):
        agree = f"cosine {num(v['cosine_to_float'].get('mean'))}"
    else:
        agree = "—"
    lat = v.get("latency") or {}
    times = [f"{num(t.get('p50_ms'), 2)} / {num(t.get('p95_ms'), 2)}" if isinstance(t, dict) else "—"
             for t in (lat.get("1"), lat.get("all"))]
    return [num(fold), code(basename(v.get("path", "?"))), text(v.get("kind", "?")), num(v.get("size_mb"), 1), agree,
            num(v.get("val_top1")), num(v.get("val_top1_change")), *times]


# ------------------------------------------------------------------------------------------ limits
def _threshold(f: RunFiles, m: dict[str, Any]) -> float:
    """The F1 under which evaluate counts a class as failing: its own override, else config.yaml's."""
    given = (m.get("overrides") or {}).get("eval.failure_threshold", f.get("eval.failure_threshold"))
    return float(given) if isinstance(given, int | float) else DEFAULT_FAILURE_THRESHOLD


def _limits(f: RunFiles, timm_export: dict | None) -> str:
    notes = []
    status = f.status.get("status", "unknown")
    if status != "success":
        notes.append(f"The run's status is {code(status)}" + (f": {text(f.status['error'])}" if f.status.get("error")
                                                               else "") + "; its figures may be incomplete.")
    notes += _failing_classes(f)
    notes += _domain_limits(f)
    folds = f.summary.get("folds") or []
    if f.task == "classification" and f.get("data.split") != "ratio" and folds and len(folds) < f.get("data.folds", 0):
        whose = "one fold's" if len(folds) == 1 else "those folds'"
        notes.append(f"Only {len(folds)} of {f.get('data.folds')} folds trained: the validation and out-of-fold "
                     f"figures come from {whose} validation images only, not from every image.")
    for fb in f.summary.get("fallbacks") or []:
        if isinstance(fb, dict):
            notes.append(f"Fallback while training: {text(fb.get('what'))}: {text(fb.get('from'))} -> "
                         f"{text(fb.get('to'))} ({text(fb.get('reason'))}).")
    if timm_export and timm_export.get("not_expressed"):
        notes.append("timm's transforms cannot reproduce: " + "; ".join(map(text, timm_export["not_expressed"]))
                     + ". Apply these steps before timm's transform, or use vistrain or the ONNX file.")
    if not notes:
        notes.append("Nothing flagged in the run's files (status, classes under eval.failure_threshold, domains, "
                     "folds, fallbacks).")
    return "## Known limits\n\n" + "".join(f"- {n}\n" for n in notes) + "\n"


def _failing_classes(f: RunFiles) -> list[str]:
    if not f.evals:
        what = "Classes under eval.failure_threshold" if f.task == "classification" else "Held-out retrieval quality"
        return [f"{what} {'(' + plain(_threshold(f, {})) + ') ' if f.task == 'classification' else ''}"
                f"unknown until the run is evaluated: {code(EVALUATE)}."]
    if f.task != "classification":
        return []
    out = []
    for split, m in f.evals.items():
        thr = _threshold(f, m)
        per_class = f.csv(f"eval/{split}/per_class.csv")
        failing = f.csv(f"eval/{split}/failures.csv")
        if failing is None and per_class is not None and {"f1", "support"} <= set(per_class.columns):
            failing = per_class[(per_class["support"] > 0) & (per_class["f1"] < thr)].sort_values("f1", kind="stable")
        if failing is None or "class" not in failing.columns:
            continue
        total = int(per_class["f1"].notna().sum()) if per_class is not None and "f1" in per_class.columns else "?"
        if failing.empty:
            out.append(f"{code(split)}: every class with images scores F1 of at least {plain(thr)} "
                       "(eval.failure_threshold).")
            continue
        named = [f"{code(r['class'])} (F1 {num(r['f1'])})" for _, r in failing.head(MAX_NAMED).iterrows()]
        more = f" and {len(failing) - MAX_NAMED} more" if len(failing) > MAX_NAMED else ""
        out.append(f"{code(split)}: {len(failing)} of {total} classes score F1 under {plain(thr)} "
                   f"(eval.failure_threshold): {', '.join(named)}{more}; eval/{split}/failures.csv names the class "
                   "each is most confused with.")
    return out


def _domain_limits(f: RunFiles) -> list[str]:
    """Domains with few of the images (under half an even share), a training ratio above a domain's share (its
    images repeat), classes seen in one domain only, and per evaluated split the classes a domain's images get
    under the failure threshold in accuracy."""
    domains = f.manifest.get("domains") if isinstance(f.manifest.get("domains"), dict) else {}
    out = []
    total = sum(d.get("num_images", 0) for d in domains.values() if isinstance(d, dict))
    for name, d in domains.items():
        share = d.get("num_images", 0) / total if total else 0
        if len(domains) > 1 and share < 0.5 / len(domains):
            out.append(f"Domain {code(name)} is under-represented: {d.get('num_images')} of {total} images "
                       f"({share:.1%}, under half of an even share); its figures rest on few images.")
        if isinstance(d.get("ratio"), int | float) and share < d["ratio"]:
            out.append(f"Domain {code(name)} is {share:.1%} of the images but {d['ratio']:.0%} of each training "
                       "epoch: its images repeat within an epoch.")
    for name, classes in (f.manifest.get("classes_in_one_domain_only") or {}).items():
        out.append(f"Classes seen only in domain {code(name)}: {', '.join(code(c) for c in classes[:MAX_NAMED])}"
                   + (f" and {len(classes) - MAX_NAMED} more" if len(classes) > MAX_NAMED else "") + ".")
    for split, m in f.evals.items():
        df = f.csv(f"eval/{split}/per_class.csv")
        thr = _threshold(f, m)
        for col in [c for c in (df.columns if df is not None else []) if c.startswith("recall@")]:
            dom = col.removeprefix("recall@")
            low = df[(df.get(f"support@{dom}", 0) > 0) & (df[col] < thr)].sort_values(col, kind="stable")
            if len(low):
                out.append(f"{code(split)}, domain {code(dom)}: classes under {plain(thr)} accuracy on its images: "
                           + ", ".join(f"{code(r['class'])} ({num(r[col])})" for _, r in low.head(MAX_NAMED).iterrows())
                           + (f" and {len(low) - MAX_NAMED} more" if len(low) > MAX_NAMED else "") + ".")
    return out


# ------------------------------------------------------------------------------------------ how to load
def _how_to_load(f: RunFiles, timm_export: dict | None) -> str:
    parts = ["## How to load\n\n"]
    if timm_export:
        parts.append(_timm_folder(f, timm_export))
    embed = f.task == "embedding"
    parts.append("### vistrain\n\nFrom the run directory (RUN) that trained it:\n\n```python\nimport vistrain\n\n"
                 'run = vistrain.Run("RUN")\n'
                 + ('vectors = run.embed(["image.jpg"])          # [N, D] embeddings\n'
                    'run.search("query.jpg", "gallery/", top_k=5)   # the nearest gallery images\n' if embed else
                    'run.predict(["image.jpg"])   # DataFrame: target, confidence, top classes, prob_<class>\n')
                 + "```\n\nor `vistrain predict RUN --input DIR_OR_CSV --output predictions.csv` "
                 + ("(kNN against the training images).\n\n" if embed else "(`--tta` adds flipped views).\n\n"))
    if not timm_export:
        parts.append("### timm\n\n`vistrain export RUN --format timm --output DIR` writes a Hugging Face hub folder "
                     "(config.json, model.safetensors, this card as README.md); then\n\n```python\nimport timm\n\n"
                     'model = timm.create_model("local-dir:DIR", pretrained=True).eval()\n```\n\n')
    files = [basename(m.get("path", "")) for m in f.export.get("models") or [] if isinstance(m, dict)]
    first = files[0] if files else "model_fold0.onnx"
    parts.append("### onnxruntime\n\n" + (f"RUN/export/ holds {', '.join(code(x) for x in files)}. " if files else
                                           "`vistrain export RUN` writes `RUN/export/model_fold{k}.onnx`. ")
                 + "The graph takes `image` float32 [N, 3, H, W] after the preprocessing above; its metadata "
                 "carries preprocess.json. Without vistrain, `examples/onnx_client.py` (in vistrain's repository) "
                 "decodes and preprocesses as vistrain does:\n\n"
                 f"```bash\npython examples/onnx_client.py RUN/export/{first} image.jpg --top-k 5\n```\n\n")
    return "".join(parts)


def _timm_folder(f: RunFiles, export: dict) -> str:
    folder = str(export.get("folder", "DIR"))
    config = export.get("config") if isinstance(export.get("config"), dict) else {}
    pre = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
    embed = export.get("embedding_head")
    out = (f"### timm (this folder)\n\nThe weights of fold {export.get('fold', '?')}'s best model, "
           + ("as a timm feature model (num_classes=0: pooled backbone features; the embedding head below turns them "
              "into the embedding)" if embed else "with its classifier head")
           + ":\n\n```python\nimport timm\n\n"
           f'# from the folder that holds {folder} (or give its full path):\n'
           f'model = timm.create_model("local-dir:{folder}", pretrained=True).eval()\n'
           '# once pushed (vistrain export RUN --format timm --push-to-hub USER/REPO):\n'
           '# model = timm.create_model("hf-hub:USER/REPO", pretrained=True).eval()\n'
           "config = timm.data.resolve_data_config({}, model=model)\n"
           "transform = timm.data.create_transform(**config)\n```\n\n")
    rows = [(code(k), text(plain(config[k]))) for k in ("architecture", "num_classes") if k in config]
    if isinstance(config.get("label_names"), list):
        rows.append((code("label_names"), f"{len(config['label_names'])} names, in output order"))
    rows += [(code(k), text(plain(pre[k]))) for k in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean",
                                                      "std") if k in pre]
    if rows:
        out += "config.json:\n\n" + table(["key", "value"], rows)
    missing = export.get("not_expressed") or []
    out += ("timm's transforms cannot reproduce this preprocessing: " + "; ".join(map(text, missing))
            + ". Apply it before timm's transform (or use vistrain or the ONNX file) to get the run's figures.\n\n"
            if missing else "timm's transforms reproduce the run's preprocessing (resize, crop, interpolation, mean, "
                            "std).\n\n")
    if isinstance(embed, dict) and embed:
        out += _head(embed)
    return out


def _head(head: dict[str, Any]) -> str:
    """The head timm cannot hold (export's ``embedding_head``: file, output, formula, code, call): its formula and
    the code that applies it, verbatim, so a timm user gets the run's outputs without vistrain."""
    title = "Classifier head" if head.get("kind") == "classifier" else "Embedding head"
    out = f"#### {title}\n\n"
    if head.get("file"):
        output = f" ({text(plain(head['output']))})" if head.get("output") else ""
        out += f"In {code(head['file'])}{output}:\n\n"
    formula = head.get("formula") or []
    out += "".join(f"    {step}\n" for step in (formula if isinstance(formula, list) else [formula])) + "\n"
    if head.get("code"):
        call = f", then `{head['call']}` on a batch `x` from `transform`" if head.get("call") else ""
        out += (f"In code (with `folder` and `model` as above{call}):\n\n```python\n"
                f"{str(head['code']).rstrip()}\n```\n\n")
    return out
