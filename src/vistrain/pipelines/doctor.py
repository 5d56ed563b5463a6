"""``vistrain doctor``: parse, then ``vistrain.api.doctor``, then its table."""

from __future__ import annotations

import argparse

from vistrain.pipelines._args import config_args, console

NAME = "doctor"
HELP = "check this machine for training: versions, GPUs, precision, workers, /dev/shm"


def add_arguments(p: argparse.ArgumentParser) -> None:
    config_args(p, required=False)
    p.add_argument("--auto-batch", action="store_true",
                   help="also find the batch size train.batch_size=auto would pick for the config (needs --config)")


def run_doctor(args: argparse.Namespace) -> int:
    from vistrain import api

    console()
    api.doctor(args.config, overrides=args.overrides, mode=args.mode, auto_batch=args.auto_batch, echo=True)
    return 0
