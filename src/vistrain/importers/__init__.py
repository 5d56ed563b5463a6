"""``vistrain import-config``: a vistrain config from another project's training config. ``timm``: timm train.py's
``args.yaml`` (``timm_args``); ``yacs``: a reid-strong-baseline or fast-reid yacs file (``strong_baseline``,
``fastreid``). Each source key becomes the vistrain key that does the same, or an [IMPORT] line (and a comment in
the file) saying what vistrain does instead or that it has no equivalent. The config is validated by vistrain's own
loader before anyone writes it; ``vistrain.api.import_config`` writes it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vistrain.errors import ConfigError, UserError, did_you_mean
from vistrain.importers.draft import Draft, Note
from vistrain.importers.source import read_source

log = logging.getLogger(__name__)

FORMATS = ("timm", "yacs")
DESCRIBED = {"timm": "timm train.py's args.yaml (lower-case argument names: model, opt, lr, sched ...)",
             "yacs": "a yacs config (upper-case sections: MODEL, INPUT, SOLVER ...)"}
YACS_SECTIONS = ("MODEL", "INPUT", "DATASETS", "DATALOADER", "SOLVER", "TEST", "_BASE_")


@dataclass
class Imported:
    text: str  # the vistrain config, as written
    notes: list[Note]  # the source keys it does not carry exactly
    lines: list[str]  # the [IMPORT] lines (logged)
    format: str  # timm / yacs


def import_file(source: str | Path, from_format: str | None = None, run_as: Path | None = None) -> Imported:
    """The vistrain config of the file ``source``, of format ``from_format`` (None: told from its keys); ``run_as``
    is the path its first line trains (the file it will be written to)."""
    if from_format is not None and from_format not in FORMATS:
        raise UserError(f"--from: unknown format '{from_format}'; valid: {', '.join(FORMATS)}"
                        f"{did_you_mean(from_format, FORMATS)}")
    path = Path(source)
    data = read_source(path)
    found = sniff(data)
    if found is None:
        raise UserError(f"{path}: neither {DESCRIBED['timm']} nor {DESCRIBED['yacs']}")
    if from_format is not None and from_format != found:
        raise UserError(f"--from {from_format}: {path} is {DESCRIBED[found]}; use --from {found} or leave --from out")
    draft = _convert(found, data, path)
    text = draft.render(run_as)
    _validate(text, path)
    lines = draft.lines()
    for line in lines:
        log.info(line)
    return Imported(text, draft.notes, lines, found)


def sniff(data: dict[str, Any]) -> str | None:
    """``yacs`` when the top level holds upper-case yacs sections, ``timm`` when it holds train.py's argument
    names, else None."""
    from vistrain.importers.timm_keys import DEFAULTS, REASONS

    if any(key in YACS_SECTIONS for key in data):
        return "yacs"
    if any(key in DEFAULTS or key in REASONS for key in data):
        return "timm"
    return None


def _convert(found: str, data: dict[str, Any], path: Path) -> Draft:
    if found == "timm":
        from vistrain.importers.timm_args import convert

        return convert(data, path)
    from vistrain.importers import fastreid, strong_baseline
    from vistrain.importers.yacs import read_yacs

    keys, project = read_yacs(data, path)
    return (fastreid if project == "fastreid" else strong_baseline).convert(keys, path)


def _validate(text: str, path: Path) -> None:
    """The written text must load as a vistrain config, read back by the loader a user's file goes through."""
    from vistrain.config.loader import load_config, load_yaml

    try:
        load_config(load_yaml(text))
    except ConfigError as err:
        raise UserError(f"{path}: its values make an invalid vistrain config: {'; '.join(err.problems)}") from None
