"""The vistrain config an importer builds, written as the shipped configs are (``configs/*.yaml``): the command
that runs it first, sections in the same order, one key per line, a comment where a value is an approximation, and
the source's keys that have no vistrain equivalent listed in the header, each with the reason."""

from __future__ import annotations

import shlex
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vistrain.importers.source import shown

SECTIONS = ("task", "project", "data", "model", "loss", "sampler", "train", "preprocess", "augment", "eval",
            "tracking")
WIDTH = 118  # the house line length, less a margin
COMMENT_COLUMN = 40  # inline comments start here, as in configs/reid_market.yaml


@dataclass
class Note:
    """One source key the config does not carry exactly: ``target`` the vistrain key that approximates it (its
    comment in the file), None when nothing in vistrain does (a header line)."""

    key: str
    value: Any
    why: str
    target: str | None = None

    def text(self) -> str:
        return f"{self.key}={shown(self.value)}: {self.why}"


@dataclass
class Draft:
    origin: str  # what the config was imported from, in words, for the header
    values: dict[str, Any] = field(default_factory=dict)  # dotted vistrain key -> value, in writing order
    comments: dict[str, list[str]] = field(default_factory=dict)  # dotted key -> comments on its line
    blocks: dict[str, list[str]] = field(default_factory=dict)  # section -> comment lines above it
    notes: list[Note] = field(default_factory=list)
    not_read: dict[str, str] = field(default_factory=dict)  # source keys its own settings leave unread: why
    unset: list[str] = field(default_factory=list)  # source keys given no value (null, false, ''): nothing to carry

    def set(self, key: str, value: Any, comment: str | None = None) -> None:
        """``key`` (dotted, e.g. ``train.lr``) gets ``value``; ``comment`` says where it came from."""
        self.values[key] = value
        if comment:
            self.comments.setdefault(key, []).append(comment)

    def approx(self, source_key: str, source_value: Any, key: str, value: Any, why: str) -> None:
        """``key`` gets ``value``, the nearest vistrain has to the source's ``source_key``: an [IMPORT] line and a
        comment on the key say what differs."""
        self.values[key] = value
        self.note(source_key, source_value, why, target=key)

    def note(self, source_key: str, source_value: Any, why: str, target: str | None = None) -> None:
        note = Note(source_key, source_value, why, target)
        self.notes.append(note)
        if target is not None:
            self.comments.setdefault(target, []).append(note.text())

    def lines(self) -> list[str]:
        """The [IMPORT] lines: one per key not carried exactly, then one naming the keys the source gives no value
        and one naming those its own settings leave unread (nothing to carry either way)."""
        lines = [f"[IMPORT] {note.text()}" for note in self.notes]
        if self.unset:
            lines.append(f"[IMPORT] unset in the source, nothing to carry: {', '.join(self.unset)}")
        if self.not_read:
            unread = ", ".join(f"{key} ({why})" for key, why in self.not_read.items())
            lines.append(f"[IMPORT] not read by the source with its other settings, nothing to carry: {unread}")
        return lines

    def render(self, run_as: Path | None) -> str:
        """The config file's text; ``run_as``: the path its first line trains (``vistrain.yaml`` when printed)."""
        head = [f"# vistrain train --config {shlex.quote(str(run_as or 'vistrain.yaml'))}",
                *_comment(f"Imported by `vistrain import-config` from {self.origin}. docs/migrating.md lists how each "
                          "key maps.")]
        unmapped = [n for n in self.notes if n.target is None]
        if unmapped:
            head.append("# Not carried over (no vistrain equivalent):")
            for note in unmapped:
                head += _comment(note.text(), indent="#   ", more="#     ")
        quiet = len(self.unset) + len(self.not_read)
        if quiet:
            head += _comment(f"{quiet} more keys are unset in the source or not read with its other settings: "
                             "nothing to carry (import-config names them on stderr).")
        body: list[str] = []
        for section in SECTIONS:
            keys = {k: self.values[k] for k in sorted(self.values, key=_rank)
                    if k == section or k.startswith(f"{section}.")}
            if not keys:
                continue
            body += [f"# {line}" for line in self.blocks.get(section, [])]
            if section in keys:  # a top-level scalar: task
                body += self._line(section, section, keys[section], 0)
                continue
            body.append(f"{section}:")
            body += self._section(section, keys)
        return "\n".join(head + body) + "\n"

    def _section(self, section: str, keys: dict[str, Any]) -> list[str]:
        out: list[str] = []
        opened: set[str] = set()
        for key, value in keys.items():
            parts = key.split(".")
            for depth in range(1, len(parts) - 1):  # nested sections: preprocess.resize.interpolation
                sub = ".".join(parts[: depth + 1])
                if sub not in opened:
                    opened.add(sub)
                    out.append(f"{'  ' * depth}{parts[depth]}:")
            out += self._line(key, parts[-1], value, len(parts) - 1)
        return out

    def _line(self, key: str, name: str, value: Any, depth: int) -> list[str]:
        pad = "  " * depth
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):  # loss.terms
            lines = [f"{pad}{name}:"] + [f"{pad}  - {_flow(v)}" for v in value]
        else:
            lines = [f"{pad}{name}: {_flow(value)}"]
        comments = self.comments.get(key, [])
        inline = "; ".join(comments)
        if comments and len(lines) == 1 and max(len(lines[0]) + 1, COMMENT_COLUMN) + len(inline) + 2 <= WIDTH:
            return [f"{lines[0].ljust(COMMENT_COLUMN - 2)}  # {inline}"]
        above = [line for comment in comments for line in _comment(comment, indent=f"{pad}# ")]
        return above + lines


