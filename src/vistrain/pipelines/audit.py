"""``vistrain audit RUN`` / ``vistrain audit --config F``: parse, then ``vistrain.api.audit``."""

from __future__ import annotations

import argparse

from vistrain.pipelines._args import console

NAME = "audit"
HELP = ("find label issues, duplicates (leakage across splits and groups), outliers and class imbalance in a run's "
        "or a config's data -> audit/")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", metavar="RUN", help="run directory (uses its out-of-fold predictions and model)")
    p.add_argument("--config", help="YAML config: audit its data before any training")
    p.add_argument("--output", metavar="DIR", help="folder to write (default: RUN/audit, or ./audit with --config)")
    p.add_argument("--write-clean", metavar="F", help="also write a manifest (data.source: manifest) of the data "
                                                      "with the flagged rows handled by --policy")
    p.add_argument("--policy", metavar="drop|relabel|review",
                   help="with --write-clean: drop flagged rows (default), relabel label issues to the suggested "
                        "class (dropping the other flagged rows), or keep every row with a review column")
    p.add_argument("--force", action="store_true",
                   help="with --write-clean: write the manifest even when it drops more than audit.max_drop_frac of "
                        "the rows or leaves a class under data.min_images_per_class (refused otherwise, exit 2)")
    p.add_argument("overrides", nargs="*", metavar="audit.key=value", help="e.g. audit.near_dup_z=8")


def run_audit(args: argparse.Namespace) -> int:
    from vistrain import api

    console()
    if args.run is not None and "=" in args.run:  # `audit --config F key=value`: the first word is an override
        args.overrides.insert(0, args.run)
        args.run = None
    audit = api.audit(args.run, config=args.config, output=args.output, write_clean=args.write_clean,
                      policy=args.policy, force=args.force, overrides=args.overrides)
    print(f"[DONE] audit written to {audit.folder}")
    return 0
