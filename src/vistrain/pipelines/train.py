"""``vistrain train``: parse, then ``vistrain.train`` (or ``vistrain.tune`` with ``--optimize``), then print."""

from __future__ import annotations

import argparse
from pathlib import Path

from vistrain.errors import UserError
from vistrain.pipelines._args import config_args, folds, positive_int, print_study, strict, worker_rank

NAME = "train"
HELP = "train a model (all folds or one), writing a run directory"
LABEL = "TRAINING"


def add_arguments(p: argparse.ArgumentParser) -> None:
    config_args(p, required=False)
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue the newest unfinished run of this config, or RUN_DIR, from its last epoch")
    p.add_argument("--fresh", action="store_true", help="always start a new run")
    p.add_argument("--fold", type=folds, metavar="0,2", help="train these folds (overrides data.valid_fold)")
    p.add_argument("--use-calibration", action="store_true",
                   help="fit a temperature on the out-of-fold (or validation) logits after training (with --optimize: "
                        "of the run --auto-continue trains)")
    p.add_argument("--optimize", action="store_true",
                   help="search tune.space first (as vistrain tune); with --auto-continue, then train the best")
    p.add_argument("--n-trials", type=positive_int, metavar="N",
                   help="with --optimize: the study's total of trials run to an end (default: tune.n_trials)")
    p.add_argument("--auto-continue", action="store_true",
                   help="with --optimize: then train the config with the best values, recording them in "
                        "tuned_from.json; alone: continue the newest study of this config whose trials or whose "
                        "training of the best values are not done (e.g. after --optimize alone), then do that")
    strict(p, "torch.compile -> eager, train.amp bf16 / fp16 -> fp32 on a CPU; summary.json")


def _split_resume(args: argparse.Namespace) -> None:
    """``--resume`` takes an optional run directory; a ``key=value`` right after it is an override."""
    if isinstance(args.resume, str):
        if "=" in args.resume:
            args.overrides.insert(0, args.resume)
            args.resume = True
        else:
            args.resume = Path(args.resume).resolve()


def run_train(args: argparse.Namespace) -> int:
    import vistrain

    _split_resume(args)
    full_pipeline = args.mode == "full-pipeline"
    if args.optimize or args.auto_continue:
        return _optimize(args, full_pipeline)
    if args.n_trials is not None:
        raise UserError("--n-trials: only with --optimize")
    run = vistrain.train(args.config, overrides=args.overrides, mode=args.mode, folds=args.fold, resume=args.resume,
                         fresh=args.fresh, calibrate=args.use_calibration, progress=None,
                         full_pipeline=full_pipeline, strict=args.strict)
    if not worker_rank():
        print(f"[DONE] run directory: {run.path}")
    return 0


def _optimize(args: argparse.Namespace, full_pipeline: bool) -> int:
    """``train --optimize``: the study of ``vistrain tune``, then (``--auto-continue``) the full training, calibrated
    with ``--use-calibration``. ``--auto-continue`` alone continues the newest unfinished study of the config."""
    import vistrain
    from vistrain.engine.training import check_final_steps

    flag = "--optimize" if args.optimize else "--auto-continue"
    if args.resume:
        raise UserError(f"{flag}: cannot be combined with --resume (a study is joined with vistrain tune --storage, "
                        "an unfinished one continued with --auto-continue alone)")
    if args.strict:  # not passed to a study's trials yet: refused rather than ignored
        raise UserError(f"--strict: not with {flag}; train the best values with --strict afterwards")
    if args.config is None:
        raise UserError("--config: required (or --resume RUN_DIR to continue a run)")
    cfg = vistrain.load_config(args.config, args.overrides, args.mode)
    if args.auto_continue:  # what the full training needs, checked before the study
        check_final_steps(cfg, args.use_calibration, full_pipeline)
    study = vistrain.tune(args.config, overrides=args.overrides, mode=args.mode, n_trials=args.n_trials,
                          auto_continue=args.auto_continue, folds=args.fold, calibrate=args.use_calibration,
                          full_pipeline=full_pipeline, continue_study=not args.optimize)
    print_study(study)
    return 0
