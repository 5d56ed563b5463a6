"""``vistrain runs [DIR] [--config F] [--sort METRIC] [--format table|csv|json]`` and ``--prune --keep-best N
--older-than AGE [--dry-run]``: parse, then ``vistrain.api.runs`` or ``vistrain.api.prune_runs``; print."""

from __future__ import annotations

import argparse
import sys

from vistrain.errors import UserError
from vistrain.pipelines._args import MODES, number

NAME = "runs"
HELP = ("one row per run directory: date, run, kind, config hash, mode, status, folds done/planned, the monitor's "
        "mean ± std over folds, the test figure [95% interval], duration, size; --prune deletes old runs' weight files")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", nargs="?", metavar="DIR",
                   help="the experiments folder (output.exp_dir; default: experiments, or --config's), a day folder "
                        "or one run directory")
    p.add_argument("--config", help="only the runs of this config (its resolved hash, as --resume matches it) and of "
                                    "its tune studies; DIR defaults to its output.exp_dir")
    p.add_argument("--mode", choices=MODES, help="with --config: the --mode those runs were trained with")
    p.add_argument("--sort", metavar="METRIC",
                   help="a metric of the runs' summary.json (macro_f1, valid_loss, mAP ...: best first, in the "
                        "metric's direction; runs without it last), or date / duration / size (newest, longest, "
                        "largest first); default: oldest first")
    p.add_argument("--format", choices=["table", "csv", "json"], help="default: an aligned table")
    g = p.add_argument_group("pruning", "delete the weight files (ckpt/*.pth, *.safetensors) of runs started more "
                             "than AGE ago; run.json, summary.json, logs and plots stay, so the run is still listed "
                             "(status '..., weights deleted'). Kept: the N best of each project.name (a study's "
                             "trials: of each study) by --sort or the monitor, runs training now (live RUN/.lock), "
                             "each study's best trial")
    g.add_argument("--prune", action="store_true", help="delete; one line per run (MB freed) and the total")
    g.add_argument("--keep-best", type=number(int, "a whole number >= 0", above=-1), metavar="N",
                   help="keep the N best runs of each project / study, whatever their age")
    g.add_argument("--older-than", metavar="AGE", help="only runs started more than AGE ago: 12h, 30d, 2w")
    g.add_argument("--dry-run", action="store_true", help="print what --prune would free; delete nothing")


def run_runs(args: argparse.Namespace) -> int:
    from vistrain import api

    _check(args)
    if args.prune:
        result = api.prune_runs(args.directory, keep_best=args.keep_best, older_than=args.older_than,
                                dry_run=args.dry_run, config=args.config, mode=args.mode, sort=args.sort)
        print("\n".join(result.lines()))
        return 0
    from vistrain.tracking.runs import render

    table = api.runs(args.directory, config=args.config, mode=args.mode, sort=args.sort)
    if table.empty and (args.format or "table") == "table":
        where = args.directory or ("--config's output.exp_dir" if args.config else "experiments")
        print(f"no run directories under {where}", file=sys.stderr)
        return 0
    print(render(table, args.format or "table"))
    return 0


def _check(args: argparse.Namespace) -> None:
    """The pruning flags go together: --prune with both --keep-best and --older-than; the others only with it."""
    if args.prune:
        for flag, value in (("--keep-best N", args.keep_best), ("--older-than AGE", args.older_than)):
            if value is None:
                raise UserError(f"--prune: needs {flag} (e.g. --prune --keep-best 5 --older-than 30d)")
        if args.format is not None:
            raise UserError("--format: lists the runs; --prune prints one line per run pruned")
        return
    for flag, given in (("--keep-best", args.keep_best is not None), ("--older-than", args.older_than is not None),
                        ("--dry-run", args.dry_run)):
        if given:
            raise UserError(f"{flag}: only with --prune (vistrain runs --prune --keep-best 5 --older-than 30d)")
