"""``vistrain report RUN``: parse, then ``Run.report``."""

from __future__ import annotations

import argparse

NAME = "report"
HELP = "write RUN/report.html (one self-contained page with the run's numbers and plots) and RUN/MODEL_CARD.md"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory")


def run_report(args: argparse.Namespace) -> int:
    import vistrain

    run = vistrain.Run(args.run)
    print(f"[DONE] report written to {run.report()}")
    if (run.path / "MODEL_CARD.md").is_file():  # refreshed beside it (a card that could not be written: a warning)
        print(f"[DONE] model card: {run.path / 'MODEL_CARD.md'}")
    return 0
