"""``vistrain evaluate RUN``: parse, then ``Run.evaluate`` (the console table is printed by the evaluation)."""

from __future__ import annotations

import argparse

from vistrain.pipelines._args import console, eval_overrides, strict

NAME = "evaluate"
HELP = "score a run: metrics, per-class table, confusion matrix into RUN/eval/SPLIT/"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("--split", default="val", choices=["val", "test", "oof"])
    p.add_argument("--folds", default="all", metavar="all|0,2")
    p.add_argument("--tta", action="store_true",
                   help="average the eval.tta views, as predict --tta (also on when eval.tta=... is given)")
    strict(p, "a checkpoint without its preprocessing read with resize + normalisation only; metrics.json")
    eval_overrides(p)


def run_evaluate(args: argparse.Namespace) -> int:
    import vistrain

    console()
    vistrain.Run(args.run).evaluate(args.split, folds=args.folds, tta=args.tta, echo=True, overrides=args.overrides,
                                    strict=args.strict)
    return 0
