"""Command line: parse flags, build the config, call one pipeline, map errors to exit codes.

Exit codes: 0 success, 2 user error (one line, no traceback unless --debug), 1 a failed check (export's budget or
--verify: one line) or anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import vistrain
from vistrain.errors import CheckFailed, Preempted, UserError, describe, exit_code


def _folds(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fold numbers like 0,2; got '{text}'") from None


def _split_resume(args: argparse.Namespace) -> None:
    """``--resume`` takes an optional run directory; a ``key=value`` right after it is an override."""
    if isinstance(args.resume, str):
        if "=" in args.resume:
            args.overrides.insert(0, args.resume)
            args.resume = True
        else:
            args.resume = Path(args.resume).resolve()


def cmd_train(args: argparse.Namespace) -> int:
    from vistrain.config.loader import load_config

    _split_resume(args)
    if isinstance(args.resume, Path):
        if args.fresh:
            raise UserError("--fresh: cannot be combined with --resume RUN_DIR")
        if not (args.resume / "config.yaml").is_file():
            raise UserError(f"--resume: {args.resume} is not a vistrain run directory (no config.yaml)")
        cfg = load_config(args.resume / "config.yaml", overrides=args.overrides, run_file=True)
        config_path = None
    else:
        if args.config is None:
            raise UserError("--config: required (or --resume RUN_DIR to continue a run)")
        cfg = load_config(args.config, mode=args.mode, overrides=args.overrides)
        config_path = Path(args.config)
    if args.optimize or args.auto_continue:
        return _train_optimize(args, cfg, config_path)
    if args.n_trials is not None:
        raise UserError("--n-trials: only with --optimize")
    from vistrain.pipelines.train import run_train  # torch and timm load only once the config is known good

    result = run_train(cfg, resume=args.resume, fresh=args.fresh, folds=args.fold, config_path=config_path,
                       use_calibration=args.use_calibration, full_pipeline=args.mode == "full-pipeline",
                       strict=args.strict)
    if not _worker_rank():
        print(f"[DONE] run directory: {result.run_dir}")
    return 0


def _one_line_warnings() -> None:
    """Python warnings (vistrain's and the libraries') as one log line each, without the source line that Python
    prints under them; ``--debug`` keeps Python's own format."""
    import logging
    import warnings

    from vistrain.tracking.logs import LOGGER

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        logging.getLogger(LOGGER).warning("[WARN] %s", message)

    warnings.showwarning = show


def _worker_rank() -> bool:
    """True in a torchrun process other than rank 0: it trains its share and prints no result lines."""
    return os.environ.get("RANK", "0") not in ("", "0")


