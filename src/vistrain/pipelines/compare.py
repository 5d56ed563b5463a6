"""``vistrain compare RUN RUN [...]``: parse, then ``vistrain.api.compare`` (it prints the table)."""

from __future__ import annotations

import argparse

from vistrain.pipelines._args import console

NAME = "compare"
HELP = ("compare runs on the same images: figures with 95% intervals, paired differences to the first run, McNemar, "
        "config differences -> compare.html")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="two or more run directories; the first is the reference")
    p.add_argument("--split", choices=["test", "oof"],
                   help="default: test when every run has eval/test/predictions.csv, else oof")
    p.add_argument("--output", default="compare", help="folder for compare.json, compare.html, curves.png")


def run_compare(args: argparse.Namespace) -> int:
    from vistrain import api

    console()
    api.compare(args.runs, split=args.split, output=args.output, echo=True)
    return 0
