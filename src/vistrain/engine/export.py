"""``vistrain export RUN``: each chosen fold's best model as an ONNX file that carries its own preprocessing.

The graph takes ``image``: float32 [N, 3, H, W], RGB scaled to [0, 1], then normalised with the run's mean and std
(what ``predict`` feeds the PyTorch model), with a dynamic batch dimension. Classification graphs return ``logits``
[N, C] and ``probs`` [N, C] (softmax of logits / T, T from ``calibrate`` when the run was calibrated); embedding graphs
return ``embedding`` [N, D] (L2-normalised when ``eval.feat_norm``). The ONNX ``metadata_props`` say how to feed the
graph and read it: ``vistrain.preprocess`` (the run's ``preprocess.json``: crop, resize, CLAHE, mean / std),
``vistrain.img_size`` [H, W], ``vistrain.mean``, ``vistrain.std`` (the same figures, for clients that only resize and
normalise), ``vistrain.classes`` (JSON), ``vistrain.task``, ``vistrain.temperature``, ``vistrain.feat_norm``,
``vistrain.model``, ``vistrain.run_id``, ...

``--verify`` runs the ONNX file with onnxruntime on up to 32 of the run's own images (random inputs when none can be
read) and compares with PyTorch: a difference beyond the tolerance, or a different top-1 class where PyTorch's top
two are further apart than that tolerance (``top1_changes``), fails the command.
``--benchmark`` times onnxruntime against PyTorch on this machine's CPU, both in one run (batch 1 and a batch of 32),
with 1 thread and with every usable core, each figure a median repeated until stable.
Everything is written to ``RUN/export/``: ``model_fold{k}.onnx``, ``preprocess.json`` (how to build the input from
an image file, for a client in any language) and ``export.json``. ``--quantize int8``, ``--fp16`` and
``--budget-ms`` / ``--budget-mb`` add smaller variants and the figures a deployment is decided on (``deploy``).

The exporter is ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript); onnx, onnxscript and onnxruntime
come with ``pip install 'vistrain[export]'``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vistrain._version import __version__
from vistrain.data.preprocess import Preprocessor
from vistrain.engine import device as dev
from vistrain.engine.deploy import onnx_session, sample_inputs, time_ms
from vistrain.engine.inference import LoadedRun, load_fold_model, load_run, select_folds
from vistrain.errors import CheckFailed, UserError
from vistrain.fallbacks import Fallbacks
from vistrain.tracking.files import write_json

log = logging.getLogger(__name__)

FORMATS = ("onnx", "timm")  # timm: engine.timm_folder (a Hugging Face hub folder)
EXPORT_MISSING = "export: needs onnx, onnxscript and onnxruntime; pip install 'vistrain[export]'"
# Parity: |onnx - torch| <= ATOL + RTOL * |torch| for every output value. Both run float32 on the CPU; the ONNX
# graph fuses and reorders operations (batch norm folded into convolutions), which moves values by a few ulps per
# layer, so the bound is loose enough for deep backbones and tight enough to catch a wrong graph.
ATOL, RTOL = 1e-4, 1e-3
METADATA_NEEDED = ("vistrain.task", "vistrain.img_size", "vistrain.mean", "vistrain.std", "vistrain.classes")


class Deployable(nn.Module):
    """The fold model with what inference adds after it: softmax at the run's temperature, or the embedding's L2
    normalisation. Exported as is, so a server needs nothing but the graph and its metadata."""

    def __init__(self, model: nn.Module, task: str, temperature: float | None, feat_norm: bool,
                 flip_feats: bool = False):
        super().__init__()
        self.model, self.task = model, task
        self.temperature = float(temperature or 1.0)
        self.feat_norm = feat_norm
        self.flip_feats = flip_feats and task == "embedding"

    def forward(self, image: torch.Tensor) -> Any:
        out = self.model(image).float()
        if self.task == "classification":
            return out, torch.softmax(out / self.temperature, dim=1)
        if self.flip_feats:  # eval.flip_feats: the mean with the mirror image's feature, as embed_paths does
            out = (out + self.model(torch.flip(image, dims=[-1])).float()) / 2
        return F.normalize(out, dim=1) if self.feat_norm else out

    @classmethod
    def of_run(cls, model: nn.Module, run: LoadedRun, temperature: float | None = None) -> Deployable:
        """``temperature``: the softmax's, when not one fold model's (``serve`` averaging several folds)."""
        e = run.cfg.eval
        t = run.temperature if temperature is None else temperature
        return cls(model, run.cfg.task, t, e.feat_norm, e.flip_feats).eval()

    @property
    def output_names(self) -> list[str]:
        return ["logits", "probs"] if self.task == "classification" else ["embedding"]


def _require_export_packages() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise UserError(EXPORT_MISSING) from err


def metadata(run: LoadedRun, fold: int, pre: Preprocessor) -> dict[str, str]:
    """The ``metadata_props`` of the exported file (all values are strings; lists and dicts as JSON);
    ``vistrain.display_names`` (per class, null where none) only when class_map.json names any class."""
    out = {
        "vistrain.version": __version__,
        "vistrain.run_id": run.path.name,
        "vistrain.fold": str(fold),
        "vistrain.task": run.cfg.task,
        "vistrain.model": run.cfg.model.name,
        "vistrain.serve": json.dumps(run.cfg.serve.model_dump()),  # serve's limits and upload checks for this model
        "vistrain.classes": json.dumps([str(c) for c in run.classes]),
        "vistrain.preprocess": json.dumps(pre.to_dict()),
        "vistrain.img_size": json.dumps(list(pre.size)),
        "vistrain.mean": json.dumps(list(pre.mean)),
        "vistrain.std": json.dumps(list(pre.std)),
        "vistrain.input": "image: float32 [N, 3, H, W]: RGB through vistrain.preprocess (crop, resize to img_size, "
                          "CLAHE), in [0, 1], then (x - mean) / std",
        "vistrain.temperature": json.dumps(run.temperature or 1.0),
        "vistrain.feat_norm": json.dumps(bool(run.cfg.eval.feat_norm)),
        "vistrain.flip_feats": json.dumps(bool(run.cfg.eval.flip_feats and run.cfg.task == "embedding")),
    }
    names = run.display_names()
    if any(names):
        out["vistrain.display_names"] = json.dumps(names)
    return out


def read_onnx_metadata(path: Path, session: Any, fallbacks: Fallbacks | None = None) -> dict[str, Any]:
    """The vistrain metadata of an exported file, checked against its graph (``session``: onnxruntime's): a file
    edited by hand or written by another tool is a user error naming the file and the key, not a server whose every
    answer fails. Returns task, classes, display_names (None when the file has none), img_size (H, W), mean, std,
    preprocessor (``Preprocessor``), temperature and model. ``fallbacks``: a file without ``vistrain.preprocess``."""
    meta = session.get_modelmeta().custom_metadata_map
    missing = [k for k in METADATA_NEEDED if k not in meta]
    if missing:
        raise UserError(f"MODEL: {path}: lacks the metadata {', '.join(missing)}; export it with vistrain export")

    def fail(key: str, problem: str) -> UserError:
        shown = meta[key] if len(meta[key]) <= 60 else meta[key][:57] + "..."
        return UserError(f"MODEL: {path}: {key} is '{shown}'; {problem}")

    def value(key: str, valid: str, ok: Callable[[Any], bool], default: str | None = None) -> Any:
        try:
            v = json.loads(meta.get(key, default))
        except json.JSONDecodeError:
            raise fail(key, f"not JSON; valid: {valid}") from None
        if not ok(v):
            raise fail(key, f"valid: {valid}")
        return v

    inputs = {i.name: i.shape for i in session.get_inputs()}
    if len(inputs.get("image", ())) != 4:
        found = ", ".join(f"{n} {s}" for n, s in inputs.items())
        raise UserError(f"MODEL: {path}: the graph needs an input 'image' [N, 3, H, W]; it has {found}")
    task = meta["vistrain.task"]
    if task not in ("classification", "embedding"):
        raise fail("vistrain.task", "valid: classification, embedding")
    outputs = {o.name: o.shape for o in session.get_outputs()}
    wanted = "probs" if task == "classification" else "embedding"
    if wanted not in outputs:
        raise fail("vistrain.task", f"the graph has no output '{wanted}' (it has {', '.join(outputs)})")
    size = value("vistrain.img_size", "[H, W], two positive integers",
                 lambda v: isinstance(v, list) and len(v) == 2 and all(_whole(x) and x > 0 for x in v))
    if all(isinstance(d, int) for d in inputs["image"][2:]) and list(inputs["image"][2:]) != size:
        raise fail("vistrain.img_size", f"the graph's input 'image' is {inputs['image'][2]}x{inputs['image'][3]}")
    mean = value("vistrain.mean", "three finite numbers", lambda v: _numbers(v, 3))
    std = value("vistrain.std", "three finite numbers above 0", lambda v: _numbers(v, 3) and min(v) > 0)
    classes = value("vistrain.classes", "a list of strings",
                    lambda v: isinstance(v, list) and bool(v) and all(isinstance(c, str) for c in v))
    width = outputs[wanted][-1] if outputs[wanted] else None
    if task == "classification" and isinstance(width, int) and len(classes) != width:
        raise fail("vistrain.classes", f"{len(classes)} classes, but the graph's probs output has {width}")
    temperature = value("vistrain.temperature", "a finite number above 0", lambda v: _numbers([v], 1) and v > 0,
                        default="1.0")
    names = value("vistrain.display_names", f"a list of {len(classes)} strings or nulls, one per class",
                  lambda v: v is None or (isinstance(v, list) and len(v) == len(classes)
                                          and all(n is None or isinstance(n, str) for n in v)), default="null")
    pre = _preprocessor(meta, fail, size, mean, std, fallbacks or Fallbacks(), path)
    return {"task": task, "classes": classes, "display_names": names, "img_size": (size[0], size[1]),
            "mean": [float(x) for x in mean],
            "std": [float(x) for x in std], "preprocessor": pre, "temperature": float(temperature),
            "model": meta.get("vistrain.model", "?"), "serve": _serve_section(meta, fail)}


def _preprocessor(meta: dict[str, str], fail: Callable[[str, str], UserError], size: list, mean: list, std: list,
                  fallbacks: Fallbacks, path: Path) -> Preprocessor:
    """``vistrain.preprocess``, which must agree with ``vistrain.img_size`` / ``mean`` / ``std``; a file exported
    before it existed: that resize and normalisation, without crop or CLAHE (a fallback)."""
    key = "vistrain.preprocess"
    if key not in meta:
        pre = Preprocessor(size=tuple(size), mean=tuple(mean), std=tuple(std))
        fallbacks.note("preprocessing", "the file's vistrain.preprocess", f"resize + normalisation only: "
                       f"{pre.describe()}", f"{path} was exported before vistrain recorded preprocessing "
                       "(no vistrain.preprocess)", "export the run again with this vistrain", log)
        return pre
    try:
        spec = json.loads(meta[key])
    except json.JSONDecodeError:
        raise fail(key, "not JSON; valid: the run's preprocess.json") from None
    try:
        pre = Preprocessor.from_dict(spec)
    except ValueError as err:
        raise fail(key, f"{str(err).removeprefix('preprocess: ')}; valid: the run's preprocess.json") from None
    for other, theirs, mine in (("vistrain.img_size", size, list(pre.size)), ("vistrain.mean", mean, list(pre.mean)),
                                ("vistrain.std", std, list(pre.std))):
        if mine != theirs:
            raise fail(key, f"it says {mine}, {other} says {theirs}; export the run again")
    return pre


def _serve_section(meta: dict[str, str], fail: Callable[[str, str], UserError]) -> dict[str, Any]:
    """``vistrain.serve`` checked as the ``serve:`` config section; the section's defaults for a file without it."""
    from pydantic import ValidationError

    from vistrain.config.schema import ServeCfg

    try:
        values = json.loads(meta.get("vistrain.serve", "{}"))
        return ServeCfg.model_validate(values).model_dump()
    except json.JSONDecodeError:
        raise fail("vistrain.serve", "not JSON; valid: the serve: config section as a JSON object") from None
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(["serve", *(str(x) for x in e["loc"])])
        raise fail("vistrain.serve", f"{key}: {e['msg'].removeprefix('Value error, ')}") from None


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _numbers(v: Any, n: int) -> bool:
    """``v`` is a list of ``n`` finite JSON numbers (not booleans)."""
    return isinstance(v, list) and len(v) == n and all(
        isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v)


def export_onnx(module: Deployable, example: torch.Tensor, path: Path, props: dict[str, str]) -> int:
    """``module`` traced at ``example`` (its batch size becomes dynamic) into ``path``, written atomically.
    Returns the graph's ONNX opset (the exporter's choice)."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's own deprecation and tracing notes
            program = torch.onnx.export(module, (example,), input_names=["image"], output_names=module.output_names,
                                        dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1)}},
                                        dynamo=True, external_data=False, verbose=False)
        graph = program.model_proto
        for key, value in props.items():
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(graph)
        onnx.save(graph, tmp)
        os.replace(tmp, path)
        os.chmod(path, 0o644)
        return next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def verify(module: Deployable, path: Path, inputs: torch.Tensor) -> dict[str, Any]:
    """Run both on ``inputs`` (all at once, and the first one alone: the batch dimension must be dynamic)."""
    session = onnx_session(path)
    with torch.no_grad():
        expected = module(inputs)
    expected = [e.numpy() for e in (expected if isinstance(expected, tuple) else (expected,))]
    got = session.run(None, {"image": inputs.numpy()})
    single = session.run(None, {"image": inputs[:1].numpy()})
    report: dict[str, Any] = {"inputs": len(inputs), "atol": ATOL, "rtol": RTOL, "outputs": {}}
    ok = True
    for name, e, g, s in zip(module.output_names, expected, got, single):
        diff = np.abs(g - e)
        within = bool(np.all(diff <= ATOL + RTOL * np.abs(e))) and bool(np.allclose(s[0], g[0], atol=ATOL, rtol=RTOL))
        report["outputs"][name] = {"max_abs_diff": float(diff.max()), "within_tolerance": within}
        ok &= within
    if module.task == "classification":
        changed, near_ties = top1_changes(expected[0], got[0])
        report.update(top1_agreement=float(1 - changed.mean()), top1_changed=int(changed.sum()),
                      top1_changed_near_ties=int((changed & near_ties).sum()))
        ok &= not (changed & ~near_ties).any()
    else:
        cos = np.sum(expected[0] * got[0], axis=1) / np.maximum(
            np.linalg.norm(expected[0], axis=1) * np.linalg.norm(got[0], axis=1), 1e-12)
        report["min_cosine"] = float(cos.min())
    report["passed"] = bool(ok)
    return report


def top1_changes(expected: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of logits [N, C]: whether the top-1 class changed, and whether PyTorch's top two classes are a near tie,
    closer than the parity tolerance lets two values move towards each other (2 x (ATOL + RTOL x |top logit|)). Float
    arithmetic reordered by the graph may break such a tie either way: a changed top-1 there is within the stated
    tolerance, not a wrong graph, and does not fail ``verify`` (it is counted)."""
    changed = expected.argmax(axis=1) != got.argmax(axis=1)
    top2 = np.sort(expected, axis=1)[:, -2:]  # a classifier has at least 2 classes
    near_ties = top2[:, 1] - top2[:, 0] <= 2 * (ATOL + RTOL * np.abs(top2[:, 1]))
    return changed, near_ties


def benchmark(module: Deployable, path: Path, example: torch.Tensor, batches: tuple[int, ...] = (1, 32)
              ) -> dict[str, Any]:
    """CPU latency of onnxruntime and PyTorch (eager, float32) on the same inputs, with 1 thread and with every usable
    core, both pinned explicitly (torch, OpenMP/BLAS, the onnxruntime session); the process's setting comes back."""
    counts = {"1": 1, "all": dev.usable_cores()}
    out: dict[str, Any] = {"device": "cpu", "threads": {}}

    def run_torch(x: torch.Tensor) -> None:
        with torch.no_grad():
            module(x)

    for key, n in counts.items():
        if key == "all" and n == 1:  # a one-core machine: the same figures
            out["threads"][key] = out["threads"]["1"]
            continue
        session, figures = onnx_session(path, n), {}
        with dev.pinned_threads(n):
            for b in batches:
                x = example[:1].repeat(b, 1, 1, 1)
                t, o = time_ms(run_torch, x), time_ms(session.run, None, {"image": x.numpy()})
                figures[str(b)] = {"torch_ms": t["ms"], "onnxruntime_ms": o["ms"],
                                   "onnxruntime_ms_per_image": round(o["ms"] / b, 3),
                                   "speedup_vs_torch": round(t["ms"] / o["ms"], 3),
                                   "runs": min(t["runs"], o["runs"]), "stable": t["stable"] and o["stable"]}
        out["threads"][key] = {"threads": n, "batches": figures}
    return out


def run_export(run_dir: Path, fmt: str = "onnx", folds: str | None = None, output: Path | None = None,
               do_verify: bool = False, do_benchmark: bool = False, quantize: str | None = None, fp16: bool = False,
               budget_ms: float | None = None, budget_mb: float | None = None, fail_over_budget: bool = True,
               strict: bool = False, push_to_hub: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    """``quantize`` ("int8"), ``fp16``, ``budget_ms`` / ``budget_mb``: the variants and figures of ``deploy``; when a
    budget is given and no file meets it, ``CheckFailed`` (``fail_over_budget``; exit 1) once export.json is written;
    so too when ``do_verify`` finds outputs that differ from PyTorch. ``strict``: a fallback (int8 static -> dynamic,
    --verify on random inputs, a checkpoint's preprocessing assumed; export.json's ``fallbacks``) is an error.
    ``fmt`` "timm": ``timm_folder.export_timm`` (one fold, ``push_to_hub`` / ``dry_run``). Returns export.json's
    content and ``folder``, the folder written."""
    from vistrain.engine import deploy

    if fmt not in FORMATS:
        raise UserError(f"--format: '{fmt}' is not supported; valid: {', '.join(FORMATS)}")
    onnx_only = [flag for flag, given in (("--verify", do_verify), ("--benchmark", do_benchmark),
                                          ("--quantize", quantize), ("--fp16", fp16), ("--budget-ms", budget_ms),
                                          ("--budget-mb", budget_mb)) if given]
    if fmt == "timm":
        if onnx_only:
            raise UserError(f"{onnx_only[0]}: only with --format onnx (a timm folder holds the float weights)")
        from vistrain.engine.timm_folder import export_timm

        folder = export_timm(run_dir, folds, output, push_to_hub=push_to_hub, dry_run=dry_run, strict=strict)
        return {"format": fmt, "folder": str(folder)}
    if push_to_hub or dry_run:
        flag = "--push-to-hub" if push_to_hub else "--dry-run"
        raise UserError(f"{flag}: only with --format timm (a Hugging Face hub folder); --format is {fmt}")
    if quantize is not None and quantize not in deploy.QUANTIZE:
        raise UserError(f"--quantize: '{quantize}' is not supported; valid: {', '.join(deploy.QUANTIZE)}")
    _require_export_packages()
    run = load_run(run_dir, strict=strict)
    chosen = select_folds(run, folds)
    out_dir = Path(output) if output is not None else run.path / "export"
    device = torch.device("cpu")  # the exported graph is device-neutral; tracing on the CPU needs no GPU
    results = []
    for fold in chosen:
        model, pre = load_fold_model(run, fold, device)
        module = Deployable.of_run(model, run)
        h, w = pre.size
        example = torch.zeros(2, 3, h, w)  # batch 2: a batch of 1 could be specialised away as a constant
        path = out_dir / f"model_fold{fold}.onnx"
        start = time.time()
        opset = export_onnx(module, example, path, metadata(run, fold, pre))
        write_json(out_dir / "preprocess.json", pre.to_dict())  # one run, one preprocessing: every fold's is this
        entry: dict[str, Any] = {"fold": fold, "path": str(path), "size_mb": round(path.stat().st_size / 2**20, 3),
                                 "outputs": module.output_names, "opset": opset,
                                 "export_s": round(time.time() - start, 2)}
        log.info("[EXPORT] fold=%d -> %s (%.1f MB, %.1f s)", fold, path, entry["size_mb"], entry["export_s"])
        if do_verify or do_benchmark:
            inputs, source = sample_inputs(run, pre)
        if do_verify:
            fallback = deploy.verify_fallback(run, source, fold)
            entry["verify"] = {"source": source, **verify(module, path, inputs), **fallback}
            v = entry["verify"]
            log.info("[EXPORT] fold=%d verify on %s: %s | %s", fold, source, "PASSED" if v["passed"] else "FAILED",
                     " ".join(f"{k} max|diff|={o['max_abs_diff']:.2e}" for k, o in v["outputs"].items()))
        if do_benchmark:
            entry["benchmark"] = benchmark(module, path, inputs)
            for figures in entry["benchmark"]["threads"].values():
                for b, r in figures["batches"].items():
                    log.info("[EXPORT] fold=%d threads=%d batch=%s: onnxruntime %.2f ms, torch %.2f ms (x%.2f)%s",
                             fold, figures["threads"], b, r["onnxruntime_ms"], r["torch_ms"], r["speedup_vs_torch"],
                             "" if r["stable"] else f" (median still moving after {r['runs']} runs: a busy CPU?)")
        if quantize or fp16 or budget_ms is not None or budget_mb is not None:
            entry["files"], entry["validation"] = deploy.deploy_files(run, fold, pre, path, quantize, fp16,
                                                                      budget_ms, budget_mb)
        results.append(entry)
    summary = {"run": str(run.path), "format": fmt, "task": run.cfg.task, "torch": torch.__version__,
               "models": results, "fallbacks": run.fallbacks.entries}
    write_json(out_dir / "export.json", summary)
    from vistrain.viz.model_card import refresh_model_card

    refresh_model_card(run.path)  # the card's deployment figures (RUN/export/export.json)
    summary = {**summary, "folder": str(out_dir)}
    failed = [e["fold"] for e in results if e.get("verify", {}).get("passed") is False]
    if failed:
        raise CheckFailed(f"export: the ONNX outputs of fold(s) {failed} differ from PyTorch beyond "
                          f"atol={ATOL} rtol={RTOL}; see {out_dir / 'export.json'}")
    budgeted = [f for e in results for f in e.get("files", []) if f["budget"] is not None]
    for f in budgeted:
        log.info("%s", deploy.budget_line(f))
    if budgeted and fail_over_budget and not any(f["budget"]["pass"] for f in budgeted):
        given = " ".join(f"{k} {v:g}" for k, v in (("--budget-ms", budget_ms), ("--budget-mb", budget_mb))
                         if v is not None)
        raise CheckFailed(f"export: no exported file meets the budget ({given}; latency as p95 at all threads); "
                          f"see {out_dir / 'export.json'}")
    return summary
