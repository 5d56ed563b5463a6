"""docs/scaling.md cannot drift: every ``vistrain`` command in it (shell blocks, Kubernetes manifests, inline code)
parses with the real CLI parser, its ``key=value`` overrides and every YAML config fragment validate against the
schema, every config key it names exists, every ``torchrun`` flag parses with the pinned torch's own parser, and a
config file of this checkout it names exists. README and docs/architecture.md link to it."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel

from vistrain.cli import build_parser
from vistrain.config.loader import EVAL_OVERRIDES, parse_overrides, restrict_overrides, validate
from vistrain.config.schema import Config
from vistrain.errors import UserError
from vistrain.pipelines.train import _split_resume

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "scaling.md"
OPERATORS = {"|", "||", "&", "&&", ";", ";;", ">", ">>", "<", ">&", "(", ")", "$("}
FILE_SUFFIXES = {"log", "json", "jsonl", "yaml", "yml", "csv", "pth", "py", "md", "sh", "txt", "u8", "db", "out"}


# ------------------------------------------------------------------------------------------------ extraction

def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def inline_spans(text: str) -> list[str]:
    """Inline code spans outside the fenced blocks."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", prose)


def shell_commands(body: str) -> Iterator[list[str]]:
    """The simple commands of a shell text (continuation lines joined, comments dropped, split at operators)."""
    for line in body.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        command: list[str] = []
        for token in lex:
            if token in OPERATORS:
                yield command
                command = []
            else:
                command.append(token)
        yield command


def manifest_commands(node: Any) -> Iterator[list[str]]:
    """Each container's command + args in a Kubernetes manifest (any mapping with them)."""
    if isinstance(node, dict):
        if isinstance(node.get("command"), list) or isinstance(node.get("args"), list):
            yield [str(t) for t in [*(node.get("command") or []), *(node.get("args") or [])]]
        for value in node.values():
            yield from manifest_commands(value)
    elif isinstance(node, list):
        for value in node:
            yield from manifest_commands(value)


def after(tokens: list[str], word: str) -> list[str] | None:
    """The arguments after the program ``word`` in ``tokens`` (``vistrain ...``, ``-m vistrain ...``)."""
    return tokens[tokens.index(word) + 1:] if word in tokens else None


# ------------------------------------------------------------------------------------------------ checks

def schema_keys(model: type[BaseModel] = Config, prefix: str = "") -> set[str]:
    """Every dotted config key (sections and their fields; a list of sections by its entries' fields)."""
    keys = set()
    for name, field in model.model_fields.items():
        keys.add(prefix + name)
        for kind in (field.annotation, *get_args(field.annotation), *(a for g in get_args(field.annotation)
                                                                      for a in get_args(g))):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                keys |= schema_keys(kind, f"{prefix}{name}.")
    return keys


def check_key(key: str) -> str | None:
    """A problem with a dotted name that starts with a config section (file names like ``train.log`` aside)."""
    first, _, rest = key.partition(".")
    if not rest or first not in Config.model_fields or key.rsplit(".", 1)[-1] in FILE_SUFFIXES:
        return None
    if key in schema_keys():
        return None
    return f"{key}: no such config key"


