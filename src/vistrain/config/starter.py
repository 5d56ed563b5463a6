"""``vistrain init``: a commented starter config for one's own data, one per task (``vistrain/configs/init/``,
package data), written where the user asks. The files say what each key means and which to change first."""

from __future__ import annotations

import shlex
from pathlib import Path

from vistrain.config.bundled import bundled_config
from vistrain.errors import UserError, did_you_mean

STARTER_TASKS = ("classification", "embedding", "reid", "pills")
# Each starter's first line is the command that runs it; the written file names the path the user chose.
RUN_LINE = "# vistrain train --config vistrain.yaml\n"


def starter_text(task: str, output: Path) -> str:
    """The starter of ``task`` as it is written to ``output``."""
    if task not in STARTER_TASKS:
        raise UserError(f"--task: unknown task '{task}'; valid: {', '.join(STARTER_TASKS)}"
                        f"{did_you_mean(task, STARTER_TASKS)}")
    text = bundled_config(f"init/{task}.yaml").read_text()
    return text.replace(RUN_LINE, f"# vistrain train --config {shlex.quote(str(output))}\n", 1)


def check_output(output: Path, force: bool = False) -> None:
    """Where a starter may be written: a file (not a folder), an existing one only with ``force``."""
    if output.is_dir():
        raise UserError(f"--output: {output} is a folder; name the file to write, e.g. {output / 'vistrain.yaml'}")
    if output.exists() and not force:
        raise UserError(f"--output: {output} exists; pass --force to overwrite it, or name another file")
