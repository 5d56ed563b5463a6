"""``vistrain augment --config F [--n 32] [--output grid.png]``: parse, then ``vistrain.api.augment_grid``."""

from __future__ import annotations

import argparse

from vistrain.pipelines._args import config_args, console, positive_int

NAME = "augment"
HELP = "draw the first training batch as the model receives it (augmented, mixed) with its labels"


def add_arguments(p: argparse.ArgumentParser) -> None:
    config_args(p, required=True)
    p.add_argument("--n", type=positive_int, default=32, help="images to show, at most one batch (default: 32)")
    p.add_argument("--output", default="augment_grid.png", help="PNG to write (default: ./augment_grid.png)")


def run_augment(args: argparse.Namespace) -> int:
    from vistrain import api

    console()
    path = api.augment_grid(args.config, n=args.n, output=args.output, overrides=args.overrides, mode=args.mode)
    print(f"[DONE] augment grid written to {path}")
    return 0
