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

import copy
import json
import logging
import math
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
# the timm side (model + head code) against vistrain's model on random inputs: float32 on the CPU, the same weights
# and operations in the same order, so anything beyond rounding is a different computation
CHECK_ATOL, CHECK_RTOL = 1e-4, 1e-4
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
    timm_model, head, check = timm_parts(run, model, pre.size)
    notes += model_notes(run, head)
    folder = Path(output) if output is not None else run.path / "export" / f"timm_fold{fold}"
    config = timm_config(timm_model, data_config, run, head)
    config["vistrain"] = {"version": __version__, "run": run.path.name, "fold": fold, "task": run.cfg.task,
                          "model": run.cfg.model.name, "temperature": run.temperature, "preprocess": pre.to_dict(),
                          "not_expressed": notes, "head": head and head["spec"], "check": check}
    write_folder(folder, timm_model, head, config)
    from vistrain.viz.model_card import model_card_text

    # the folder's name, not its path: the card is pushed to the hub with it, and a path names this machine
    card = model_card_text(run.path, timm_export={"folder": folder.name, "fold": fold, "not_expressed": notes,
                                                  "embedding_head": head and head["spec"], "config": config})
    atomic_write_text(folder / "README.md", card)
    log.info("[EXPORT] fold=%d -> %s (timm %s, %s; timm side vs vistrain on random inputs: max |diff| %.1e)", fold,
             folder, config["architecture"],
             f"{config['num_classes']} classes" if config["num_classes"] else
             "feature model" + (f" + {HEAD_FILE}" if head else ""),
             check["max_abs_diff"])
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


def split_model(run: LoadedRun, model: nn.Module, pool_in_head: bool = False
                ) -> tuple[nn.Module, dict[str, Any] | None]:
    """(the timm model holding the fold's weights, strictly loaded; the head timm cannot hold, or None). A classifier
    with a timm pooling is all timm's; GeM, and an embedding model's neck, go to ``vistrain_head.safetensors``.
    ``pool_in_head``: an embedding's avg / max pooling in the head code too, on ``forward_features`` (for an
    architecture whose timm forward adds layers after the feature maps)."""
    m = run.cfg.model
    if run.cfg.task == "classification" and m.pooling != "gem":
        timm_model = _timm(m.name, len(run.classes), m.pooling)
        timm_model.load_state_dict(model.state_dict())
        return timm_model, None
    pool = m.pooling if m.pooling == "gem" or pool_in_head else None  # None: timm's global_pool does it
    timm_model = _timm(m.name, 0, "" if pool else m.pooling)
    timm_model.load_state_dict(model.backbone.state_dict())
    tensors = {"pool.p": model.pool.p} if pool == "gem" else {}
    if run.cfg.task == "classification":
        tensors.update({"head.weight": model.head.weight, "head.bias": model.head.bias})
        return timm_model, _head(run, "classifier", tensors, pool, model)
    if isinstance(model.proj, nn.Linear):
        tensors["proj.weight"] = model.proj.weight
    if isinstance(model.neck, nn.BatchNorm1d):
        tensors.update({f"neck.{k}": getattr(model.neck, k) for k in ("weight", "bias", "running_mean", "running_var")})
    e = run.cfg.eval
    if not (tensors or pool or e.flip_feats or e.feat_norm or m.last_stride == 1):
        return timm_model, None  # timm's pooled features are the embedding
    return timm_model, _head(run, "embedding", tensors, pool, model)


def _timm(name: str, num_classes: int, pool: str) -> nn.Module:
    """The architecture as timm builds it (no download) with vistrain's head choices, in eval mode."""
    return timm.create_model(name, pretrained=False, num_classes=num_classes, global_pool=pool).eval()


def _head(run: LoadedRun, kind: str, tensors: dict[str, torch.Tensor], pool: str | None, model: nn.Module
          ) -> dict[str, Any]:
    """The head's tensors and its description: the formula, and torch code (``code`` defines ``call``, given
    ``folder`` and timm's ``model``; x: [B, 3, H, W] from timm's transforms) that a test runs without vistrain."""
    embedding = kind == "embedding"
    body, formula = _pool_lines(pool, run.cfg.model.pooling, model)
    if "proj.weight" in tensors:
        body.append('f = f @ head["proj.weight"].T  # projection')
        formula.append("f = f @ proj.weight^T")
    if "neck.weight" in tensors:
        eps = model.neck.eps
        body.append('f = F.batch_norm(f, head["neck.running_mean"], head["neck.running_var"], head["neck.weight"], '
                    f'head["neck.bias"], eps={eps!r})  # BNNeck')
        formula.append(f"f = (f - neck.running_mean) / sqrt(neck.running_var + {eps!r}) * neck.weight + "
                       "neck.bias (BNNeck)")
    if not embedding:
        body.append('f = f @ head["head.weight"].T + head["head.bias"]  # logits, in label_names order')
        formula.append("logits = f @ head.weight^T + head.bias")
    name = "embed" if embedding else "logits"
    code = ["import torch", "import torch.nn.functional as F", "from safetensors.torch import load_file", "",
            f'head = load_file(f"{{folder}}/{HEAD_FILE}")']
    if embedding and run.cfg.model.last_stride == 1:
        code += LAST_STRIDE_CODE
    code += ["", f"def {name}(x):"]
    e = run.cfg.eval
    if embedding and e.flip_feats:
        code += ["    def one(x):", *(f"        {b}" for b in body), "        return f",
                 "    f = (one(x) + one(x.flip(-1))) / 2  # eval.flip_feats: with the mirror image"]
        formula.append("f = (f(x) + f(x flipped left-right)) / 2")
    else:
        code += [f"    {b}" for b in body]
    if embedding and e.feat_norm:
        code.append("    f = F.normalize(f, dim=1)  # eval.feat_norm: unit length")
        formula.append("embedding = f / max(||f||, 1e-12)")
    code.append("    return f")
    tensors = {k: v.detach().float().cpu().contiguous().clone() for k, v in tensors.items()}
    spec = {"kind": kind, "file": HEAD_FILE, "tensors": {k: list(v.shape) for k, v in tensors.items()},
            "pooling": pool or f"timm ({run.cfg.model.pooling})",
            "output": "embedding [B, D]" if embedding else "logits [B, num classes] in label_names order",
            "formula": formula, "code": "\n".join(code) + "\n", "call": f"{name}(x)"}
    return {"spec": spec, "tensors": tensors}


