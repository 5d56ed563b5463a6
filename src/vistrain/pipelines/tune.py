"""``vistrain tune --config F``: parse, then ``vistrain.tune`` (tuning/), then the best trial."""

from __future__ import annotations

import argparse

from vistrain.pipelines._args import config_args, positive_int, print_study

NAME = "tune"
HELP = "search tune.space with Optuna (pruning bad trials early) -> a tune directory"
LABEL = "TUNING"


def add_arguments(p: argparse.ArgumentParser) -> None:
    config_args(p, required=True)
    p.add_argument("--n-trials", type=positive_int, metavar="N",
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


def run_tune(args: argparse.Namespace) -> int:
    import vistrain

    study = vistrain.tune(args.config, overrides=args.overrides, mode=args.mode, n_trials=args.n_trials,
                          storage=args.storage, study_name=args.study_name, timeout=args.timeout,
                          auto_continue=args.auto_continue)
    print_study(study)
    return 0
