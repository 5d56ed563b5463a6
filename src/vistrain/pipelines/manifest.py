"""``vistrain manifest --config F``: parse, then ``vistrain.api.manifest``."""

from __future__ import annotations

import argparse

from vistrain.pipelines._args import config_args, console

NAME = "manifest"
HELP = ("describe the data train would use (classes, per-split and per-domain counts, hash, preprocessing) in a "
        "manifest.json, without training")


def add_arguments(p: argparse.ArgumentParser) -> None:
    config_args(p, required=True)
    p.add_argument("--output", default="manifest.json", help="JSON to write (default: ./manifest.json)")


def run_manifest(args: argparse.Namespace) -> int:
    from vistrain import api

    console()
    api.manifest(args.config, args.output, overrides=args.overrides, mode=args.mode)
    print(f"[DONE] manifest written to {args.output}")
    return 0