def _pool_lines(pool: str | None, pooling: str, model: nn.Module) -> tuple[list[str], list[str]]:
    """The head code's first lines and formula: timm's pooled features, or the feature maps pooled here."""
    if pool is None:
        return [f"f = model(x)  # [B, C]: timm's {pooling} pooling"], ["f = timm model(x)"]
    body = ["f = model.forward_features(x)  # [B, C, H, W] feature maps"]
    formula = ["f = timm model.forward_features(x)"]
    backbone = model.backbone
    if getattr(backbone, "output_fmt", "NCHW") == "NHWC" and pool:
        body.append("f = f.permute(0, 3, 1, 2)  # this backbone gives [B, H, W, C]")
    if pool == "gem":
        eps = model.pool.eps
        body.append(f'f = f.float().clamp(min={eps!r}).pow(head["pool.p"]).mean(dim=(-2, -1))'
                    '.pow(1 / head["pool.p"])  # GeM')
        formula.append(f"f = (mean over H, W of max(f, {eps!r})^p)^(1/p), p = pool.p (GeM)")
    else:
        body.append(f"f = f.{'mean' if pool == 'avg' else 'amax'}(dim=(-2, -1))  # {pool} pooling")
        formula.append(f"f = {pool} over H, W")
    return body, formula


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


def timm_parts(run: LoadedRun, model: nn.Module, size: tuple[int, int]
               ) -> tuple[nn.Module, dict[str, Any] | None, dict[str, Any]]:
    """The timm model and head that reproduce ``model`` (checked): an embedding's avg / max pooling by timm, or in
    the head code when this architecture's timm forward adds layers after the feature maps (ConvNeXt's head norm)."""
    timm_model, head = split_model(run, model)
    try:
        return timm_model, head, check_outputs(run, model, timm_model, head, size)
    except UserError:
        if run.cfg.task != "embedding" or run.cfg.model.pooling == "gem":
            raise
    timm_model, head = split_model(run, model, pool_in_head=True)
    return timm_model, head, check_outputs(run, model, timm_model, head, size)


def check_outputs(run: LoadedRun, model: nn.Module, timm_model: nn.Module, head: dict[str, Any] | None,
                  size: tuple[int, int]) -> dict[str, Any]:
    """vistrain's outputs (logits; an embedding flip-averaged and normalised as ``eval.*`` says) against timm's model
    followed by the documented head code, on the same random batch: an architecture whose timm forward adds layers
    vistrain's model skips (a head norm) cannot be exported this way, and is refused before anything is written."""
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    e = run.cfg.eval
    with torch.no_grad():
        want = model(x)
        if run.cfg.task == "embedding":
            want = (want + model(x.flip(-1))) / 2 if e.flip_feats else want
            want = torch.nn.functional.normalize(want, dim=1) if e.feat_norm else want
        try:
            got = timm_model(x) if head is None else _run_head(head, copy.deepcopy(timm_model), x)
        except RuntimeError:  # timm's features are not the ones the head was trained on (another width)
            got = None
    diff = float((got - want).abs().max()) if got is not None and got.shape == want.shape else math.inf
    bound = CHECK_ATOL + CHECK_RTOL * float(want.abs().max())
    if not diff <= bound:
        raise UserError(f"--format timm: {run.cfg.model.name}: timm's model with the documented head is {diff:.2g} "
                        f"from vistrain's outputs (bound {bound:.2g}): timm's forward for this architecture is not "
                        f"vistrain's {run.cfg.task} model; export it with --format onnx")
    return {"inputs": f"2 random tensors [3, {size[0]}, {size[1]}]", "max_abs_diff": diff}


def _run_head(head: dict[str, Any], model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The documented head code, as a timm user runs it (our own generated text; its file in a temporary folder)."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        save_file(head["tensors"], f"{tmp}/{HEAD_FILE}")
        scope: dict[str, Any] = {"folder": tmp, "model": model}
        exec(head["spec"]["code"], scope)  # noqa: S102 - vistrain's code, checked as published
        return eval(head["spec"]["call"], scope, {"x": x})  # noqa: S307


def model_notes(run: LoadedRun, head: dict[str, Any] | None) -> list[str]:
    """The model's settings outside timm's config: where the head is, the last stride, the temperature."""
    m, e = run.cfg.model, run.cfg.eval
    notes = []
    where = f"in {HEAD_FILE}, applied by config.json's vistrain.head.code (shown in the card)"
    if m.pooling == "gem":
        what = "GeM's p and the linear classifier are" if run.cfg.task == "classification" else "GeM's p is"
        notes.append(f"model.pooling: gem: timm has no GeM global_pool; the folder holds a feature model "
                     f"(num_classes=0, no pooling: forward_features gives [B, C, H, W]); {what} {where}")
    elif head is not None and head["spec"]["pooling"] == m.pooling:
        notes.append(f"model.pooling: {m.pooling}: timm's forward for {m.name} adds layers after the feature maps "
                     f"that vistrain's embedding skips; the folder holds a feature model without pooling and the "
                     f"{m.pooling} pooling of forward_features is in the head code")
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
