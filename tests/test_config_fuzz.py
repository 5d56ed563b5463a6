"""Config fuzzing: generated YAML documents and key=value overrides through the config loader and `vistrain split`.

Whatever the input (wrong types, unknown and misspelled keys, nested garbage, huge numbers, negative sizes, empty
lists, unicode, YAML that is not a mapping), the command must end in success (exit 0) or a user error (exit 2) with a
one-line message on stderr; never exit 1 (a crash) and never a traceback.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import tiny_config, write_csv_dataset
from vistrain import cli

# Keys the schema has (and near misses of them), so mutations hit real validation paths, not only "unknown key".
SECTIONS = ["project", "data", "model", "train", "augment", "sampler", "loss", "eval", "tracking", "tune", "output",
            "preprocess", "task", "tain", "Data", ""]
LEAVES = ["name", "seed", "source", "folds", "valid_fold", "train_csv", "image_dir_train", "image_ext", "id_col",
          "target_col", "group_col", "class_names", "on_bad_image", "train_ratio", "val_ratio", "test_ratio",
          "min_image_size", "pretrained", "pretrained_path", "init_from", "pooling", "drop_rate", "img_size",
          "batch_size", "epochs", "lr", "min_lr", "warmup_epochs", "scheduler", "step_milestones", "amp", "monitor",
          "num_workers", "num_threads", "device", "policy", "hflip", "rotate", "mixup_alpha", "p", "k", "terms",
          "tta", "knn_k", "recall_ks", "space", "n_trials", "storage", "exp_dir", "logs_dir", "crop", "clahe",
          "grid", "clip_limit", "mean", "std", "resize", "interpolation", "wandb", "tensorboard", "lrr", "epoch",
          "batchsize", "ratio", "sources", "split", "class_map", "weight", "margin"]

SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 1, 2, 3, 7, 32, 10**9, 2**63, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.5, 0.5, 1.0, 1.5, 1e-308, 1e308, 3e-4]),
    st.text(max_size=12),
    st.sampled_from(["auto", "all", "", "csv", "folders", "reid", "manifest", "resnet10t", "cosine", "pk", "ce",
                     "triplet", "center_square", "bilinear", "nearest", "fp16", "cuda", "ñame", "日本語", "💊",
                     "../../etc/passwd", "/dev/null", "~", "null", "[1, 2", "{a: ", "1e-5", ".inf", "-.inf"]),
)


def _values(depth: int = 2) -> st.SearchStrategy[Any]:
    if depth == 0:
        return SCALARS
    inner = _values(depth - 1)
    return st.one_of(SCALARS, st.lists(inner, max_size=4),
                     st.dictionaries(st.one_of(st.sampled_from(LEAVES + SECTIONS), st.text(max_size=6),
                                               st.integers(-3, 3)), inner, max_size=4))


# A mutation: (section, leaf or None for the whole section, new value).
MUTATION = st.tuples(st.sampled_from(SECTIONS), st.one_of(st.none(), st.sampled_from(LEAVES)), _values())


def _mutate(base: dict[str, Any], mutations: list[tuple[str, str | None, Any]]) -> Any:
    doc = copy.deepcopy(base)
    for section, leaf, value in mutations:
        if leaf is None:
            doc[section] = value
        else:
            node = doc.setdefault(section, {})
            if isinstance(node, dict):
                node[leaf] = value
            else:
                doc[section] = {leaf: value}
    return doc


def _dump(doc: Any) -> str:
    """YAML text of ``doc``; floats YAML cannot hold as such (nan / inf) still come out as YAML's .nan / .inf."""
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


OVERRIDE_KEYS = st.one_of(
    st.builds(lambda s, k: f"{s}.{k}", st.sampled_from(SECTIONS[:-1]), st.sampled_from(LEAVES)),
    st.sampled_from(["train", "train.", ".lr", "a..b", "data.sources.0.ratio", "tune.space.train.lr.low",
                     "loss.terms", "x" * 300, "train.lr.sub"]),
    st.text(max_size=10),
)
OVERRIDE_VALUES = st.one_of(
    st.sampled_from(["", "1", "-1", "0", "1e308", "1e400", ".nan", "[]", "{}", "[1, 2", "{a: 1",
                     "!!python/object:os.system", "null", "true", "all", "auto", "ñ", "[{name: ce}]",
                     "{low: 1, high: 0, type: float}"]),
    st.text(max_size=10),
)
OVERRIDES = st.lists(st.builds(lambda k, v, sep: f"{k}{sep}{v}", OVERRIDE_KEYS, OVERRIDE_VALUES,
                               st.sampled_from(["=", "=", "=", ""])), max_size=3)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    root = tmp_path_factory.mktemp("fuzz")
    data = write_csv_dataset(root / "data", per_class=6, size=16)
    cfg = tiny_config(data.root, output={"exp_dir": str(root / "exp"), "logs_dir": None})
    return cfg, root


