"""``vistrain export RUN --format timm``: one fold's model as a folder in the Hugging Face hub layout that timm alone
loads: ``timm.create_model("local-dir:DIR", pretrained=True)`` (or ``"hf-hub:REPO"`` once pushed).

The folder holds ``config.json`` (timm's layout, written by timm's own ``save_config_for_hf``: architecture,
num_classes, label_names, model_args, and a pretrained_cfg whose input_size, interpolation, crop_pct, crop_mode, mean
and std make ``timm.data.resolve_data_config({}, model=m)`` + ``create_transform(**cfg)`` resize, crop and normalise as
vistrain's ``Preprocessor`` does), ``model.safetensors`` (the evaluated weights: the EMA's when the run used it, as in
``ckpt/best_fold{k}.safetensors``) and ``README.md`` (the model card, ``viz.model_card``).

What timm's config cannot say is listed, one line per setting, in config.json's ``vistrain.not_expressed``, in the
card and as an ``[EXPORT]`` line: CLAHE, OpenCV's resampling and the shrink rule (a reduced JPEG decode, then an
area average), a centre-square crop at a non-square input, the decode rules, a calibration temperature, and the parts
of the model outside timm. Those parts — GeM pooling (timm has no GeM ``global_pool``), an embedding model's
projection and BNNeck, its flip average and L2 norm, ``model.last_stride: 1`` — make the folder a feature model
(``num_classes=0``) plus ``vistrain_head.safetensors`` and the few lines of torch that apply it
(``vistrain.head.code``, shown in the card), so a timm user gets vistrain's outputs without vistrain.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from vistrain._version import __version__
from vistrain.data.preprocess import Preprocessor
from vistrain.engine.inference import LoadedRun, load_fold_model, load_run, select_folds
from vistrain.errors import UserError, describe
from vistrain.tracking.files import atomic_write_bytes, atomic_write_text, write_json

log = logging.getLogger(__name__)

HEAD_FILE = "vistrain_head.safetensors"
# vistrain's OpenCV interpolation -> the nearest PIL filter timm's transforms know
TIMM_INTERPOLATION = {"bilinear": "bilinear", "bicubic": "bicubic", "area": "box", "nearest": "nearest"}
# the pretrained_cfg keys that describe these weights; the rest of timm's default cfg (tag, license, origin_url,
# paper ids) describes the architecture's ImageNet checkpoint, not a model trained here
PRETRAINED_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "num_classes", "pool_size",
                   "first_conv", "classifier", "fixed_input_size", "custom_load")


def export_timm(run_dir: Path, folds: str | list[int] | None = None, output: Path | None = None,
                push_to_hub: str | None = None, dry_run: bool = False, strict: bool = False) -> Path:
    """Write the folder (``output``, default ``RUN/export/timm_fold{k}``) and return it; push it to the hub repo
    ``push_to_hub`` unless ``dry_run`` (which only says what would be pushed)."""
    run = load_run(run_dir, command="export", strict=strict)
    fold = choose_fold(run, folds)
    model, pre = load_fold_model(run, fold, torch.device("cpu"))
    data_config, notes = timm_data_config(pre)
    timm_model, head = split_model(run, model)
    notes += model_notes(run)
    folder = Path(output) if output is not None else run.path / "export" / f"timm_fold{fold}"
    config = timm_config(timm_model, data_config, run, head)
    config["vistrain"] = {"version": __version__, "run": run.path.name, "fold": fold, "task": run.cfg.task,
                          "model": run.cfg.model.name, "temperature": run.temperature, "preprocess": pre.to_dict(),
                          "not_expressed": notes, "head": head and head["spec"]}
    write_folder(folder, timm_model, head, config)
    from vistrain.viz.model_card import model_card_text

    card = model_card_text(run.path, timm_export={"folder": str(folder), "fold": fold, "not_expressed": notes,
                                                  "embedding_head": head and head["spec"], "config": config})
    atomic_write_text(folder / "README.md", card)
    log.info("[EXPORT] fold=%d -> %s (timm %s, %s)", fold, folder, config["architecture"],
             f"{config['num_classes']} classes" if config["num_classes"] else "feature model + vistrain_head")
    for note in notes:
        log.info("[EXPORT] not in timm's config: %s", note)
    if push_to_hub:
        files = ", ".join(sorted(p.name for p in folder.iterdir() if p.is_file()))
        if dry_run:
            log.info("[EXPORT] --dry-run: would push %s (%s) to https://huggingface.co/%s; nothing was sent", folder,
                     files, push_to_hub)
        else:
            url = push(folder, push_to_hub)
            log.info("[EXPORT] pushed %s (%s) to %s", folder, files, url)
    return folder


def choose_fold(run: LoadedRun, folds: str | list[int] | None) -> int:
    """One fold (a timm folder holds one model): ``folds`` naming one, else fold 0 (the first trained fold)."""
    if folds is None:
        return run.folds[0]
    named = run.folds if folds == "all" else folds.split(",") if isinstance(folds, str) else list(folds)
    if len(named) != 1:  # before checking that each exists: the number is the mistake
        shown = folds if isinstance(folds, str) else ",".join(map(str, folds))
        raise UserError(f"--folds: '{shown}' names {len(named)} folds; a timm folder holds one model per folder: "
                        f"give one (trained folds: {', '.join(map(str, run.folds))}) and export each to its own "
                        "--output")
    return select_folds(run, folds)[0]


def timm_data_config(pre: Preprocessor) -> tuple[dict[str, Any], list[str]]:
    """timm's data config (input_size, interpolation, crop_pct, crop_mode, mean, std) for ``pre``, and one line per
    setting of ``pre`` that timm's eval transforms cannot reproduce."""
    h, w = pre.size
    interp = TIMM_INTERPOLATION[pre.interpolation]
    notes = []
    if pre.crop == "none":  # both sides to the input size: timm's squash at crop_pct 1 (Resize((H, W)), no crop)
        crop_mode = "squash"
    else:  # the shorter side to the input size, then the centre: the same square for a square input
        crop_mode = "center"
        notes.append(
            "preprocess.crop: center_square: vistrain crops the centred square, then resizes it; timm's center mode "
            "resizes the shorter side first, then crops (the same square, its border rounded within a pixel)"
            if h == w else
            f"preprocess.crop: center_square at a {h}x{w} input: vistrain stretches the centred square to {h}x{w}; "
            f"timm's center mode crops a {h}x{w} window instead: crop the centred square before timm's transforms")
    if pre.shrink != "interpolation":
        smooth = "" if interp == "nearest" else " (antialiased)"
        reduced = " after decoding a large JPEG reduced by libjpeg's DCT scaling (to at least 2x the input)" \
            if pre.shrink == "reduced_area" else ""
        notes.append(f"preprocess.resize.shrink: {pre.shrink}: vistrain shrinks with OpenCV's INTER_AREA{reduced}; "
                     f"timm resizes every image with PIL's {interp}{smooth}: identical at the input size, a "
                     "few grey levels apart on larger images (PIL's 'box', an area average too, is closer: "
                     "interpolation='box' in the data config)")
    else:
        notes.append(f"preprocess.resize.interpolation: {pre.interpolation}: vistrain resizes with OpenCV, timm with "
                     f"PIL's {interp}: identical at the input size, a few grey levels apart otherwise")
    if pre.clahe:
        notes.append(f"preprocess.clahe: CLAHE on the L channel of OpenCV's 8-bit LAB (clip_limit {pre.clip_limit}, "
                     f"{pre.grid}x{pre.grid} tiles) after the resize; timm's transforms have none: apply "
                     f"cv2.createCLAHE({pre.clip_limit}, ({pre.grid}, {pre.grid})) to L of "
                     "cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB) before ToTensor")
    notes.append("decode: vistrain applies the EXIF orientation, puts transparency on white and rescales 16-bit "
                 "images (preprocess.decode); Image.open(f).convert('RGB') does none of this: use "
                 "ImageOps.exif_transpose first")
    config = {"input_size": (3, h, w), "interpolation": interp, "crop_pct": 1.0, "crop_mode": crop_mode,
              "mean": pre.mean, "std": pre.std}
    return config, notes


