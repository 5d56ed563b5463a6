"""Smaller variants of an exported ONNX file, and the figures a deployment is decided on (``vistrain export
--quantize int8 / --fp16 / --budget-ms / --budget-mb``).

int8: onnxruntime static quantisation, QDQ format with int8 weights (per output channel) and int8 activations
(onnxruntime's recommended CPU setting for CNNs), calibrated on up to ``CALIB_IMAGES`` of the fold's training images
after ``quant_pre_process`` (shape inference and graph optimisation, as onnxruntime's documentation asks); the stem
convolution and everything from the classifier to the outputs (softmax, an embedding's neck and normalisation) stay
float, so ``probs`` is a float softmax of float ``logits``. Should the static path fail, dynamic quantisation (uint8
weights, activations quantised at run time, the only integer convolution onnxruntime's CPU provider has; the same
nodes kept float), and the report says which was used and why. fp16: every float tensor in half
precision, input and outputs kept float32 (``keep_io_types``), for GPUs and phones; a CPU runs much of it through
casts, so there it is smaller rather than faster.

Every file, the float one included, gets: its size; CPU latency at batch 1 (p50 / p95 of at least ``LATENCY_RUNS``
timed runs after warm-up, onnxruntime pinned to 1 thread and to every usable core); on the same validation images,
its top-1 agreement with the float file, its top-1 accuracy and the change against the float file's; and, with a
budget, the verdict: p95 latency at every usable core <= ``--budget-ms`` and size <= ``--budget-mb``. The
validation images are the fold's validation rows of splits.csv (a K-fold run's fold; a ratio split's ``val`` rows; an
embedding run's ``val`` rows, or a re-id run's query and gallery), disjoint from the training rows the int8 file is
calibrated on (``deploy_rows``): a variant is never judged on the images its ranges were fitted to.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from vistrain.data.images import check_images
from vistrain.data.preprocess import Preprocessor
from vistrain.engine import device as dev
from vistrain.engine.inference import LoadedRun
from vistrain.errors import UserError, describe
from vistrain.fallbacks import Fallbacks
from vistrain.tracking.files import atomic_write_bytes

log = logging.getLogger(__name__)

QUANTIZE = ("int8",)
CALIB_IMAGES = 128  # static int8: calibration images, a seeded draw of the training images (ranges settle by ~100)
EVAL_IMAGES = 1000  # validation images every file is compared on (a seeded draw when there are more)
CHUNK = 32  # images decoded and run at once: memory stays small at 512 px
LATENCY_RUNS = 20  # timed runs behind each p50 / p95
AGREEMENT_WARN = 0.99  # a variant that agrees less with the float model is reported with a warning
BUDGET_MEASURE = "p95_ms at all threads"  # what --budget-ms is compared with


VERIFY_IMAGES = 32  # export --verify: images of the run compared between PyTorch and onnxruntime
RANDOM_INPUTS = "random inputs (no image found)"  # how sample_inputs's description of random inputs ends
INT8_AVOID = "export without --strict to accept it, or without --quantize int8"  # a refused int8 fallback's advice
# Timings: medians of 5 timed runs after warm-up, repeated until one is within 10% of the one before (at most
# about BENCH_BUDGET_S seconds per figure: a busy machine never settles)
BENCH_WINDOW, BENCH_TOLERANCE, BENCH_BUDGET_S = 5, 0.10, 5.0


def sample_inputs(run: LoadedRun, pre: Preprocessor, n: int = VERIFY_IMAGES, paths: Sequence[str] | None = None
                  ) -> tuple[torch.Tensor, str]:
    """Up to ``n`` of the run's own images (``paths``, else splits.csv's) through ``pre`` as ``predict`` does:
    float32 [n, 3, H, W]; random inputs when none is readable (the description then ends with ``RANDOM_INPUTS``)."""
    images = []
    for path in run.splits()["path"].tolist() if paths is None else paths:
        if len(images) == n:
            break
        try:
            images.append(pre.normalize(pre.load(path)))
        except Exception:  # noqa: BLE001 - moved or deleted since training: try the next one
            continue
    if images:
        return torch.stack(images), f"{len(images)} images of the run"
    h, w = pre.size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(0)), f"{n} {RANDOM_INPUTS}"


def verify_fallback(run: LoadedRun, source: str, fold: int) -> dict[str, Any]:
    """``export --verify`` on random inputs (``source``: ``sample_inputs``'s description) checks the graph on no real
    image: a fallback, noted in ``run.fallbacks`` (strict: refused), and ``{"fallback": ...}`` for the verify entry;
    ``{}`` on the run's images. (``--benchmark`` may time random inputs: a timing does not depend on the pixels.)"""
    if not source.endswith(RANDOM_INPUTS):
        return {}
    entry = run.fallbacks.note(
        "export --verify", "the run's images", "random inputs", f"none of the images in {run.path / 'splits.csv'} "
        "could be read (moved or deleted since training?)", "put the run's images back where splits.csv lists them",
        log, fold=fold)
    return {"fallback": {k: entry[k] for k in ("from", "to", "reason")}}


def onnx_session(path: Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with ``threads`` intra-op threads; by default the process's setting
    (``train.num_threads``), not onnxruntime's own default of every core whatever else runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def stable_median_ms(measure: Callable[[], float], window: int = BENCH_WINDOW, tolerance: float = BENCH_TOLERANCE,
                     budget_s: float | None = None, min_runs: int = BENCH_WINDOW) -> dict[str, Any]:
    """Time in windows of ``window`` runs (``measure()``: one run's milliseconds) until a window's median is within
    ``tolerance`` of the one before and at least ``min_runs`` runs are done, or ``budget_s`` (``BENCH_BUDGET_S``)
    has passed with ``min_runs`` done; ``ms``: the last window's median, ``p50_ms`` / ``p95_ms``: percentiles of
    the last ``max(window, min_runs)`` runs. A loaded machine shows as a median that keeps moving: ``stable`` is
    then false."""
    deadline = time.perf_counter() + (BENCH_BUDGET_S if budget_s is None else budget_s)
    times: list[float] = []
    previous = None
    while True:
        times += [measure() for _ in range(window)]
        median = statistics.median(times[-window:])
        stable = previous is not None and abs(median - previous) <= tolerance * previous
        if len(times) >= min_runs and (stable or time.perf_counter() >= deadline):
            p50, p95 = np.percentile(times[-max(window, min_runs):], [50, 95])
            return {"ms": round(median, 3), "p50_ms": round(float(p50), 3), "p95_ms": round(float(p95), 3),
                    "runs": len(times), "stable": stable}
        previous = median


def time_ms(fn: Callable[..., Any], *args: Any, min_runs: int = BENCH_WINDOW) -> dict[str, Any]:
    """``stable_median_ms`` of ``fn(*args)`` after two warm-up calls."""
    fn(*args)
    fn(*args)

    def once() -> float:
        t0 = time.perf_counter()
        fn(*args)
        return (time.perf_counter() - t0) * 1000

    return stable_median_ms(once, min_runs=min_runs)


def variant_path(float_path: Path, kind: str) -> Path:
    """``model_fold0.onnx`` -> ``model_fold0.int8.onnx`` / ``model_fold0.fp16.onnx``."""
    return float_path.with_name(f"{float_path.stem}.{kind}{float_path.suffix}")


def deploy_rows(run: LoadedRun, fold: int) -> tuple[pd.DataFrame, str, pd.DataFrame, str]:
    """(training rows, what they are, validation rows, what they are) of the fold in splits.csv: a K-fold run's other
    folds and its fold; a ratio split's ``train`` and ``val`` rows; an embedding run's ``train`` rows and the rows it
    is validated on (``val``; a re-id run's query and gallery), every row of which carries fold 0. The test rows are
    in neither: they stay for ``evaluate``."""
    items = run.splits()
    if run.cfg.task == "embedding" or run.cfg.data.split == "ratio":
        split = items["split"].astype(str)
        val = items[~split.isin(["train", "test"])]
        named = " / ".join(sorted(set(val["split"].astype(str)))) or "val"
        return (items[split == "train"], "the training rows (split == train) of splits.csv", val,
                f"the validation rows (split == {named}) of splits.csv")
    return (items[items["fold"] != fold], f"fold {fold}'s training rows of splits.csv", items[items["fold"] == fold],
            f"fold {fold}'s validation rows of splits.csv")


def _draw(part: pd.DataFrame, n: int, seed: int, fold: int, what: str) -> pd.DataFrame:
    """At most ``n`` rows of ``part`` (a draw seeded by project.seed, in splits.csv order), the readable ones (the rest
    reported)."""
    if len(part) > n:
        part = part.sample(n=n, random_state=seed).sort_index()
    bad = check_images(part["path"].tolist())
    if bad:
        first = next(iter(bad.items()))
        log.warning("[EXPORT] fold=%d: %d %s image(s) unreadable, left out; first: %s: %s", fold, len(bad), what,
                    *first)
        part = part[~part["path"].isin(list(bad))]
    return part


def validation_images(run: LoadedRun, fold: int, n: int = EVAL_IMAGES) -> tuple[list[str], np.ndarray, str]:
    """The fold's validation images (``deploy_rows``), the readable ones, at most ``n``, with their class indices
    (-1 for a label the classifier does not have)."""
    _, _, part, source = deploy_rows(run, fold)
    part = _draw(part, n, run.cfg.project.seed, fold, "validation")
    index = run.class_index()
    labels = np.array([index.get(str(v), -1) for v in part["label"]], dtype=np.int64)
    return part["path"].tolist(), labels, source


def calibration_images(run: LoadedRun, fold: int, n: int = CALIB_IMAGES) -> tuple[list[str], str]:
    """Up to ``n`` readable training images of the fold (``deploy_rows``) for int8 calibration: never an image the
    variants are then compared on, so the agreement is measured on images the quantiser did not fit its ranges to."""
    part, source, _, _ = deploy_rows(run, fold)
    return _draw(part, n, run.cfg.project.seed, fold, "calibration")["path"].tolist(), source


def input_batches(run: LoadedRun, pre: Preprocessor, paths: list[str]) -> Iterator[np.ndarray]:
    """``paths`` preprocessed as ``predict`` does (``export.sample_inputs``), ``CHUNK`` images at a time."""
    for start in range(0, len(paths), CHUNK):
        chunk = paths[start:start + CHUNK]
        inputs, source = sample_inputs(run, pre, len(chunk), chunk)
        if len(inputs) != len(chunk) or not source.endswith("images of the run"):
            raise UserError(f"export: validation images became unreadable during the export (one of {chunk[0]} "
                            f"... {chunk[-1]}); run it again")
        yield inputs.numpy()


def quantize_int8(src: Path, dst: Path, calibration: Iterable[np.ndarray], source: str | None = None,
                  fallbacks: Fallbacks | None = None, fold: int | None = None) -> dict[str, Any]:
    """``src`` quantised to int8 into ``dst`` (written atomically, ``src``'s metadata kept, plus
    ``vistrain.quantization``); static with the ``calibration`` batches [N, 3, H, W] (``source``: which images they
    are, recorded), else dynamic. Returns what was done. Dynamic instead of static, or the graph quantised without
    onnxruntime's pre-processing, is a fallback (``fallbacks``: noted, with ``fold``; strict: refused)."""
    from onnxruntime import quantization as q

    fallbacks = fallbacks or Fallbacks()
    where = {} if fold is None else {"fold": fold}

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches, self.count = iter(calibration), 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            self.count += 0 if batch is None else len(batch)
            return None if batch is None else {"image": batch}

    info: dict[str, Any] = {"dtype": "int8"}
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quantize.") as tmp:
        prepared, out = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        try:
            _pre_process(src, prepared)
        except Exception as err:  # noqa: BLE001 - an optimisation step: quantising the file as is still works
            fallbacks.note("export --quantize int8", "quant_pre_process", "the exported graph as is",
                           f"onnxruntime's quantisation pre-processing failed: {describe(err)}", INT8_AVOID, log,
                           **where)
            info["pre_process_failed"] = describe(err)
            prepared = src
        reader, keep = Reader(), _float_ends(prepared)
        try:
            q.quantize_static(str(prepared), str(out), reader, quant_format=q.QuantFormat.QDQ, per_channel=True,
                              activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                              nodes_to_exclude=keep)
            info.update(method="static", format="QDQ", per_channel=True, calibration_images=reader.count,
                        **({"calibration_source": source} if source else {}), kept_float=keep)
        except Exception as err:  # noqa: BLE001 - onnxruntime's own errors: an op it cannot calibrate, ...
            entry = fallbacks.note("export --quantize int8", "static", "dynamic",
                                   f"static quantisation failed: {describe(err)}", INT8_AVOID, log, **where)
            q.quantize_dynamic(str(prepared), str(out), weight_type=q.QuantType.QUInt8, nodes_to_exclude=keep)
            info.update(method="dynamic", static_failed=describe(err), kept_float=keep,
                        fallback={k: entry[k] for k in ("from", "to", "reason")})
        _save(out, dst, src, info)
    return info


def _pre_process(src: Path, dst: Path) -> None:
    """onnxruntime's quantisation pre-processing (``quant_pre_process``: shape inference, then its graph optimisation;
    the step its quantiser asks for). Its symbolic shape inference, meant for transformers, fails on some graphs (the
    Expand of an embedding's L2 normalisation); ONNX's own shape inference then does, as onnxruntime's documentation
    says it does for other models."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst))
    except Exception as err:  # noqa: BLE001 - sympy-based inference raises whatever it meets
        log.debug("[EXPORT] symbolic shape inference failed (%s); ONNX shape inference only", describe(err))
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)


# Kept float after the last Gemm / MatMul: what turns its output into the graph's outputs (a bias, a reshape, the
# temperature, the softmax; an embedding's BNNeck and L2 normalisation). Cheap, and where int8 would be seen: a
# quantised softmax gives probabilities in steps of 1/255 (rows not summing to 1, exact zeros, ties in the top k).
TAIL_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze", "Cast",
                      "Softmax", "LogSoftmax", "BatchNormalization", "LpNormalization", "ReduceL2", "Sqrt", "Clip",
                      "Max", "Expand"})
HEAD_OPS = frozenset({"Gemm", "MatMul"})


def _float_ends(path: Path) -> list[str]:
    """The nodes kept float: the convolution that reads the image, and every node from the last Gemm / MatMul (the
    classifier) to the outputs (``TAIL_OPS``). The stem and the classifier are the common practice (where int8 costs
    the most accuracy for a few per cent of the compute; on the pills demo top-1 agreement with the float model was
    97.0% with them quantised, 100% without); the tail keeps the outputs themselves float."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
    first = [n.name for n in graph.node if n.op_type == "Conv" and inputs & set(n.input)]
    produced = {o: n for n in graph.node for o in n.output}
    tail: set[str] = set()
    todo = [produced.get(name) for name in outputs]
    while todo:  # back from each output, through every input of the tail's nodes, up to the classifier
        node = todo.pop()
        if node is None or not node.name or node.name in tail or node.op_type not in TAIL_OPS | HEAD_OPS:
            continue
        tail.add(node.name)
        if node.op_type not in HEAD_OPS:
            todo.extend(produced.get(name) for name in node.input)
    return first[:1] + sorted(tail)


def to_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """``src`` in half precision into ``dst``, float32 input and outputs, metadata kept (+ vistrain.quantization)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    info = {"dtype": "float16", "method": "cast", "keep_io_types": True}
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".fp16.") as tmp:
        out = Path(tmp) / "fp16.onnx"
        onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(out))
        _save(out, dst, src, info)
    return info


def _save(converted: Path, dst: Path, src: Path, info: dict[str, Any]) -> None:
    """``converted`` with ``src``'s metadata_props (a converter may drop them) and ``vistrain.quantization``, written
    atomically to ``dst``."""
    import onnx

    model = onnx.load(str(converted))
    props = {p.key: p.value for p in model.metadata_props}
    props.update({p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props})
    props["vistrain.quantization"] = json.dumps(info)
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write_bytes(dst, model.SerializeToString())


def latency(path: Path, img_size: tuple[int, int] | list[int]) -> dict[str, Any]:
    """Batch-1 CPU latency of ``path`` with onnxruntime and the process pinned to 1 thread and to every usable core:
    ``{"1": {threads, p50_ms, p95_ms, runs, stable}, "all": {...}}``."""
    x = {"image": np.zeros((1, 3, *img_size), np.float32)}
    out: dict[str, Any] = {}
    for key, n in (("1", 1), ("all", dev.usable_cores())):
        if key == "all" and n == 1:  # a one-core machine: the same figures
            out[key] = out["1"]
            continue
        session = onnx_session(path, n)
        with dev.pinned_threads(n):
            t = time_ms(session.run, None, x, min_runs=LATENCY_RUNS)
        out[key] = {"threads": n, "p50_ms": t["p50_ms"], "p95_ms": t["p95_ms"], "runs": t["runs"],
                    "stable": t["stable"]}
    return out


def compare(outputs: dict[str, np.ndarray], labels: np.ndarray, task: str) -> dict[str, dict[str, Any]]:
    """Per file kind: top-1 agreement with "float", top-1 accuracy and its change against "float" (classifiers:
    ``outputs`` are probabilities [N, C]); embedding models: the cosine similarity to the float embeddings."""
    if task != "classification":
        ref = outputs["float"]
        figures = {}
        for kind, emb in outputs.items():
            cos = np.sum(ref * emb, axis=1) / np.maximum(
                np.linalg.norm(ref, axis=1) * np.linalg.norm(emb, axis=1), 1e-12)
            figures[kind] = {"top1_agreement": None, "val_top1": None, "val_top1_change": None,
                             "cosine_to_float": {"mean": float(cos.mean()), "min": float(cos.min())}}
        return figures
    top1 = {kind: probs.argmax(axis=1) for kind, probs in outputs.items()}
    acc = {kind: float(np.mean(pred == labels)) for kind, pred in top1.items()}
    return {kind: {"top1_agreement": float(np.mean(pred == top1["float"])), "val_top1": round(acc[kind], 6),
                   "val_top1_change": round(acc[kind] - acc["float"], 6)} for kind, pred in top1.items()}


def check_budget(f: dict[str, Any], budget_ms: float | None, budget_mb: float | None) -> dict[str, Any] | None:
    if budget_ms is None and budget_mb is None:
        return None
    ok = budget_ms is None or f["latency"]["all"]["p95_ms"] <= budget_ms
    ok &= budget_mb is None or f["size_mb"] <= budget_mb
    return {"ms": budget_ms, "mb": budget_mb, "measure": BUDGET_MEASURE, "pass": bool(ok)}


def budget_line(f: dict[str, Any]) -> str:
    """``[BUDGET] model_fold0.int8.onnx: 12.3 ms p95 (<= 50) 11.2 MB (<= 100) PASS``."""
    b, parts = f["budget"], [f"[BUDGET] {Path(f['path']).name}:"]
    for value, limit, unit in ((f["latency"]["all"]["p95_ms"], b["ms"], "ms p95"), (f["size_mb"], b["mb"], "MB")):
        if limit is not None:
            parts.append(f"{value:.1f} {unit} ({'<=' if value <= limit else '>'} {limit:g})")
    return " ".join([*parts, "PASS" if b["pass"] else "FAIL"])


def deploy_files(run: LoadedRun, fold: int, pre: Preprocessor, float_path: Path, quantize: str | None,
                 fp16: bool, budget_ms: float | None, budget_mb: float | None
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The fold's float file and the variants asked for, each with its figures; and the validation images used."""
    paths, labels, source = validation_images(run, fold)
    files: list[dict[str, Any]] = [{"kind": "float", "path": str(float_path)}]
    calib: list[str] = []
    if quantize:
        calib, calib_source = calibration_images(run, fold)
        if not calib:
            raise UserError(f"--quantize: fold {fold} has no readable training image in {run.path / 'splits.csv'} "
                            "to calibrate on")
        dst = variant_path(float_path, quantize)
        info = quantize_int8(float_path, dst, input_batches(run, pre, calib), calib_source, run.fallbacks, fold)
        files.append({"kind": quantize, "path": str(dst), "quantization": info})
        log.info("[EXPORT] fold=%d int8 (%s%s) -> %s", fold, info["method"],
                 f", QDQ per channel, {info['calibration_images']} calibration images of {calib_source}"
                 if info["method"] == "static" else "", dst)
    if fp16:
        dst = variant_path(float_path, "fp16")
        files.append({"kind": "fp16", "path": str(dst), "quantization": to_fp16(float_path, dst)})
        log.info("[EXPORT] fold=%d fp16 (float32 input and outputs) -> %s", fold, dst)
    for f in files:
        f["size_mb"] = round(Path(f["path"]).stat().st_size / 2**20, 3)
    if paths:
        figures = compare(_outputs(files, input_batches(run, pre, paths), run.cfg.task), labels, run.cfg.task)
    else:
        log.warning("[EXPORT] fold=%d: no readable validation image: no agreement or accuracy figures", fold)
        figures = {f["kind"]: {"top1_agreement": None, "val_top1": None, "val_top1_change": None} for f in files}
    for f in files:
        f.update(figures[f["kind"]])
        f["latency"] = latency(Path(f["path"]), pre.size)
        f["budget"] = check_budget(f, budget_ms, budget_mb)
        _log_file(fold, f, len(paths))
    return files, {"images": len(paths), "source": source,
                   "calibration_images_among_them": len(set(calib) & set(paths))}


def _outputs(files: list[dict[str, Any]], batches: Iterable[np.ndarray], task: str) -> dict[str, np.ndarray]:
    """Every file run on the same batches (decoded once): probabilities or embeddings [N, ...] per kind."""
    name = "probs" if task == "classification" else "embedding"
    sessions = {f["kind"]: onnx_session(Path(f["path"])) for f in files}
    out: dict[str, list[np.ndarray]] = {kind: [] for kind in sessions}
    for batch in batches:
        for kind, session in sessions.items():
            out[kind].append(session.run([name], {"image": batch})[0].astype(np.float32))
    return {kind: np.concatenate(parts) for kind, parts in out.items()}


def _log_file(fold: int, f: dict[str, Any], n: int) -> None:
    lat = ", ".join(f"{v['threads']} thread{'s' * (v['threads'] > 1)} {v['p50_ms']:.1f}/{v['p95_ms']:.1f} ms"
                   for v in f["latency"].values())
    figures = ""
    if f.get("top1_agreement") is not None:
        figures = (f" | top-1 agreement with float {f['top1_agreement']:.2%} on {n} validation images | val top-1 "
                   f"{f['val_top1']:.4f} ({f['val_top1_change']:+.4f})")
    elif "cosine_to_float" in f:
        figures = f" | cosine to float mean {f['cosine_to_float']['mean']:.4f} min {f['cosine_to_float']['min']:.4f}"
    log.info("[EXPORT] fold=%d %s: %.1f MB%s | batch-1 latency p50/p95: %s", fold, Path(f["path"]).name,
             f["size_mb"], figures, lat)
    if f.get("top1_agreement") is not None and f["top1_agreement"] < AGREEMENT_WARN:
        log.warning("[EXPORT] fold=%d %s agrees with the float model on only %.2f%% of the validation images "
                    "(under %.0f%%): check val_top1_change before shipping it", fold, Path(f["path"]).name,
                    100 * f["top1_agreement"], 100 * AGREEMENT_WARN)
