"""The package's shape, as docs/architecture.md promises it: no module imports one that imports it back (directly
or through others), every file under pipelines/ is a thin verb (its arguments, a ``run_*`` function that calls the
API and prints, at most VERB_LINES lines, no other verb imported), nothing below the CLI imports a verb or the CLI,
the public API is what ``vistrain/__init__.py`` exports, the map in docs/architecture.md names every module of the
tree, every name table is one registry that the config schema follows, and validating a config imports no torch."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import typing
from pathlib import Path

from conftest import assert_python_runs

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "vistrain"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imported(name: str, path: Path) -> set[str]:
    """The vistrain modules ``path`` imports, anywhere in the file (a function-level import is still a dependency)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for a in node.names:  # "from vistrain.data import images" imports the module vistrain.data.images
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_one_that_imports_it_back() -> None:
    # Package __init__ files re-export their modules; a module importing its own package's __init__ is not a cycle
    # of the code's layers, so __init__ files are left out of the walk.
    assert [c for c in cycles() if not any(MODULES[m].name == "__init__.py" for m in c)] == []


VERB_LINES = 120  # a verb parses, calls one API function and prints; more than this holds work of its own
SHARED = "vistrain.pipelines._args"  # the verbs' argument helpers


def verbs() -> dict[str, Path]:
    return {n: p for n, p in MODULES.items()
            if n.startswith("vistrain.pipelines.") and p.name != "__init__.py" and n != SHARED}


def test_every_file_under_pipelines_is_a_thin_verb() -> None:
    from vistrain.pipelines import VERBS

    assert sorted(VERBS) == sorted(n.rpartition(".")[2] for n in verbs())
    for name, path in verbs().items():
        tree = ast.parse(path.read_text())
        runs = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("run_")]
        assert runs, f"{path.relative_to(ROOT)}: no run_* function; pipelines/ holds only verbs"
        assert {"add_arguments", f"run_{name.rpartition('.')[2]}"} <= {n.name for n in tree.body
                                                                         if isinstance(n, ast.FunctionDef)}
        lines = len(path.read_text().splitlines())
        assert lines <= VERB_LINES, f"{path.relative_to(ROOT)}: {lines} lines; a verb only parses, calls the API " \
                                    "and prints: move the work below it (api.py, engine/, ...)"
        others = {m for m in GRAPH[name] if m.startswith("vistrain.pipelines.") and m != SHARED}
        assert not others, f"{path.relative_to(ROOT)} imports the verb(s) {sorted(others)}: call the API instead"


def test_nothing_below_the_command_line_imports_a_verb_or_the_cli() -> None:
    top = {"vistrain.cli", "vistrain.__main__", "vistrain.pipelines", *verbs(), SHARED}
    below = {n: deps & top for n, deps in GRAPH.items() if n not in top and deps & top}
    assert below == {}, "an arrow back up to the command line"


def test_the_api_is_exported_and_importing_vistrain_loads_no_torch() -> None:

    import vistrain

    for name in ("load_config", "train", "tune", "Run", "Preprocessor", "UserError", "ConfigError"):
        assert name in vistrain.__all__ and getattr(vistrain, name) is not None, name
    # a Run's files (status, summary, classes) read without torch either: reading a run directory is cheap
    code = ("import sys, tempfile, pathlib, vistrain; d = tempfile.mkdtemp(); "
            "pathlib.Path(d, 'config.yaml').write_text('{}'); vistrain.Run(d).status; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "import vistrain, Run(path) and its files must not load torch"


def test_every_command_is_listed_in_the_help() -> None:
    from vistrain.cli import build_parser
    from vistrain.pipelines import VERBS

    text = build_parser().format_help()  # argparse %-formats each verb's help: a stray % breaks --help
    # a verb's command-line name (NAME) may differ from its module's (import-config in import_config.py)
    names = [importlib.import_module(f"vistrain.pipelines.{v}").NAME for v in VERBS]
    assert [n for n in names if f"    {n} " not in text and f"    {n}\n" not in text] == []


def test_the_architecture_map_matches_the_tree_file_for_file() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("## The map"):]
    section = section[: section.index("\n## ", 3)]
    mapped = set(re.findall(r"^\s+(\w+\.py)\b", section, re.M)) - {"__init__.py"}  # a package face may be named
    files = {p.name for p in MODULES.values() if p.name != "__init__.py"}
    assert sorted(files - mapped) == [], "in the tree, not in docs/architecture.md's map"
    assert sorted(mapped - files) == [], "in docs/architecture.md's map, not in the tree"