def split_model(run: LoadedRun, model: nn.Module) -> tuple[nn.Module, dict[str, Any] | None]:
    """(the timm model holding the fold's weights, strictly loaded; the head timm cannot hold or None). A classifier
    with a timm pooling is all timm's; GeM and an embedding model's neck become ``vistrain_head.safetensors``."""
    m = run.cfg.model
    if run.cfg.task == "classification" and m.pooling != "gem":
        timm_model = _timm(m.name, len(run.classes), m.pooling)
        timm_model.load_state_dict(model.state_dict())
        return timm_model, None
    backbone = model.backbone
    gem = m.pooling == "gem"
    timm_model = _timm(m.name, 0, "" if gem else m.pooling)
    timm_model.load_state_dict(backbone.state_dict())
    if run.cfg.task == "classification":
        tensors = {"pool.p": model.pool.p, "head.weight": model.head.weight, "head.bias": model.head.bias}
        return timm_model, _head("classifier", tensors, model.pool.eps, None, run, backbone)
    tensors = {"pool.p": model.pool.p} if gem else {}
    if isinstance(model.proj, nn.Linear):
        tensors["proj.weight"] = model.proj.weight
    bn = model.neck if isinstance(model.neck, nn.BatchNorm1d) else None
    if bn is not None:
        tensors.update({f"neck.{k}": getattr(bn, k) for k in ("weight", "bias", "running_mean", "running_var")})
    return timm_model, _head("embedding", tensors, model.pool.eps if gem else None, bn, run, backbone)


