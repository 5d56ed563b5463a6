"""Command line: build the parser from the verbs (``pipelines/``: each declares its arguments and calls the API),
run the chosen one, map errors to exit codes.

Exit codes: 0 success, 2 user error (one line, no traceback unless --debug), 1 a failed check (export's budget or
--verify: one line) or anything else.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Any

import vistrain
from vistrain.errors import CheckFailed, Preempted, describe, exit_code
from vistrain.pipelines._args import worker_rank


def _one_line_warnings() -> None:
    """Python warnings (vistrain's and the libraries') as one log line each, without the source line that Python
    prints under them; ``--debug`` keeps Python's own format."""
    import logging
    import warnings

    from vistrain.tracking.logs import LOGGER

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        logging.getLogger(LOGGER).warning("[WARN] %s", message)

    warnings.showwarning = show


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and exit 2) like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        """``key=value`` overrides may also come after the flags (``evaluate RUN --split test eval.rerank=true``):
        argparse fills a ``*`` positional from its first stretch of words only, so the rest is collected here."""
        parsed, extra = self.parse_known_args(args, namespace)
        stray = [a for a in extra if a.startswith("-") or "=" not in a]
        if extra and (stray or not isinstance(getattr(parsed, "overrides", None), list)):
            self.error(f"unrecognized arguments: {' '.join(stray or extra)}")
        if extra:
            parsed.overrides.extend(extra)
        return parsed


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command: each verb module (``pipelines.VERBS``) declares its own arguments."""
    import importlib

    from vistrain.pipelines import VERBS

    common = _Parser(add_help=False)
    # SUPPRESS: a sub-command's default must not overwrite `vistrain --debug train ...`
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    parser = _Parser(prog="vistrain", parents=[common],
                     description="Train, evaluate and serve timm image models from one YAML config.")
    parser.add_argument("--version", action="version", version=f"vistrain {vistrain.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name in VERBS:
        verb = importlib.import_module(f"vistrain.pipelines.{name}")
        # argparse %-formats a help string (not a description): a literal % must be doubled there
        p = sub.add_parser(verb.NAME, parents=[common], help=verb.HELP.replace("%", "%%"), description=verb.HELP)
        verb.add_arguments(p)
        p.set_defaults(func=getattr(verb, f"run_{name}"), command_label=getattr(verb, "LABEL", name.upper()))
    return parser


def main(argv: list[str] | None = None) -> int:
    from vistrain.tracking.logs import exit_line

    args = build_parser().parse_args(argv)
    args.debug = getattr(args, "debug", False)
    if not args.debug:
        _one_line_warnings()
    code, outcome = 1, None
    try:
        code = args.func(args)
    except Preempted as err:  # SIGTERM / SIGUSR1: stopped in good order, not an error
        code, outcome = exit_code(err), "INTERRUPTED"
        print(describe(err), file=sys.stderr, flush=True)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - the one place that turns an error into a code
        code = exit_code(err)
        if args.debug and not isinstance(err, KeyboardInterrupt):
            traceback.print_exc()
        bug = code == 1 and not isinstance(err, CheckFailed)
        hint = " (run with --debug for the traceback)" if bug and not args.debug else ""
        print(f"error: {describe(err)}{hint}", file=sys.stderr, flush=True)
    # The commands whose log files end with the [EXIT] line say it on the console too (rank 0 only).
    if args.command_label in ("TRAINING", "TUNING", "SERVING") and not worker_rank():
        print(exit_line(args.command_label, code, outcome), flush=True)
    return code
