"""``vistrain export RUN``: parse, then ``Run.export``, then a line per file written."""

from __future__ import annotations

import argparse
import json
from typing import Any

from vistrain.pipelines._args import console, positive_float, strict

NAME = "export"
HELP = "each fold's best model as ONNX with its preprocessing in the metadata, or one fold as a timm / Hugging Face " \
       "hub folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("--format", default="onnx", help="onnx (default), or timm: a Hugging Face hub folder "
                   "(config.json, model.safetensors, README.md) that timm.create_model('local-dir:DIR') loads")
    p.add_argument("--folds", default=None, metavar="all|0,2", help="folds to export (default: every trained fold; "
                   "timm: one fold, default 0)")
    p.add_argument("--output", metavar="DIR", help="folder for model_fold{k}.onnx and export.json "
                                                   "(default: RUN/export; timm: RUN/export/timm_fold{k})")
    p.add_argument("--push-to-hub", metavar="REPO", help="timm: upload the folder to this Hugging Face hub repo "
                   "(created when missing; needs a token: hf auth login)")
    p.add_argument("--dry-run", action="store_true", help="timm: write the folder and say what --push-to-hub would "
                   "send, without sending it")
    p.add_argument("--verify", action="store_true",
                   help="compare onnxruntime with PyTorch on the run's images; a mismatch fails the command")
    p.add_argument("--benchmark", action="store_true", help="CPU latency of onnxruntime and PyTorch, batch 1 and 32, "
                   "with 1 thread and every core")
    p.add_argument("--quantize", choices=["int8"], help="also model_fold{k}.int8.onnx: static int8 calibrated on the "
                   "fold's validation images (dynamic if that fails)")
    p.add_argument("--fp16", action="store_true", help="also model_fold{k}.fp16.onnx (float32 input and outputs)")
    p.add_argument("--budget-ms", type=positive_float, metavar="MS",
                   help="batch-1 p95 CPU latency (every usable core) each file must meet: a PASS/FAIL line per "
                        "file, exit 1 when none passes")
    p.add_argument("--budget-mb", type=positive_float, metavar="MB", help="file size each file must meet (as above)")
    strict(p, "int8 static -> dynamic, --verify on random inputs, a checkpoint's preprocessing assumed; export.json")


def run_export(args: argparse.Namespace) -> int:
    import vistrain

    console()
    folder = vistrain.Run(args.run).export(args.format, folds=args.folds, output=args.output, verify=args.verify,
                                           benchmark=args.benchmark, quantize=args.quantize, fp16=args.fp16,
                                           budget_ms=args.budget_ms, budget_mb=args.budget_mb,
                                           strict=args.strict, push_to_hub=args.push_to_hub, dry_run=args.dry_run)
    if args.format == "timm":
        pushed = f" | pushed to https://huggingface.co/{args.push_to_hub}" if args.push_to_hub and not args.dry_run \
            else ""
        load = f'timm.create_model("local-dir:{folder}", pretrained=True)'
        print(f"[DONE] timm folder: {folder} | load it: {load}{pushed}")
        return 0
    for entry in json.loads((folder / "export.json").read_text())["models"]:
        print_model(entry)
    return 0


def print_model(entry: dict[str, Any]) -> None:
    """One line for a fold's float file (verify, benchmark), one per variant (int8, fp16) with its agreement."""
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
