"""Fallbacks: where a command does something other than what was asked because that cannot be done here, it says
so and records it, and ``--strict`` (``strict=True``) makes it an error instead.

A fallback keeps a command going (an int8 file quantised dynamically when static quantisation fails, a model trained
eagerly where torch.compile cannot compile, ``--verify`` on random inputs when the run's images are gone, a checkpoint
from before vistrain recorded preprocessing read with resize + normalisation only), but the result is not quite the
one asked for: a log line is easy to miss, so each is one ``[FALLBACK]`` line and an entry ``{"what", "from", "to",
"reason"}`` (plus where: ``fold``) in the ``fallbacks`` list of the command's JSON (summary.json, export.json,
eval/<split>/metrics.json, serve's /metadata). A user who would rather stop than accept one asks for ``--strict``:
the fallback is then ``FallbackRefused`` (exit 1), one line with the reason and how to avoid it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from vistrain.errors import FallbackRefused, one_line

log = logging.getLogger(__name__)


@dataclass
class Fallbacks:
    """The fallbacks of one command, in the order they happened (each once); ``strict``: refuse them instead."""

    strict: bool = False
    entries: list[dict[str, Any]] = field(default_factory=list)

    def note(self, what: str, from_: str, to: str, reason: str, avoid: str, logger: logging.Logger = log,
             **where: Any) -> dict[str, Any]:
        """Record that ``what`` (a config key or flag) uses ``to`` instead of ``from_`` because of ``reason``, with
        one ``[FALLBACK]`` line on ``logger``; returns the entry. Strict: raise ``FallbackRefused`` naming it and
        ``avoid`` (how to do without the fallback) instead."""
        reason = one_line(reason)
        if self.strict:
            raise FallbackRefused(f"--strict: {what}: {reason}; refused to fall back from {from_} to {to}; {avoid}")
        entry = {"what": what, "from": from_, "to": to, "reason": reason, **where}
        if entry not in self.entries:  # several folds falling back alike: one entry, one line
            self.entries.append(entry)
            logger.warning("[FALLBACK] %s%s: %s -> %s: %s (--strict makes this an error)", what,
                           "".join(f" {k}={v}" for k, v in where.items()), from_, to, reason)
        return entry