# The shipped configs' order where it is not the schema's (configs/reid_market.yaml, recipes/*.yaml)
SHIPPED_ORDER = {
    "train": ["img_size", "batch_size", "target_batch_size", "epochs", "optimizer", "lr", "min_lr", "weight_decay",
              "momentum", "scheduler", "step_milestones", "step_gamma", "plateau_patience", "restart_epochs",
              "restart_mult", "warmup_epochs", "warmup_lr_factor", "label_smoothing"],
    "augment": ["policy", "crop", "scale", "ratio", "pad", "hflip", "vflip", "rotate", "color_jitter", "hue", "auto",
                "random_erasing", "erasing_mode", "erasing_count", "erasing_area", "mixup_alpha", "cutmix_alpha",
                "mix_prob", "mix_switch_prob", "repeats", "splits"],
}


def _rank(key: str) -> tuple[int, ...]:
    """Where ``key`` goes within its section: the shipped configs' order, then the schema's."""
    from vistrain.config.schema import Config

    parts = key.split(".")
    ranks, model = [], Config
    for depth, part in enumerate(parts):
        fields = list(getattr(model, "model_fields", {}))
        shipped = SHIPPED_ORDER.get(parts[0], []) if depth == 1 else []
        ranks.append(shipped.index(part) if part in shipped else len(shipped) + (fields.index(part) if part in fields
                                                                                 else len(fields)))
        annotation = getattr(model, "model_fields", {}).get(part)
        model = annotation.annotation if annotation is not None else None
    return tuple(ranks)


def _flow(value: Any) -> str:
    """A value as the shipped configs write it: YAML flow style on one line (``[256, 128]``, ``{name: ce}``)."""
    if isinstance(value, Path):
        value = str(value)
    return shown(value)


def _comment(text: str, indent: str = "# ", more: str | None = None) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=more or indent,
                         break_long_words=False, break_on_hyphens=False)


def section_block(draft: Draft, section: str, text: str) -> None:
    """Comment lines above ``section``: what the source does there as a whole (its training transform ...)."""
    draft.blocks[section] = textwrap.wrap(text, WIDTH - 2, break_long_words=False, break_on_hyphens=False)
