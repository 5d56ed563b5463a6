"""``vistrain calibrate RUN``: parse, then ``Run.calibrate``."""

from __future__ import annotations

import argparse

from vistrain.pipelines._args import console

NAME = "calibrate"
HELP = "fit a temperature on a run's out-of-fold logits -> RUN/calibration.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory")


def run_calibrate(args: argparse.Namespace) -> int:
    import vistrain

    console()
    vistrain.Run(args.run).calibrate()
    return 0