def _run_split(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = cli.main(args)
    except SystemExit as stop:  # argparse usage errors
        code = stop.code if isinstance(stop.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.err


def _check(code: int, err: str, what: str) -> None:
    assert code in (0, 2), f"exit {code} (a crash) for {what}\n{err}"
    assert "Traceback" not in err, f"a traceback for {what}\n{err}"
    if code == 2:  # one line per problem (a config error lists every problem at once), no continuation lines
        lines = err.splitlines()
        assert lines and lines[0].startswith("error: "), f"no error line for {what}:\n{err}"
        assert all(ln.strip() and not ln[0].isspace() for ln in lines), f"not one line per problem for {what}:\n{err}"
        assert "Cfg" not in err, f"an internal class name in the message for {what}:\n{err}"


# `make test` runs a fixed, repeatable sample (120 cases per test); a long random sweep:
#   VISTRAIN_FUZZ_EXAMPLES=5000 pytest tests/test_config_fuzz.py -p no:randomly
EXAMPLES = int(os.environ.get("VISTRAIN_FUZZ_EXAMPLES", "0") or 0)
FUZZ = settings(max_examples=EXAMPLES or 120, deadline=None, derandomize=not EXAMPLES, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_generated_config_files_succeed_or_fail_in_one_line(base, mutations, capsys) -> None:
    cfg, root = base
    doc = _mutate(cfg, mutations)
    path = root / "fuzz.yaml"
    path.write_text(_dump(doc), encoding="utf-8")
    code, err = _run_split(["split", "--config", str(path), "--output", str(root / "splits.csv")], capsys)
    _check(code, err, _dump(doc))


@FUZZ
@given(overrides=OVERRIDES)
def test_generated_overrides_succeed_or_fail_in_one_line(base, overrides, capsys) -> None:
    cfg, root = base
    path = root / "base.yaml"
    path.write_text(_dump(cfg), encoding="utf-8")
    code, err = _run_split(["split", "--config", str(path), "--output", str(root / "splits.csv"), *overrides], capsys)
    _check(code, err, repr(overrides))


@FUZZ
@given(text=st.one_of(st.text(max_size=60), st.sampled_from([
    "", "---", "- a\n- b", "a: [1, 2", "train: {lr: }", "? !!binary |\n  R0lG", "&a [*a]", "data: &x {a: *x}",
    "!!python/object/apply:os.system ['true']", "\t", "train:\n  lr: 1\n lr: 2", "%YAML 9.9\n---\na: 1",
    "train: !!float 'abc'", "a: " + "[" * 200 + "]" * 200, "\ufeffproject: {name: x}"])))
def test_arbitrary_yaml_text_succeeds_or_fails_in_one_line(base, text, capsys) -> None:
    _, root = base
    path = root / "raw.yaml"
    path.write_text(text, encoding="utf-8")
    code, err = _run_split(["split", "--config", str(path), "--output", str(root / "splits.csv")], capsys)
    _check(code, err, repr(text))


def test_the_fuzzer_reaches_success_and_each_kind_of_failure(base, capsys) -> None:
    """Not vacuous: the same harness sees a success, a config error, a YAML error and a crash would show."""
    cfg, root = base
    good = root / "good.yaml"
    good.write_text(_dump(cfg))
    assert _run_split(["split", "--config", str(good), "--output", str(root / "s.csv")], capsys)[0] == 0
    code, err = _run_split(["split", "--config", str(good), "--output", str(root / "s.csv"), "train.lr=-1"], capsys)
    assert code == 2 and err.startswith("error: train.lr")
    bad = root / "bad.yaml"
    bad.write_text("a: [1, 2")
    assert _run_split(["split", "--config", str(bad), "--output", str(root / "s.csv")], capsys)[0] == 2
    assert not math.isnan(0.0)


@pytest.mark.parametrize("override", ["project.seed=-1", "project.seed=4294967296", "\r =1", " =1", "train.\n=1"])
def test_overrides_the_fuzzer_broke_are_one_line_user_errors(base, override, capsys) -> None:
    """Found by the sweep: a seed outside 0..2**32-1 crashed in NumPy / scikit-learn (exit 1); a key with a control
    character or a blank part printed a message broken over two lines."""
    cfg, root = base
    path = root / "base.yaml"
    path.write_text(_dump(cfg), encoding="utf-8")
    code, err = _run_split(["split", "--config", str(path), "--output", str(root / "splits.csv"), override], capsys)
    _check(code, err, override)
    assert code == 2


@pytest.mark.parametrize("text", ["0: !!float", "\x1f", "a: !!int 'x'", "a: \x85b"])
def test_yaml_the_fuzzer_broke_is_a_one_line_user_error(base, text, capsys) -> None:
    """Found by the sweep: PyYAML raises IndexError / ValueError for some tags (exit 1 before), and a reader error's
    message spans two lines."""
    _, root = base
    path = root / "raw.yaml"
    path.write_text(text, encoding="utf-8")
    code, err = _run_split(["split", "--config", str(path), "--output", str(root / "splits.csv")], capsys)
    _check(code, err, repr(text))
    assert code == 2
