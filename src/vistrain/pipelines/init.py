"""``vistrain init``: parse, then ``vistrain.api.init`` (a commented starter config for one's own data)."""

from __future__ import annotations

import argparse

NAME = "init"
HELP = "write a commented starter config for your own data (default: ./vistrain.yaml)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vistrain.config.starter import STARTER_TASKS

    p.add_argument("--task", choices=STARTER_TASKS, default="classification",
                   help="classification (one folder per class), embedding (image search), reid (Market-1501 "
                        "layout) or pills (studio + real photos) (default: classification)")
    p.add_argument("--output", default="vistrain.yaml", help="file to write (default: ./vistrain.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists (refused otherwise, exit 2)")


def run_init(args: argparse.Namespace) -> int:
    from vistrain import api

    path = api.init(args.task, args.output, force=args.force)
    print(f"[DONE] {args.task} starter config written to {path}: set its data paths, model.name, train.img_size and "
          f"train.epochs (its header says which), then: vistrain train --config {path}")
    return 0
