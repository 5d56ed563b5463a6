"""``vistrain import-config SRC``: parse, then ``vistrain.api.import_config`` (a vistrain config from timm train.py's
args.yaml or a re-ID baseline's yacs file); the [IMPORT] lines go to stderr, so stdout is the config alone."""

from __future__ import annotations

import argparse

from vistrain.pipelines._args import console

NAME = "import-config"
HELP = ("write a vistrain config from timm train.py's args.yaml or a reid-strong-baseline / fast-reid yacs file "
        "(docs/migrating.md)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SRC", help="timm's args.yaml (from a train.py output folder) or a yacs .yml")
    p.add_argument("--from", dest="from_format", metavar="timm|yacs", default=None,
                   help="the source's format (default: told from its keys)")
    p.add_argument("--output", default=None, help="file to write (default: print the config to stdout)")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists (refused otherwise, exit 2)")


def run_import_config(args: argparse.Namespace) -> int:
    from vistrain import api

    console(stream="stderr")
    result = api.import_config(args.source, from_format=args.from_format, output=args.output, force=args.force)
    if args.output is None:
        print(result, end="")
    else:
        print(f"[DONE] config written to {result}: vistrain train --config {result}")
    return 0
