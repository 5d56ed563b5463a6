"""The deterministic preprocessing shared by every path that feeds a model: training (before any random
augmentation), validation, ``evaluate``, ``predict``, ``export`` and ``serve``, and a client in another language.

One ``Preprocessor`` holds the whole spec (``preprocess:`` in the config, the training size and the model's
normalisation) and applies it to an 8-bit RGB array:

1. ``crop``: ``none``, or ``center_square`` (the centred square of side min(H, W), top-left at
   ((H - s) // 2, (W - s) // 2), as seed 003's ``UnifiedPreprocessor``);
2. resize to ``size`` [H, W] with OpenCV: a shrink (neither side grows) with ``INTER_AREA`` (``shrink``:
   ``reduced_area`` or ``area``), any other resize with ``interpolation`` (``bilinear`` = ``INTER_LINEAR``,
   ``bicubic``, ``area``, ``nearest``);
3. optional CLAHE on the L channel of OpenCV's 8-bit LAB (``clip_limit``, ``grid`` x ``grid`` tiles), back to RGB;
4. ``x / 255``, then ``(x - mean) / std`` per channel -> float32 [3, H, W].

Steps 1-3 (``deterministic``) give uint8 pixels: what a decode-once cache stores and what training augments.
``to_dict`` is the versioned description written to ``preprocess.json`` (with a content hash), from which
``from_dict`` rebuilds the identical preprocessor.

Large photos: with ``shrink: reduced_area`` (the default since version 2) a JPEG is decoded reduced by libjpeg's DCT
scaling to the smallest scale that keeps at least twice the output size (``decode_scale``), then shrunk with
``INTER_AREA``: a 6000 x 4500 photo at 224 px decodes at 1/8 (750 x 563) instead of 27 M pixels, and the fine detail
is averaged, not aliased. Every path decodes with ``load`` / ``decode`` (training, the cache, ``evaluate``,
``predict``, ``serve`` and ``preprocess.json``'s ``decode.reduce`` for a client), so they all give one tensor. A
version 1 description (runs before this rule) reads as ``shrink: interpolation``: full decode, ``interpolation`` for
every resize, as those runs were trained.

Its ``decode`` block (``images.DECODE``) says how a file becomes
the 8-bit RGB array (16-bit rescaling, EXIF, transparency, palette, CMYK, first frame), so that a client without
vistrain (``examples/onnx_client.py``) gives ``predict``'s probabilities.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from vistrain.data.images import DECODE, load_rgb

if TYPE_CHECKING:
    from vistrain.config.schema import Config

VERSION = 2  # 2: ``shrink`` (reduced JPEG decode + INTER_AREA for shrinks); 1 reads as shrink=interpolation
VERSIONS = (1, 2)
CROPS = ("none", "center_square")
INTERPOLATIONS = ("bilinear", "bicubic", "area", "nearest")
SHRINKS = ("reduced_area", "area", "interpolation")
REDUCE_SCALES = (8, 4, 2)  # libjpeg's DCT scaling factors Pillow's draft offers
REDUCE_AT_LEAST = 2  # the reduced decode keeps at least this many times the output size
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _cv2() -> Any:
    """OpenCV, imported where it is used (a second of import time that pure-config commands never pay)."""
    import cv2

    return cv2


def _cv2_interpolation(name: str) -> int:
    cv2 = _cv2()
    return {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA,
            "nearest": cv2.INTER_NEAREST}[name]


def model_normalisation(model_name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the timm model's pretrained config, without building the model; ImageNet's when timm has
    none for this name."""
    import timm

    try:
        cfg = timm.get_pretrained_cfg(model_name)
    except Exception:  # noqa: BLE001 - an unknown name is reported where the model is built
        cfg = None
    mean = getattr(cfg, "mean", None) or IMAGENET_MEAN
    std = getattr(cfg, "std", None) or IMAGENET_STD
    return tuple(float(x) for x in mean), tuple(float(x) for x in std)


def size_hw(img_size: int | Sequence[int]) -> tuple[int, int]:
    """``224`` or ``[256, 128]`` -> ``(H, W)``."""
    return (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))