def test_every_registry_backed_key_allows_exactly_the_registrys_names() -> None:
    """One source of truth: a key's Literal is its registry's names, every declared name has a builder in the
    registry's module, and every metric the schema lets train.monitor name has a direction (and the reverse)."""
    from vistrain.config import schema
    from vistrain.engine.compare import METRICS as COMPARED
    from vistrain.metrics.classification import DOMAIN_METRICS
    from vistrain.models.losses import check_term_params
    from vistrain.registry import (
        EMBEDDING_LOSSES,
        HEADS,
        LOSSES,
        METRICS,
        OPTIMIZERS,
        REGISTRIES,
        SAMPLERS,
        SCHEDULERS,
        SOURCES,
        domain_metrics,
        higher_is_better,
    )
    from vistrain.viz.report import DOMAIN_METRICS as REPORT_DOMAIN_METRICS

    for registry in REGISTRIES:
        if registry.home:
            importlib.import_module(registry.home)  # its decorators run: a name registered there but not declared shows
        unbound = [n for n in registry.names() if registry is not METRICS and not _has_builder(registry, n)]
        assert unbound == [], f"{registry.kind}: declared in vistrain/registry.py, no builder in {registry.home}"
    keys = [(schema.DataCfg, "source", SOURCES, {}), (schema.SourceCfg, "source", SOURCES, {"mixable": True}),
            (schema.ModelCfg, "head", HEADS, {}), (schema.TrainCfg, "loss", LOSSES, {}),
            (schema.TrainCfg, "optimizer", OPTIMIZERS, {}), (schema.TrainCfg, "scheduler", SCHEDULERS, {}),
            (schema.SamplerCfg, "name", SAMPLERS, {})]
    for section, field, registry, where in keys:
        allowed = typing.get_args(section.model_fields[field].annotation)
        assert allowed == tuple(registry.names(**where)), f"{section.__name__}.{field} and the {registry.kind} registry"
    assert {r.key for *_, r, _ in keys} | {EMBEDDING_LOSSES.key, METRICS.key} == {r.key for r in REGISTRIES}
    assert [check_term_params(name, {}) for name in EMBEDDING_LOSSES.names()] == [[]] * len(EMBEDDING_LOSSES)
    assert check_term_params("arcface", {}), "a name outside the loss-term registry is refused"

    assert schema.MONITORS["classification"] == METRICS.names(monitor="classification")
    assert schema.REID_MONITORS == METRICS.names(monitor="reid")
    assert schema.DOMAIN_MONITORS == domain_metrics() == DOMAIN_METRICS == REPORT_DOMAIN_METRICS
    ks = schema.EvalCfg().recall_ks
    monitors = schema.MONITORS["embedding"] + schema.retrieval_monitors(ks) + schema.retrieval_monitors(ks, True)
    monitors += schema.MONITORS["classification"] + [f"{m}@studio" for m in schema.DOMAIN_MONITORS]
    for name in [*monitors, *COMPARED, "train_loss"]:
        higher_is_better(name)  # a UserError for a name without a direction
    declared = {n for n in METRICS.names() if METRICS.find(n).attrs.get("monitor")}
    assert declared == {METRICS.find(m).name for m in monitors}, "a monitorable metric the schema does not take"


def _has_builder(registry: typing.Any, name: str) -> bool:
    try:
        registry[name]
    except KeyError:
        return False
    return True


def test_validating_a_config_imports_neither_torch_nor_pandas() -> None:
    """The schema takes its names from vistrain.registry, whose builders live beside torch code: the names alone
    must not pull that code in (the CLI validates configs for commands that train nothing)."""
    code = ("import sys\n"
            "from vistrain.config import load_config\n"
            "load_config(None, overrides=['model.head=linear', 'train.scheduler=plateau'])\n"
            "heavy = sorted({'torch', 'timm', 'pandas', 'numpy', 'sklearn'} & set(sys.modules))\n"
            "assert not heavy, heavy\n")
    assert_python_runs(code)