def check_vistrain(argv: list[str]) -> str | None:
    """A problem with ``vistrain ARGV`` as the CLI would parse it, or None."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        return f"vistrain {' '.join(argv)}: the CLI refuses it"
    parser = next(a for a in build_parser()._actions if a.dest == "command").choices[args.command]
    inexact = [t for t in argv if t.startswith("--") and t.split("=")[0] not in parser._option_string_actions]
    if inexact:  # argparse takes a prefix (--resum); the doc must name the flag itself
        return f"vistrain {' '.join(argv)}: not a flag of {args.command}: {', '.join(inexact)}"
    if args.command == "train":
        _split_resume(args)
    overrides = list(getattr(args, "overrides", None) or [])
    try:
        if args.command in ("evaluate", "predict"):
            restrict_overrides(overrides, EVAL_OVERRIDES, args.command)
        validate(parse_overrides(overrides))
    except UserError as err:
        return f"vistrain {' '.join(argv)}: {err}"
    config = getattr(args, "config", None)
    if config and config.startswith("configs/") and not (ROOT / config).is_file():
        return f"vistrain {' '.join(argv)}: {config} is not in this checkout"
    return None


def check_torchrun(argv: list[str]) -> str | None:
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    try:
        parser.parse_args(argv)
    except SystemExit:
        return f"torchrun {' '.join(argv)}: torchrun refuses it"
    own = argv[:argv.index("-m")] if "-m" in argv else argv  # the flags before the program are torchrun's
    inexact = [t for t in own if t.startswith("--") and t.split("=")[0] not in parser._option_string_actions]
    return f"torchrun: not a torchrun flag: {', '.join(inexact)}" if inexact else None


def check_command(tokens: list[str]) -> list[str]:
    problems = []
    for word, check in (("vistrain", check_vistrain), ("torchrun", check_torchrun)):
        argv = after(tokens, word)
        if argv is not None:
            problems.append(check(argv))
    return [p for p in problems if p]


def check_doc(text: str) -> tuple[list[str], int]:
    """(every problem, how many commands and keys were checked)."""
    problems: list[str] = []
    checked = 0
    commands: list[list[str]] = []
    for lang, body in fenced_blocks(text):
        if lang in ("bash", "sh", "console"):
            commands += shell_commands(body)
        elif lang == "yaml":
            for doc in yaml.safe_load_all(body):
                if isinstance(doc, dict) and set(doc) <= set(Config.model_fields):  # a config fragment
                    checked += 1
                    try:
                        validate(doc)
                    except UserError as err:
                        problems.append(f"config fragment: {err}")
                else:
                    commands += manifest_commands(doc)
    for span in inline_spans(text):
        if span.startswith(("vistrain ", "torchrun ")):
            commands += shell_commands(span)
        for word in re.findall(r"[a-z_]+(?:\.[a-z0-9_]+)+", span):
            checked += 1
            problems += [p for p in [check_key(word)] if p]
    for tokens in commands:
        if "vistrain" in tokens or "torchrun" in tokens:
            checked += 1
            problems += check_command(tokens)
    return problems, checked


# ------------------------------------------------------------------------------------------------ tests

def test_every_command_and_key_in_the_scaling_doc_exists() -> None:
    problems, checked = check_doc(DOC.read_text())
    assert not problems, "\n".join(problems)
    assert checked >= 20  # the doc's recipes were found, not skipped


def test_the_checks_catch_a_wrong_flag_key_or_value() -> None:
    bad = "\n".join([
        "```bash",
        "vistrain train --config configs/train.yaml --resmue RUN",  # no such flag
        "vistrain train --config configs/train.yaml --resum RUN",  # a prefix argparse takes, not the flag's name
        "vistrain tune --config configs/train.yaml --n-trials many",  # not a number
        "vistrain train --config configs/nope.yaml",  # not in the checkout
        "torchrun --nnodes=2 --rdzv-backnd=c10d -m vistrain train --config configs/train.yaml",  # torchrun flag
        "torchrun --nnodes=2 --max-restart=3 -m vistrain train --config configs/train.yaml",  # a prefix again
        "vistrain evaluate RUN train.lr=1",  # a training key where only evaluation keys go
        "```",
        "```yaml",
        "data:",
        "  cache: nvme",  # not a cache mode
        "```",
        "Put the cache in `data.cache_folder` (no such key) and `train.requeue_code=0`.",
    ])
    problems, _ = check_doc(bad)
    assert len(problems) == 10, "\n".join(problems)


def test_readme_and_architecture_link_the_scaling_doc() -> None:
    for page in (ROOT / "README.md", ROOT / "docs" / "architecture.md"):
        assert "docs/scaling.md" in page.read_text() or "(scaling.md)" in page.read_text(), page
