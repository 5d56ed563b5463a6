"""User-facing errors and the name -> builder lookup that every extension table uses.

A ``UserError`` is a mistake the user can fix (bad config, missing file, bad CSV). The CLI prints
its message as one line and exits with code 2; anything else is a bug and exits with code 1.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A mistake in the user's input. ``str(err)`` is the single line shown to the user."""

    exit_code = 2


class CheckFailed(Exception):
    """A check the user asked for did not pass (``export --budget-ms`` met by no file, ``export --verify`` finding
    outputs that differ from PyTorch): the command's answer, neither a mistake in the input (exit 2) nor a bug. Exit
    1, and ``str(err)`` is the whole line shown (no exception name, no traceback hint)."""

    exit_code = 1


class FallbackRefused(CheckFailed):
    """``--strict`` (``strict=True``) and the command could only go on by doing something other than what was asked
    (int8 static -> dynamic, torch.compile -> eager, ``--verify`` on random inputs, a checkpoint's preprocessing
    assumed: ``fallbacks.py``). A check the user asked for that did not pass, as ``--verify`` and
    ``--budget-ms`` are, so exit 1: the input is valid (the same command without ``--strict`` succeeds and records
    the fallback), and the one line names the fallback and how to avoid it."""


class Preempted(KeyboardInterrupt):
    """SIGTERM or SIGUSR1 (a scheduler taking the machine back; SLURM's ``--signal``) stopped the command in good
    order: training finished its current optimiser step and wrote its last checkpoint, run.json says "interrupted",
    and ``--resume`` continues where it stopped (``engine/preemption.py``). A ``KeyboardInterrupt`` like Ctrl-C, so
    what lets Ctrl-C through (``tune``'s trials, Optuna) takes it as an interruption, not a failure. ``exit_code``:
    143 (as a process ended by SIGTERM), or ``train.requeue_exit_code``."""

    run_status = "interrupted"

    def __init__(self, message: str, exit_code: int = 143):
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(UserError):
    """One or more problems in the configuration; each problem is one line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def exit_code(err: BaseException) -> int:
    """The process exit code for a command that ended by ``err``: 2 (or the error's own) for a user error, 1 for a
    failed check, the preemption's code (143, or ``train.requeue_exit_code``), 130 for Ctrl-C, 1 for anything else."""
    if isinstance(err, UserError | CheckFailed | Preempted):
        return err.exit_code
    return 130 if isinstance(err, KeyboardInterrupt) else 1


def describe(err: BaseException) -> str:
    """The error as the one line the user sees (the console's ``error:`` line, the logs' ``[ERROR]`` line,
    run.json's ``error``): a user error's or failed check's own message, else the exception type and its first line."""
    if isinstance(err, ConfigError):  # one line per problem
        return "\n".join(one_line(problem) for problem in err.problems)
    if isinstance(err, UserError | CheckFailed | Preempted):
        return one_line(str(err))
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (``\\r``, ``\\x1f``): a message quoting the
    user's input (a key, a path, an override) must stay on its one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def lookup(table: Mapping[str, T], name: str, key: str) -> T:
    """Return ``table[name]`` or raise a one-line UserError naming the config key and the valid names."""
    if name in table:
        return table[name]
    valid = ", ".join(sorted(table))
    raise UserError(f"{key}: unknown name '{name}'; valid: {valid}{did_you_mean(name, table)}")