@dataclass(frozen=True)
class Preprocessor:
    """RGB uint8 [H, W, 3] -> normalised float32 [3, size[0], size[1]]; see the module docstring for the steps."""

    size: tuple[int, int]  # output [H, W]
    crop: str = "none"
    interpolation: str = "bilinear"
    clahe: bool = False
    clip_limit: float = 2.0
    grid: int = 8
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    version: int = field(default=VERSION)
    shrink: str = "reduced_area"  # reduced_area | area | interpolation (version 1's: full decode, one interpolation)

    def __post_init__(self) -> None:
        problems = []
        if len(self.size) != 2 or any(int(s) < 1 for s in self.size):
            problems.append(f"size must be [H, W] with positive sides, got {self.size}")
        if self.crop not in CROPS:
            problems.append(f"crop must be one of {', '.join(CROPS)}, got {self.crop!r}")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if not self.clip_limit > 0:
            problems.append(f"clahe clip_limit must be > 0, got {self.clip_limit}")
        if int(self.grid) < 1:
            problems.append(f"clahe grid must be >= 1, got {self.grid}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(not s > 0 for s in self.std):
            problems.append(f"mean and std need 3 values each, std > 0; got {self.mean}, {self.std}")
        if self.version not in VERSIONS:
            problems.append(f"version {self.version} is not supported (this vistrain reads versions "
                            f"{', '.join(map(str, VERSIONS))})")
        if self.shrink not in SHRINKS:
            problems.append(f"shrink must be one of {', '.join(SHRINKS)}, got {self.shrink!r}")
        elif self.version == 1 and self.shrink != "interpolation":
            problems.append(f"version 1 has no shrink rule (shrink must be interpolation, got {self.shrink!r})")
        if problems:
            raise ValueError("preprocess: " + "; ".join(problems))
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    # ----------------------------------------------------------------------------------------- building

    @classmethod
    def from_config(cls, cfg: Config) -> Preprocessor:
        """The preprocessor of a run: ``preprocess:`` + ``train.img_size``; mean / std default to the timm
        model's pretrained config."""
        p = cfg.preprocess
        mean, std = model_normalisation(cfg.model.name)
        return cls(size=size_hw(cfg.train.img_size), crop=p.crop, interpolation=p.resize.interpolation,
                   clahe=p.clahe.enabled, clip_limit=p.clahe.clip_limit, grid=p.clahe.grid,
                   mean=tuple(p.mean) if p.mean is not None else mean,
                   std=tuple(p.std) if p.std is not None else std, shrink=p.resize.shrink)

    # --------------------------------------------------------------------------------------- describing

    def to_dict(self) -> dict[str, Any]:
        """Every setting, the version and a content hash: what ``preprocess.json`` holds."""
        spec = {
            "version": self.version,
            "input": "RGB uint8 [H, W, 3] (EXIF orientation applied, transparency composited on white)",
            "crop": self.crop,
            "resize": {"size": list(self.size), "interpolation": self.interpolation, "library": "opencv"},
            "clahe": {"enabled": self.clahe, "clip_limit": self.clip_limit, "grid": self.grid,
                      "space": "L of 8-bit LAB (OpenCV)"},
            "normalize": {"scale": 1 / 255, "mean": list(self.mean), "std": list(self.std)},
            "output": "float32 [3, H, W], channels RGB",
            "decode": copy.deepcopy(DECODE),  # how a file becomes "input": 16-bit, alpha, EXIF are not "RGB uint8"
        }
        if self.version >= 2:  # version 1's description stays as those runs wrote it (its hash with it)
            spec["resize"]["shrink"] = self.shrink
            spec["resize"]["shrink_rule"] = SHRINK_RULES[self.shrink]
            if self.shrink == "reduced_area":
                spec["decode"]["order"] = ["reduce", *spec["decode"]["order"]]
                spec["decode"]["reduce"] = copy.deepcopy(REDUCE)
        return {**spec, "hash": _hash(spec)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessor:
        """Rebuild from ``to_dict``'s output; a hash that does not match the settings is an error."""
        if not isinstance(d, dict):
            raise ValueError(f"preprocess: not a vistrain preprocessing description (a {type(d).__name__}, not an "
                             "object)")
        try:
            spec = {k: v for k, v in d.items() if k != "hash"}
            if "hash" in d and d["hash"] != _hash(spec):
                raise ValueError("preprocess: the hash does not match the settings (edited by hand?)")
            return cls(size=tuple(d["resize"]["size"]), crop=d["crop"], interpolation=d["resize"]["interpolation"],
                       clahe=bool(d["clahe"]["enabled"]), clip_limit=float(d["clahe"]["clip_limit"]),
                       grid=int(d["clahe"]["grid"]), mean=tuple(d["normalize"]["mean"]),
                       std=tuple(d["normalize"]["std"]), version=int(d["version"]),
                       shrink=d["resize"].get("shrink", "interpolation"))
        except (KeyError, TypeError) as err:
            raise ValueError(f"preprocess: not a vistrain preprocessing description ({err!r} missing or wrong)")\
                from err

    @property
    def hash(self) -> str:
        return self.to_dict()["hash"]

    def describe(self) -> str:
        """The settings in one log fragment: ``input=HxW crop=... resize=... clahe=off|clip/grid mean=[..] std=[..]
        preprocess=<hash>``."""
        clahe = f"{self.clip_limit}/{self.grid}" if self.clahe else "off"
        shrink = "" if self.shrink == "interpolation" else f" shrink={self.shrink}"
        return (f"input={self.size[0]}x{self.size[1]} crop={self.crop} resize={self.interpolation}{shrink} "
                f"clahe={clahe} "
                f"mean={[round(x, 3) for x in self.mean]} std={[round(x, 3) for x in self.std]} "
                f"preprocess={self.hash}")

    # ---------------------------------------------------------------------------------------- applying

    def deterministic(self, rgb: np.ndarray) -> np.ndarray:
        """Crop, resize and CLAHE: uint8 [H, W, 3] -> uint8 [size[0], size[1], 3]."""
        rgb = _check_rgb(rgb)
        cv2 = _cv2()
        if self.crop == "center_square":
            h, w = rgb.shape[:2]
            s = min(h, w)
            top, left = (h - s) // 2, (w - s) // 2
            rgb = rgb[top: top + s, left: left + s]
        out_h, out_w = self.size
        if rgb.shape[:2] != (out_h, out_w):
            shrinking = rgb.shape[0] >= out_h and rgb.shape[1] >= out_w and self.shrink != "interpolation"
            rgb = cv2.resize(np.ascontiguousarray(rgb), (out_w, out_h),
                             interpolation=cv2.INTER_AREA if shrinking else _cv2_interpolation(self.interpolation))
        if self.clahe:
            lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
            clahe = cv2.createCLAHE(clipLimit=self.clip_limit, tileGridSize=(self.grid, self.grid))
            lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
            rgb = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
        return np.ascontiguousarray(rgb)

    def decode_scale(self, width: int, height: int) -> int:
        """The reduced-decode factor of a JPEG shown at ``width`` x ``height`` (after its EXIF orientation): the
        largest of 8, 4, 2 whose decode (ceil(W / s) x ceil(H / s)) keeps at least twice the output size on each
        side (``center_square``: its square side at least twice the output's longer side); 1 when none does, or
        when ``shrink`` is not ``reduced_area``."""
        if self.shrink != "reduced_area":
            return 1
        out_h, out_w = self.size
        for s in REDUCE_SCALES:
            w, h = -(-width // s), -(-height // s)
            fits = (min(w, h) >= REDUCE_AT_LEAST * max(out_h, out_w) if self.crop == "center_square"
                    else w >= REDUCE_AT_LEAST * out_w and h >= REDUCE_AT_LEAST * out_h)
            if fits:
                return s
        return 1

    def decode(self, path: str | Path | IO[bytes], max_pixels: int | None = None, reduce_over: int | None = None
               ) -> Image.Image:
        """A file decoded as every path decodes it for this preprocessor: ``images.load_rgb`` (EXIF orientation,
        transparency on white, 16-bit range rescaled) with a large JPEG reduced by ``decode_scale``.
        ``reduce_over``: serve's decode budget, which may reduce further (only for a decode over it)."""
        return load_rgb(path, max_pixels, reduce_over, scale_for=self.decode_scale)

    def load(self, path: str | Path | IO[bytes], max_pixels: int | None = None) -> np.ndarray:
        """``decode``, then ``deterministic``: uint8 [size[0], size[1], 3]. A dataset's decode step."""
        return self.deterministic(np.asarray(self.decode(path, max_pixels)))

    def normalize(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [H, W, 3] array, or uint8 / float [..., 3, H, W] tensor (float: already in [0, 1])
        -> normalised float32 [..., 3, H, W]."""
        if isinstance(pixels, np.ndarray):
            # np.asarray(PIL image) is read-only, which torch.from_numpy warns about: copy (the uint8 is small)
            pixels = np.ascontiguousarray(pixels) if pixels.flags.writeable else pixels.copy()
            x = torch.from_numpy(pixels).permute(2, 0, 1)
        else:
            x = pixels
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
        return (x - mean) / std

    def process(self, rgb: np.ndarray) -> torch.Tensor:
        """The whole deterministic path: RGB uint8 [H, W, 3] -> float32 [3, size[0], size[1]], normalised."""
        return self.normalize(self.deterministic(rgb))

    __call__ = process


SHRINK_RULES = {
    "reduced_area": "a resize that grows neither side uses cv2.INTER_AREA (an area average: anti-aliased); any "
                    "other resize uses interpolation; a JPEG is first decoded reduced (decode.reduce)",
    "area": "a resize that grows neither side uses cv2.INTER_AREA; any other resize uses interpolation; full decode",
    "interpolation": "every resize uses interpolation; full decode",
}
REDUCE = {
    "formats": ["JPEG"],
    "scales": list(REDUCE_SCALES),
    "at_least": REDUCE_AT_LEAST,
    "rule": "W, H: the size shown after the EXIF orientation; out_h, out_w = resize.size. s = the first of scales "
            "with ceil(W / s) >= at_least * out_w and ceil(H / s) >= at_least * out_h (crop center_square: "
            "min(ceil(W / s), ceil(H / s)) >= at_least * max(out_h, out_w)). If there is one, before anything is "
            "decoded: img.draft(None, (img.width // s, img.height // s)) on the file's own (unrotated) width and "
            "height (libjpeg's DCT scaling to ceil(width / s) x ceil(height / s)); else the full decode",
}


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        what = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"preprocess: expected an RGB uint8 array [H, W, 3], got {what}")
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"preprocess: the image is empty ({rgb.shape[1]}x{rgb.shape[0]} pixels)")
    return rgb


def _hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
