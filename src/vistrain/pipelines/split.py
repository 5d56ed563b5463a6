"""``vistrain split --config F``: parse, then ``vistrain.api.split``."""

from __future__ import annotations

import argparse

from vistrain.pipelines._args import config_args, console

NAME = "split"
HELP = "write the fold assignment that train would use"


def add_arguments(p: argparse.ArgumentParser) -> None:
    config_args(p, required=True)
    p.add_argument("--output", default="splits.csv", help="CSV to write (default: ./splits.csv)")


def run_split(args: argparse.Namespace) -> int:
    from vistrain import api

    console()
    api.split(args.config, args.output, overrides=args.overrides, mode=args.mode)
    print(f"[DONE] splits written to {args.output}")
    return 0