def _train_optimize(args: argparse.Namespace, cfg: Any, config_path: Path | None) -> int:
    """``train --optimize``: the study of ``vistrain tune``, then (``--auto-continue``) the full training, calibrated
    with ``--use-calibration``. ``--auto-continue`` alone continues the newest unfinished study of the config."""
    from vistrain.pipelines.train import check_final_steps
    from vistrain.pipelines.tune import continue_tune, run_tune

    flag = "--optimize" if args.optimize else "--auto-continue"
    if args.strict:  # not passed to a study's trials yet: refused rather than ignored
        raise UserError(f"--strict: not with {flag}; train the best values with --strict afterwards")
    if args.resume:
        raise UserError(f"{flag}: cannot be combined with --resume (a study is joined with vistrain tune --storage, "
                        "an unfinished one continued with --auto-continue alone)")
    final = {"config_path": config_path, "folds": args.fold, "use_calibration": args.use_calibration,
             "full_pipeline": args.mode == "full-pipeline"}
    if args.auto_continue:  # what the full training needs, checked before the study
        check_final_steps(cfg, args.use_calibration, final["full_pipeline"])
    if args.optimize:
        result = run_tune(cfg, n_trials=args.n_trials, auto_continue=args.auto_continue, **final)
    else:
        result = continue_tune(cfg, **final)
    _print_tune(result)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vistrain.pipelines.evaluate import run_evaluate
    from vistrain.tracking.logs import console_logging

    console_logging()
    run_evaluate(Path(args.run), split=args.split, folds=args.folds, overrides=args.overrides, tta=args.tta,
                 strict=args.strict)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from vistrain.pipelines.compare import run_compare
    from vistrain.tracking.logs import console_logging

    console_logging()
    run_compare([Path(r) for r in args.runs], split=args.split, output=Path(args.output))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from vistrain.pipelines.predict import run_predict
    from vistrain.tracking.logs import console_logging

    console_logging()
    opt = {k: Path(v) if v else None for k, v in (("image_dir", args.image_dir), ("sample", args.sample),
                                                   ("output", args.output))}
    run_predict(Path(args.run), Path(args.input), tta=args.tta, folds=args.folds, probs=args.probs,
                overrides=args.overrides, strict=args.strict, **opt)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from vistrain.pipelines.calibrate import run_calibrate
    from vistrain.tracking.logs import console_logging

    console_logging()
    run_calibrate(Path(args.run))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vistrain.pipelines.export import run_export
    from vistrain.tracking.logs import console_logging

    console_logging()
    summary = run_export(Path(args.run), fmt=args.format, folds=args.folds,
                         output=Path(args.output) if args.output else None, do_verify=args.verify,
                         do_benchmark=args.benchmark, quantize=args.quantize, fp16=args.fp16,
                         budget_ms=args.budget_ms, budget_mb=args.budget_mb, strict=args.strict)
    for entry in summary["models"]:
        line = f"[DONE] fold {entry['fold']}: {entry['path']} ({entry['size_mb']:.1f} MB)"
        if "verify" in entry:
            line += " | verify " + ("passed" if entry["verify"]["passed"] else "FAILED")
        if "benchmark" in entry:
            line += " | " + "; ".join(
                f"{t['threads']} thread{'s' if t['threads'] > 1 else ''}: " + ", ".join(
                    f"batch {k} {v['onnxruntime_ms']:.1f} ms onnxruntime vs {v['torch_ms']:.1f} ms torch"
                    for k, v in t["batches"].items()) for t in entry["benchmark"]["threads"].values())
        print(line)
        for f in entry.get("files", [])[1:]:  # the variants; [0] is the float file of the line above
            agree = "" if f["top1_agreement"] is None else (
                f", top-1 agreement {f['top1_agreement']:.2%} with the float model, "
                f"val top-1 change {f['val_top1_change']:+.4f}, on {entry['validation']['images']} validation images")
            print(f"[DONE] fold {entry['fold']}: {f['path']} ({f['size_mb']:.1f} MB, "
                  f"{f['kind']} {f['quantization']['method']}{agree})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from vistrain.pipelines.serve import run_serve
    from vistrain.tracking.logs import console_logging

    console_logging()
    flags = {"max_files": args.max_files, "max_mb": args.max_mb, "top_k": args.top_k,
             "min_resolution": args.min_resolution, "formats": args.formats, "max_pixels": args.max_pixels,
             "max_request_mb": args.max_request_mb, "max_concurrency": args.max_concurrency,
             "timeout_s": args.timeout}
    run_serve(Path(args.target), host=args.host, port=args.port, fold=args.fold, limits=flags,
              log_file=Path(args.log_file) if args.log_file else None, api_key_env=args.api_key_env,
              strict=args.strict)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from vistrain.pipelines.search import run_search
    from vistrain.tracking.logs import console_logging

    console_logging()
    run_search(Path(args.run), Path(args.gallery), Path(args.query), top_k=args.top_k,
               output=Path(args.output) if args.output else None)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from vistrain.viz.report import write_report

    print(f"[DONE] report written to {write_report(Path(args.run).resolve())}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vistrain.pipelines.demo import run_demo
    from vistrain.tracking.logs import console_logging

    console_logging()
    result = run_demo(Path(args.out) if args.out else None, Path(args.config) if args.config else None,
                      args.overrides, scenario=args.scenario)
    s = result.run.summary
    print(f"[DONE] run directory: {result.run.run_dir}")
    if args.scenario == "digits":
        print(f"[DONE] demo validation macro_f1={s['mean']['macro_f1']:.4f} accuracy={s['mean']['accuracy']:.4f}")
        return 0
    from vistrain.engine.deploy import budget_line

    for entry in (result.export or {}).get("models", []):
        for f in entry.get("files", []):
            agree = "" if f.get("top1_agreement") is None else (
                f", top-1 agreement {f['top1_agreement']:.2%} on {entry['validation']['images']} validation images")
            print(f"[DONE] export: {f['path']} ({f['size_mb']:.1f} MB{agree})")
            if f.get("budget"):
                print(budget_line(f))
    test = s.get("test") or {}
    real = test.get("top1@real", s["mean"].get("top1@real"))
    which = "test" if "top1@real" in test else "validation"
    print(f"[DONE] pills demo: top1@real={'n/a' if real is None else f'{real:.4f}'} on the {which} split "
          f"(chance 1/{result.num_classes} = {1 / result.num_classes:.4f}), validation top1@real="
          f"{s['mean'].get('top1@real', float('nan')):.4f} macro_f1={s['mean']['macro_f1']:.4f} "
          f"in {result.seconds:.0f} s")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from vistrain.config.loader import load_config
    from vistrain.pipelines.split import run_split
    from vistrain.tracking.logs import console_logging

    console_logging()
    cfg = load_config(args.config, mode=args.mode, overrides=args.overrides)
    run_split(cfg, Path(args.output))
    print(f"[DONE] splits written to {args.output}")
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from vistrain.config.loader import load_config
    from vistrain.pipelines.manifest import run_manifest
    from vistrain.tracking.logs import console_logging

    console_logging()
    cfg = load_config(args.config, mode=args.mode, overrides=args.overrides)
    run_manifest(cfg, Path(args.output))
    print(f"[DONE] manifest written to {args.output}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from vistrain.pipelines.audit import run_audit
    from vistrain.tracking.logs import console_logging

    console_logging()
    if args.run is not None and "=" in args.run:  # `audit --config F key=value`: the first word is an override
        args.overrides.insert(0, args.run)
        args.run = None
    summary = run_audit(Path(args.run) if args.run else None, Path(args.config) if args.config else None,
                        output=Path(args.output) if args.output else None,
                        clean=Path(args.write_clean) if args.write_clean else None, policy=args.policy,
                        overrides=args.overrides, force=args.force)
    print(f"[DONE] audit written to {summary['output']}")
    return 0


def _number(cast: Callable[[str], Any], what: str, above: float = 0, most: float | None = None
            ) -> Callable[[str], Any]:
    """An argparse ``type``: ``cast(text)`` greater than ``above`` (and at most ``most``), else one-line error."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not value > above or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"expected {what}; got '{text}'")
        return value

    return parse


def _formats(text: str) -> list[str]:
    """``--formats JPEG,PNG``, checked as ``serve.formats`` is."""
    from pydantic import ValidationError

    from vistrain.config.schema import ServeCfg

    try:
        return ServeCfg(formats=[f.strip() for f in text.split(",") if f.strip()]).formats
    except ValidationError as err:
        raise argparse.ArgumentTypeError(err.errors()[0]["msg"].removeprefix("Value error, ")) from None


_positive_int = _number(int, "a positive whole number")
_positive_float = _number(float, "a positive number")
_port = _number(int, "a port number, 1..65535", most=65535)


def _print_tune(result: Any) -> None:
    params = " ".join(f"{k}={v}" for k, v in result.best_params.items())
    print(f"[DONE] tune directory: {result.tune_dir}")
    print(f"[DONE] best trial {result.best_trial}: {result.monitor}={result.best_value:.4f} | {params}")
    if result.run_dir is not None:
        print(f"[DONE] run directory: {result.run_dir}")


def cmd_tune(args: argparse.Namespace) -> int:
    from vistrain.config.loader import load_config
    from vistrain.pipelines.tune import run_tune

    cfg = load_config(args.config, mode=args.mode, overrides=args.overrides)
    result = run_tune(cfg, n_trials=args.n_trials, storage=args.storage, study_name=args.study_name,
                      timeout=args.timeout, auto_continue=args.auto_continue, config_path=Path(args.config))
    _print_tune(result)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from vistrain.config.loader import load_config
    from vistrain.pipelines.doctor import run_doctor
    from vistrain.tracking.logs import console_logging

    console_logging()
    cfg = load_config(args.config, mode=args.mode, overrides=args.overrides) \
        if args.config or args.overrides else None
    run_doctor(cfg, auto_batch=args.auto_batch)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and exit 2) like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        """``key=value`` overrides may also come after the flags (``evaluate RUN --split test eval.rerank=true``):
        argparse fills a ``*`` positional from its first stretch of words only, so the rest is collected here."""
        parsed, extra = self.parse_known_args(args, namespace)
        stray = [a for a in extra if a.startswith("-") or "=" not in a]
        if extra and (stray or not isinstance(getattr(parsed, "overrides", None), list)):
            self.error(f"unrecognized arguments: {' '.join(stray or extra)}")
        if extra:
            parsed.overrides.extend(extra)
        return parsed


def _strict(p: argparse.ArgumentParser, fallbacks: str) -> None:
    """``--strict``: the command's fallbacks (``engine/fallbacks.py``) are errors instead of recorded."""
    p.add_argument("--strict", action="store_true",
                   help=f"fail (exit 1) rather than fall back ({fallbacks}); without it a fallback is logged as "
                        "[FALLBACK] and listed under fallbacks in the command's JSON")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    # SUPPRESS: a sub-command's default must not overwrite `vistrain --debug train ...`
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    parser = _Parser(prog="vistrain", parents=[common],
                                     description="Train, evaluate and serve timm image models from one YAML config.")
    parser.add_argument("--version", action="version", version=f"vistrain {vistrain.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(func=func, command_label=name.upper())
        return p

    def config_args(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--config", required=required, help="YAML config file")
        p.add_argument("--mode", choices=["basic", "fast", "highperf", "full-pipeline"],
                       help="preset under the config file: fast (small model, 224 px), highperf (384 px, hard aug), "
                            "full-pipeline (basic, then predict data.image_dir_test into RUN/submission.csv)")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides, e.g. train.lr=3e-4")

    def eval_overrides(p: argparse.ArgumentParser) -> None:
        from vistrain.config.loader import EVAL_OVERRIDES

        p.add_argument("overrides", nargs="*", metavar="key.path=value",
                       help="evaluation options for this command only, e.g. data.test_csv=labels.csv eval.tta=[hflip] "
                            f"({', '.join(EVAL_OVERRIDES)})")

    p = add("train", cmd_train, "train a model (all folds or one), writing a run directory")
    config_args(p, required=False)
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue the newest unfinished run of this config, or RUN_DIR, from its last epoch")
    p.add_argument("--fresh", action="store_true", help="always start a new run")
    p.add_argument("--fold", type=_folds, metavar="0,2", help="train these folds (overrides data.valid_fold)")
    p.add_argument("--use-calibration", action="store_true",
                   help="fit a temperature on the out-of-fold (or validation) logits after training (with --optimize: "
                        "of the run --auto-continue trains)")
    p.add_argument("--optimize", action="store_true",
                   help="search tune.space first (as vistrain tune); with --auto-continue, then train the best")
    p.add_argument("--n-trials", type=_positive_int, metavar="N",
                   help="with --optimize: the study's total of trials run to an end (default: tune.n_trials)")
    p.add_argument("--auto-continue", action="store_true",
                   help="with --optimize: then train the config with the best values, recording them in "
                        "tuned_from.json; alone: continue the newest study of this config whose trials or whose "
                        "training of the best values are not done (e.g. after --optimize alone), then do that")
    _strict(p, "torch.compile -> eager, train.amp bf16 / fp16 -> fp32 on a CPU; summary.json")
    p.set_defaults(command_label="TRAINING")

    p = add("evaluate", cmd_evaluate, "score a run: metrics, per-class table, confusion matrix into RUN/eval/SPLIT/")
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("--split", default="val", choices=["val", "test", "oof"])
    p.add_argument("--folds", default="all", metavar="all|0,2")
    p.add_argument("--tta", action="store_true",
                   help="average the eval.tta views, as predict --tta (also on when eval.tta=... is given)")
    _strict(p, "a checkpoint without its preprocessing read with resize + normalisation only; metrics.json")
    eval_overrides(p)

    p = add("compare", cmd_compare, "compare runs on the same images: figures with 95% intervals, paired "
                                    "differences to the first run, McNemar, config differences -> compare.html")
    p.add_argument("runs", nargs="+", metavar="RUN", help="two or more run directories; the first is the reference")
    p.add_argument("--split", choices=["test", "oof"],
                   help="default: test when every run has eval/test/predictions.csv, else oof")
    p.add_argument("--output", default="compare", help="folder for compare.json, compare.html, curves.png")

    p = add("predict", cmd_predict, "fold-ensemble predictions for a folder or CSV of images -> ID,target CSV")
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("--input", required=True, help="folder of images, or a CSV with an ID column")
    p.add_argument("--image-dir", help="where a CSV's images are (default: data.image_dir_test)")
    p.add_argument("--sample", help="sample submission: output rows follow its IDs and order")
    p.add_argument("--output", help="CSV to write (default: RUN/predictions.csv)")
    p.add_argument("--tta", action="store_true", help="average the eval.tta views (default: horizontal flip)")
    p.add_argument("--folds", default="all", metavar="all|0,2")
    p.add_argument("--probs", action="store_true", help="add a prob_<class> column per class")
    _strict(p, "a checkpoint without its preprocessing read with resize + normalisation only")
    eval_overrides(p)

    p = add("calibrate", cmd_calibrate, "fit a temperature on a run's out-of-fold logits -> RUN/calibration.json")
    p.add_argument("run", metavar="RUN", help="run directory")

    p = add("export", cmd_export, "each fold's best model as ONNX with its preprocessing in the metadata")
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("--format", default="onnx", help="onnx (the only format so far)")
    p.add_argument("--folds", default=None, metavar="all|0,2", help="folds to export (default: every trained fold)")
    p.add_argument("--output", metavar="DIR", help="folder for model_fold{k}.onnx and export.json "
                                                   "(default: RUN/export)")
    p.add_argument("--verify", action="store_true",
                   help="compare onnxruntime with PyTorch on the run's images; a mismatch fails the command")
    p.add_argument("--benchmark", action="store_true", help="CPU latency of onnxruntime and PyTorch, batch 1 and 32, "
                   "with 1 thread and every core")
    p.add_argument("--quantize", choices=["int8"], help="also model_fold{k}.int8.onnx: static int8 calibrated on the "
                   "fold's validation images (dynamic if that fails)")
    p.add_argument("--fp16", action="store_true", help="also model_fold{k}.fp16.onnx (float32 input and outputs)")
    p.add_argument("--budget-ms", type=_positive_float, metavar="MS",
                   help="batch-1 p95 CPU latency (every usable core) each file must meet: a PASS/FAIL line per "
                        "file, exit 1 when none passes")
    p.add_argument("--budget-mb", type=_positive_float, metavar="MB", help="file size each file must meet (as above)")
    _strict(p, "int8 static -> dynamic, --verify on random inputs, a checkpoint's preprocessing assumed; export.json")

    p = add("serve", cmd_serve, "HTTP inference for a run's model or an exported ONNX file (FastAPI)")
    p.add_argument("target", metavar="RUN|MODEL.onnx", help="run directory, or an ONNX file from vistrain export")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port, 1..65535 (default 8000)")
    p.add_argument("--fold", type=int, metavar="K",
                   help="with a RUN: serve this fold only (default: every trained fold averaged, as predict does)")
    # Default None: the serve: section of the run's config (or the ONNX file's vistrain.serve) applies.
    p.add_argument("--max-files", type=_positive_int, metavar="N", help="images per request (serve.max_files: 32)")
    p.add_argument("--max-mb", type=_positive_float, metavar="MB", help="size of one upload (serve.max_mb: 20)")
    p.add_argument("--top-k", type=_positive_int, metavar="K", help="classes per answer (serve.top_k: 5)")
    p.add_argument("--min-resolution", type=_number(int, "a whole number >= 0", above=-1), metavar="PX",
                   help="an image with a side under PX gets a warning (serve.min_resolution: 512; 0: never)")
    p.add_argument("--formats", type=_formats, metavar="JPEG,PNG",
                   help="image formats that get no warning (serve.formats: JPEG,PNG)")
    p.add_argument("--max-pixels", type=_positive_int, metavar="N", help="decode budget per image: a larger JPEG "
                   "is decoded reduced (1/2..1/8), other formats refused (serve.max_pixels: 24000000)")
    p.add_argument("--max-request-mb", type=_positive_float, metavar="MB",
                   help="a larger request body is refused (413) before it is read (serve.max_request_mb: 64)")
    p.add_argument("--max-concurrency", type=_positive_int, metavar="N",
                   help="POST /predict requests in flight, upload to answer; one more gets 503 + Retry-After "
                        "(serve.max_concurrency: 4)")
    p.add_argument("--timeout", type=_positive_float, metavar="S",
                   help="a prediction taking longer is answered 504; on SIGTERM the requests in flight get this "
                        "long to be answered (serve.timeout_s: 30)")
    p.add_argument("--api-key-env", metavar="NAME", help="require Authorization: Bearer <key> on every route but "
                   "/health, the key read from environment variable NAME")
    p.add_argument("--log-file", metavar="F", help="log file (appended; default: RUN/serve.log, or serve.log beside "
                                                   "the ONNX file): start-up, refused uploads, errors with traceback")
    _strict(p, "a model without its preprocessing served with resize + normalisation only; GET /metadata")
    p.set_defaults(command_label="SERVING")

    p = add("search", cmd_search, "nearest gallery images of a query image for an embedding run")
    p.add_argument("run", metavar="RUN", help="run directory (task: embedding)")
    p.add_argument("--gallery", required=True, help="folder of gallery images (class sub-folders or re-id names)")
    p.add_argument("--query", required=True, help="the query image")
    p.add_argument("--top-k", type=_positive_int, default=20, metavar="K",
                   help="nearest gallery images to show (default 20; at most the gallery size)")
    p.add_argument("--output", help="PNG grid to write (default: RUN/search/<query>.png; a CSV beside it)")

    p = add("report", cmd_report, "write RUN/report.html: one self-contained page with the run's numbers and plots")
    p.add_argument("run", metavar="RUN", help="run directory")

    p = add("demo", cmd_demo, "write a demo data set and train its config on the CPU (digits, or pills + export)")
    p.add_argument("--scenario", choices=["digits", "pills"], default="digits",
                   help="digits: scikit-learn's digits, configs/demo.yaml; pills: generated studio + real pill "
                        "photos, configs/demo_pills.yaml, then the int8 export (default: digits)")
    p.add_argument("--out", help="where the demo images go (default: ./demo_data, pills: ./demo_data/pills)")
    p.add_argument("--config", help="demo config (default: the scenario's configs/demo*.yaml of this checkout)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    p.set_defaults(command_label="TRAINING")

    p = add("tune", cmd_tune, "search tune.space with Optuna (pruning bad trials early) -> a tune directory")
    config_args(p, required=True)
    p.add_argument("--n-trials", type=_positive_int, metavar="N",
                   help="the study's total: trials run to an end (completed, pruned or failed) by every process "
                        "working on the study, those before this one included; a process stops when the study "
                        "holds N (default: tune.n_trials)")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage shared by workers, e.g. sqlite:///study.db or postgresql://host/db "
                        "(default: tune.storage, else a private SQLite file in the tune directory)")
    p.add_argument("--study-name", metavar="NAME", help="study to create or join (default: tune.study_name, "
                                                        "else project.name)")
    p.add_argument("--timeout", type=float, metavar="SEC", help="stop starting trials after SEC seconds")
    p.add_argument("--auto-continue", action="store_true",
                   help="then train the config with the best values (a normal run directory with tuned_from.json)")
    p.set_defaults(command_label="TUNING")

    p = add("doctor", cmd_doctor, "check this machine for training: versions, GPUs, precision, workers, /dev/shm")
    config_args(p, required=False)
    p.add_argument("--auto-batch", action="store_true",
                   help="also find the batch size train.batch_size=auto would pick for the config (needs --config)")

    p = add("split", cmd_split, "write the fold assignment that train would use")
    config_args(p, required=True)
    p.add_argument("--output", default="splits.csv", help="CSV to write (default: ./splits.csv)")

    p = add("manifest", cmd_manifest, "describe the data train would use (classes, per-split and per-domain counts, "
                                      "hash, preprocessing) in a manifest.json, without training")
    config_args(p, required=True)
    p.add_argument("--output", default="manifest.json", help="JSON to write (default: ./manifest.json)")

    p = add("audit", cmd_audit, "find label issues, duplicates (leakage across splits and groups), outliers and "
                                "class imbalance in a run's or a config's data -> audit/")
    p.add_argument("run", nargs="?", metavar="RUN", help="run directory (uses its out-of-fold predictions and model)")
    p.add_argument("--config", help="YAML config: audit its data before any training")
    p.add_argument("--output", metavar="DIR", help="folder to write (default: RUN/audit, or ./audit with --config)")
    p.add_argument("--write-clean", metavar="F", help="also write a manifest (data.source: manifest) of the data "
                                                      "with the flagged rows handled by --policy")
    p.add_argument("--policy", metavar="drop|relabel|review",
                   help="with --write-clean: drop flagged rows (default), relabel label issues to the suggested "
                        "class (dropping the other flagged rows), or keep every row with a review column")
    p.add_argument("--force", action="store_true",
                   help="with --write-clean: write the manifest even when it drops more than audit.max_drop_frac of "
                        "the rows or leaves a class under data.min_images_per_class (refused otherwise, exit 2)")
    p.add_argument("overrides", nargs="*", metavar="audit.key=value", help="e.g. audit.near_dup_z=8")
    return parser


def main(argv: list[str] | None = None) -> int:
    from vistrain.tracking.logs import exit_line

    args = build_parser().parse_args(argv)
    args.debug = getattr(args, "debug", False)
    if not args.debug:
        _one_line_warnings()
    code, outcome = 1, None
    try:
        code = args.func(args)
    except Preempted as err:  # SIGTERM / SIGUSR1: stopped in good order, not an error
        code, outcome = exit_code(err), "INTERRUPTED"
        print(describe(err), file=sys.stderr, flush=True)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - the one place that turns an error into a code
        code = exit_code(err)
        if args.debug and not isinstance(err, KeyboardInterrupt):
            traceback.print_exc()
        bug = code == 1 and not isinstance(err, CheckFailed)
        hint = " (run with --debug for the traceback)" if bug and not args.debug else ""
        print(f"error: {describe(err)}{hint}", file=sys.stderr, flush=True)
    # The commands whose log files end with the [EXIT] line say it on the console too (rank 0 only).
    if args.command_label in ("TRAINING", "TUNING", "SERVING") and not _worker_rank():
        print(exit_line(args.command_label, code, outcome), flush=True)
    return code
