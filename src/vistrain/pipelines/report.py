"""``vistrain report RUN``: parse, then ``Run.report``."""

from __future__ import annotations

import argparse

NAME = "report"
HELP = "write RUN/report.html: one self-contained page with the run's numbers and plots"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory")


def run_report(args: argparse.Namespace) -> int:
    import vistrain

    print(f"[DONE] report written to {vistrain.Run(args.run).report()}")
    return 0