def _timm(name: str, num_classes: int, pool: str) -> nn.Module:
    """The architecture as timm builds it (no download) with vistrain's head choices, in eval mode."""
    return timm.create_model(name, pretrained=False, num_classes=num_classes, global_pool=pool).eval()


def _head(kind: str, tensors: dict[str, torch.Tensor], gem_eps: float | None, bn: nn.BatchNorm1d | None,
          run: LoadedRun, backbone: nn.Module) -> dict[str, Any]:
    """The head's tensors and its description: the formula, and torch code (``code`` defines ``call``, given
    ``folder`` and timm's ``model``; x: [B, 3, H, W] from timm's transforms) that a test runs without vistrain."""
    tensors = {k: v.detach().float().cpu().contiguous().clone() for k, v in tensors.items()}
    e = run.cfg.eval
    embedding = kind == "embedding"
    flip, norm = embedding and e.flip_feats, embedding and e.feat_norm
    nhwc = getattr(backbone, "output_fmt", "NCHW") == "NHWC"
    lines = ["import torch", "import torch.nn.functional as F", "from safetensors.torch import load_file", "",
             f'head = load_file(f"{{folder}}/{HEAD_FILE}")']
    if embedding and run.cfg.model.last_stride == 1:
        lines += LAST_STRIDE_CODE
    name = "embed" if embedding else "logits"
    body, formula = [], []
    body.append("f = model(x)" + ("  # [B, C, H, W] feature maps" if gem_eps is not None else
                                  f"  # [B, C]: timm's {run.cfg.model.pooling} pooling"))
    formula.append("f = timm model(x)")
    if gem_eps is not None:
        if nhwc:
            body.append("f = f.permute(0, 3, 1, 2)  # this backbone gives [B, H, W, C]")
        body.append(f'f = f.float().clamp(min={gem_eps!r}).pow(head["pool.p"]).mean(dim=(-2, -1))'
                    '.pow(1 / head["pool.p"])  # GeM')
        formula.append(f"f = (mean over H, W of max(f, {gem_eps!r})^p)^(1/p), p = pool.p (GeM)")
    if "proj.weight" in tensors:
        body.append('f = f @ head["proj.weight"].T  # projection')
        formula.append("f = f @ proj.weight^T")
    if bn is not None:
        body.append('f = F.batch_norm(f, head["neck.running_mean"], head["neck.running_var"], head["neck.weight"], '
                    f'head["neck.bias"], eps={bn.eps!r})  # BNNeck')
        formula.append(f"f = (f - neck.running_mean) / sqrt(neck.running_var + {bn.eps!r}) * neck.weight + "
                       "neck.bias (BNNeck)")
    if not embedding:
        body.append('f = f @ head["head.weight"].T + head["head.bias"]  # logits, in label_names order')
        formula.append("logits = f @ head.weight^T + head.bias")
    code_lines = [*lines, "", f"def {name}(x):"]
    if flip:
        code_lines += ["    def one(x):", *(f"        {b}" for b in body), "        return f",
                       "    f = (one(x) + one(x.flip(-1))) / 2  # eval.flip_feats: with the mirror image"]
        formula.append("f = (f(x) + f(x flipped left-right)) / 2")
    else:
        code_lines += [f"    {b}" for b in body]
    if norm:
        code_lines.append("    f = F.normalize(f, dim=1)  # eval.feat_norm: unit length")
        formula.append("embedding = f / max(||f||, 1e-12)")
    code_lines.append("    return f")
    spec = {"kind": kind, "file": HEAD_FILE, "tensors": {k: list(v.shape) for k, v in tensors.items()},
            "output": "embedding [B, D]" if embedding else "logits [B, num classes] in label_names order",
            "formula": formula, "code": "\n".join(code_lines) + "\n", "call": f"{name}(x)"}
    return {"spec": spec, "tensors": tensors}


