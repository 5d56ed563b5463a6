"""The README's "Your own data in five minutes" is a walkthrough a new user follows: it must run as written.

The test reads the section's YAML and shell blocks from README.md, builds a small folder-per-class data set where
they say, and runs every command in order (``RUN`` replaced by the directory ``train`` printed). Only the model and
the image size are shrunk (``key=value`` arguments added to the commands that take a config), so that it runs on a
CPU in seconds; everything else is the README's text.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import yaml
from conftest import class_image, describe, run_cli, write_folders_dataset

README = Path(__file__).resolve().parents[1] / "README.md"
SHRINK = ["model.name=resnet10t", "train.img_size=32", "train.epochs=1", "train.batch_size=8", "train.num_workers=0"]


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_speaks_to_users_not_of_source_documents() -> None:
    text = README.read_text()
    assert not re.search(r"seed 00\d", text), "the README names a source document users do not know"
    assert text.index("## Your own data in five minutes") < text.index("## Commands")


def test_the_five_minute_walkthrough_runs_as_written(tmp_path: Path) -> None:
    part = section(README.read_text(), "Your own data in five minutes")
    (config_text,) = blocks(part, "yaml")
    (commands,) = blocks(part, "bash")
    cfg = yaml.safe_load(config_text)
    write_folders_dataset(tmp_path / cfg["data"]["image_dir_train"], classes=("cat", "dog", "owl"), objects=5)
    new = tmp_path / cfg["data"]["image_dir_test"]
    new.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(4):
        class_image(i % 3, rng).save(new / f"new_{i}.jpg")
    (tmp_path / "my_data.yaml").write_text(config_text)

    run_dir = None
    for line in commands.splitlines():
        args = shlex.split(line, comments=True)
        assert args[0] == "vistrain", line
        args = [str(run_dir) if a == "RUN" else a for a in args[1:]]
        if "--config" in args and args[0] != "manifest":
            args += SHRINK
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 0, f"{line}\n{describe(result)}"
        if args[0] == "train":
            run_dir = Path(re.search(r"\[DONE\] run directory: (\S+)", result.stdout).group(1))
    assert (tmp_path / "manifest.json").is_file()
    assert (run_dir / "eval" / "val" / "metrics.json").is_file()
    assert len((tmp_path / "predictions.csv").read_text().splitlines()) == 1 + 4
    assert (run_dir / "export" / "model_fold0.onnx").is_file()
