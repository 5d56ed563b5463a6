"""``vistrain predict RUN --input F``: parse, then ``Run.predict_csv`` (the CSV it writes)."""

from __future__ import annotations

import argparse

from vistrain.pipelines._args import console, eval_overrides, strict

NAME = "predict"
HELP = "fold-ensemble predictions for a folder or CSV of images -> ID,target CSV"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("--input", required=True, help="folder of images, or a CSV with an ID column")
    p.add_argument("--image-dir", help="where a CSV's images are (default: data.image_dir_test)")
    p.add_argument("--sample", help="sample submission: output rows follow its IDs and order")
    p.add_argument("--output", help="CSV to write (default: RUN/predictions.csv)")
    p.add_argument("--tta", action="store_true", help="average the eval.tta views (default: horizontal flip)")
    p.add_argument("--folds", default="all", metavar="all|0,2")
    p.add_argument("--probs", action="store_true", help="add a prob_<class> column per class")
    strict(p, "a checkpoint without its preprocessing read with resize + normalisation only")
    eval_overrides(p)


def run_predict(args: argparse.Namespace) -> int:
    import vistrain

    console()
    vistrain.Run(args.run).predict_csv(args.input, output=args.output, image_dir=args.image_dir, sample=args.sample,
                                       tta=args.tta, folds=args.folds, probs=args.probs, overrides=args.overrides,
                                       strict=args.strict)
    return 0
