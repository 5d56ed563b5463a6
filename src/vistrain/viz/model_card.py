"""The model card of a run (``RUN/MODEL_CARD.md``) and of its timm folder (``README.md``): Markdown with the Hugging
Face model card's YAML front matter (``library_name: timm``, tags), what the model is, and how to load it.

``timm_export`` (from ``engine.timm_folder``) adds how timm loads the folder, the preprocessing timm's config cannot
express, and the head timm cannot hold (its formula and code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vistrain.tracking.files import atomic_write_text


def model_card_text(run_dir: Path, *, timm_export: dict[str, Any] | None = None) -> str:
    """The card as Markdown. ``timm_export``: {"folder", "fold", "not_expressed", "embedding_head", "config"}."""
    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    task = cfg.get("task", "classification")
    model = (cfg.get("model") or {}).get("name", "?")
    tags = ["vistrain", "timm", "image-classification" if task == "classification" else "image-feature-extraction"]
    front = yaml.safe_dump({"library_name": "timm", "tags": tags}, sort_keys=False)
    lines = [f"---\n{front}---", "", f"# {run_dir.name}", "",
             f"An image {task} model ({model}) trained with vistrain: run `{run_dir.name}`.", "", "## How to load",
             "",
             "```python", "import vistrain", "", f'run = vistrain.Run("{run_dir}")', "```", ""]
    if timm_export is not None:
        lines += _timm_section(timm_export)
    return "\n".join(lines)


def _timm_section(export: dict[str, Any]) -> list[str]:
    folder = export["folder"]
    config = export["config"]
    out = "logits" if config.get("num_classes") else "features"
    lines = [f"timm alone (fold {export['fold']}):", "", "```python", "import timm", "from PIL import Image", "",
             f'folder = "{folder}"  # once pushed: huggingface_hub.snapshot_download("<user>/<repo>")',
             'model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # or "hf-hub:<user>/<repo>"',
             "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))",
             f'{out} = model(transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0))', "```", ""]
    head = export.get("embedding_head")
    if head:
        lines += [f"The head timm cannot hold is in `{head['file']}` ({head['output']}):", ""]
        lines += [f"    {step}" for step in head["formula"]]
        lines += ["", f"In code (with `folder` and `model` as above; `{head['call']}` on a batch `x` from "
                  "`transform`):", "", "```python", head["code"].rstrip("\n"), "```", ""]
    lines += ["## What timm's config cannot express", ""]
    for note in export["not_expressed"]:
        setting, _, rest = note.partition(": ")
        lines.append(f"- `{setting}`: {rest}")
    return [*lines, ""]


def write_model_card(run_dir: Path) -> Path:
    """``RUN/MODEL_CARD.md``, written atomically; its path."""
    path = Path(run_dir) / "MODEL_CARD.md"
    atomic_write_text(path, model_card_text(Path(run_dir)))
    return path