# model.last_stride: 1, on timm's ResNet as models.embedding.set_last_stride_1 does it on vistrain's
LAST_STRIDE_CODE = [
    "",
    "# model.last_stride: 1: layer4's first block keeps the resolution (stride-2 convolutions -> stride 1, a",
    "# stride-2 pooling -> identity); the weights are unchanged",
    "for parent in model.layer4[0].modules():",
    "    for name, child in list(parent.named_children()):",
    "        if getattr(child, 'stride', None) in (2, (2, 2)):",
    "            if isinstance(child, torch.nn.Conv2d):",
    "                child.stride = (1, 1)",
    "            else:",
    "                setattr(parent, name, torch.nn.Identity())",
]


def model_notes(run: LoadedRun) -> list[str]:
    """The model's settings outside timm's config: where the head is, the last stride, the temperature."""
    m, e = run.cfg.model, run.cfg.eval
    notes = []
    where = f"in {HEAD_FILE}, applied by config.json's vistrain.head.code (shown in the card)"
    if m.pooling == "gem":
        what = "GeM's p and the linear classifier are" if run.cfg.task == "classification" else "GeM's p is"
        notes.append(f"model.pooling: gem: timm has no GeM global_pool; the folder holds a feature model "
                     f"(num_classes=0, unpooled [B, C, H, W]); {what} {where}")
    if run.cfg.task == "classification":
        if run.temperature is not None:
            notes.append(f"calibration: temperature {run.temperature:.4g}: vistrain's probabilities are "
                         "softmax(logits / T); timm gives the logits")
        return notes
    if m.embedding_dim is not None:
        notes.append(f"model.embedding_dim: {m.embedding_dim}: the projection is {where}")
    if m.neck == "bnneck":
        notes.append(f"model.neck: bnneck: the BatchNorm1d is {where}")
    if m.last_stride == 1:
        notes.append("model.last_stride: 1: timm's model downsamples in layer4; vistrain.head.code sets layer4's "
                     "first block to stride 1 before use")
    if e.flip_feats:
        notes.append("eval.flip_feats: true: the embedding is the mean with the mirror image's (in the head code)")
    if e.feat_norm:
        notes.append("eval.feat_norm: true: the embedding is L2-normalised (in the head code)")
    return notes


def timm_config(model: nn.Module, data_config: dict[str, Any], run: LoadedRun,
                head: dict[str, Any] | None) -> dict[str, Any]:
    """config.json as timm's ``save_config_for_hf`` writes it for ``model`` and ``data_config`` (read back, so the
    folder is written atomically by us), with the class names, and the source checkpoint's provenance dropped."""
    from timm.models._hub import save_config_for_hf  # timm's own writer; timm.models exports only save_for_hf

    model_config: dict[str, Any] = {}
    if run.cfg.task == "classification":
        model_config["label_names"] = [str(c) for c in run.classes]
        names = run.display_names()
        if any(names):  # timm's label_descriptions: label name -> description
            model_config["label_descriptions"] = {str(c): n for c, n in zip(run.classes, names) if n}
    with tempfile.TemporaryDirectory() as tmp:
        save_config_for_hf(model, f"{tmp}/config.json", model_config=model_config, data_config=data_config)
        config = json.loads(Path(f"{tmp}/config.json").read_text())
    config["pretrained_cfg"] = {k: v for k, v in config["pretrained_cfg"].items() if k in PRETRAINED_KEYS}
    return config


def write_folder(folder: Path, model: nn.Module, head: dict[str, Any] | None, config: dict[str, Any]) -> None:
    """model.safetensors, the head's file (or none: a stale one from an earlier export removed) and config.json,
    each written atomically."""
    from safetensors.torch import save

    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(folder / "model.safetensors", save(weights, metadata={"format": "pt"}))
    if head is not None:
        atomic_write_bytes(folder / HEAD_FILE, save(head["tensors"], metadata={"format": "pt"}))
    else:
        (folder / HEAD_FILE).unlink(missing_ok=True)
    write_json(folder / "config.json", config)


def push(folder: Path, repo: str) -> str:
    """Upload the folder to the hub repo (created when missing) with huggingface_hub; the commit's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi(library_name="vistrain", library_version=__version__)
    try:
        repo_id = api.create_repo(repo_id=repo, exist_ok=True).repo_id
        return str(api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                     commit_message=f"vistrain {__version__}: {folder.name}"))
    except LocalTokenNotFoundError as err:
        raise UserError(f"--push-to-hub: {repo}: not logged in to the hub ({describe(err)}); run `hf auth login` "
                        f"or set HF_TOKEN; the folder is written: {folder}") from err
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            raise UserError(f"--push-to-hub: {repo}: the hub refused the token (HTTP {status}): give a token "
                            f"with write access to {repo}; the folder is written: {folder}") from err
        raise
