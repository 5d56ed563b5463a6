"""Bad data input through the real command line: exit 2 and one ``error:`` line naming the key, row or class."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import Started, describe, write_folders_dataset, write_yaml

CASES = {
    # name: (data section, what the one line must say)
    "ratios": ({"sources": [{"name": "studio", "source": "folders", "image_dir_train": "img", "ratio": 0.3},
                            {"name": "real", "source": "folders", "image_dir_train": "img", "ratio": 0.6}]},
               "error: data.sources: the ratios must sum to 1; 0.3 (studio) + 0.6 (real) = 0.9"),
    "class_map": ({"source": "folders", "image_dir_train": "img", "class_map": "map.json"},
                  "error: data.class_map: class 'fox' is in the data"),
    "manifest_label": ({"source": "manifest", "manifest": "list.jsonl", "class_map": "map.json"},
                       "error: data.manifest: LIST line 2: label 'fox' is not in data.class_map"),
    "straddling_groups": ({"train_csv": "groups.csv", "image_dir_train": "img", "image_ext": ".png",
                           "group_col": "patient", "folds": 2},
                          "error: data.group_col: 2 group(s) straddle the folds of the 'fold' column, e.g. p1 (folds "
                          "0, 1), p2 (folds 0, 1); groups: column 'patient' (data.group_col); give every image of a "
                          "group the same fold"),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("data_errors")
    write_folders_dataset(root / "img", classes=("cat", "fox"), objects=2, views=1, size=8)
    (root / "map.json").write_text(json.dumps({"class_to_idx": {"cat": 0}}))
    (root / "list.jsonl").write_text("".join(json.dumps({"path": f"img/{c}/obj0_0.png", "label": c}) + "\n"
                                             for c in ("cat", "fox")))
    # each patient's two images in two folds of the CSV's own fold column
    (root / "groups.csv").write_text("ID,target,patient,fold\n" + "".join(
        f"{c}/obj{j}_0,{c},{p},{j}\n" for c, p in (("cat", "p1"), ("fox", "p2")) for j in (0, 1)))
    started = {}
    for name, (data, _) in CASES.items():
        config = write_yaml(root / f"{name}.yaml", {"data": data, "model": {"name": "resnet10t"},
                                                    "output": {"exp_dir": str(root / "exp"), "logs_dir": None}})
        started[name] = Started("train", "--config", str(config), cwd=root / name)
    return {name: s.wait() for name, s in started.items()} | {"root": root}  # type: ignore[return-value]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_exits_2_with_one_line(results, case):
    r = results[case]
    assert r.returncode == 2, describe(r)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, describe(r)
    assert lines[0].startswith(CASES[case][1].replace("LIST", str(results["root"] / "list.jsonl"))), describe(r)
    assert not (results["root"] / "exp").exists()  # nothing written: the data is checked before the run directory
