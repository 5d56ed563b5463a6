"""A tiny, deterministic two-domain pill data set for ``vistrain demo --scenario pills`` (seed 003 in miniature).

    out/studio/<code>/s<object>_<view>.png   clean renders: the pill centred on a plain light background, even light,
                                             square frames, small pose jitter
    out/real/<code>/r<object>_<view>.jpg     the same pill types "photographed": cluttered surface, any rotation, tilt,
                                             off-centre (inside the centred square), uneven light and colour cast,
                                             blur, noise, JPEG; 4:3 or 3:2 frames, portrait or landscape
    out/class_map.json                       seed 003's class map: class_to_idx, idx_to_class, metadata per class

``<object>`` is one physical pill (the group a split keeps together), ``<view>`` one picture of it. The classes
differ by shape (round, oval, capsule, oblong), colour, two-tone halves and score marks, so a small model learns
them at 64 px in a few CPU epochs; the studio renders alone teach little about the real photos (fixed pose, plain
background). Every image draws from its own generator seeded by (seed, domain, class, object, view): a file's
bytes depend on nothing else, so the same seed writes byte-identical files.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from vistrain.errors import UserError
from vistrain.tracking.files import write_json

log = logging.getLogger(__name__)

RGB = tuple[int, int, int]
Shape = Literal["round", "oval", "capsule", "oblong"]
Mark = Literal["none", "score", "cross", "ring"]
STUDIO_SIZE = 128  # studio frames are square
REAL_FRAMES = ((160, 120), (168, 112))  # (long, short) side: 4:3 and 3:2 photos
SUPERSAMPLE = 4  # the pill is drawn this much larger, then shrunk: smooth edges
CLASS_MAP_VERSION = "1.0.0"


@dataclass(frozen=True)
class PillType:
    code: str  # the class folder name (seed 003: the product code)
    display_name: str
    shape: Shape
    colours: tuple[RGB, ...]  # one colour, or (cap, body) for a two-tone capsule
    length: float  # long side as a fraction of the studio frame
    width: float  # short side, same unit (round: equal to length)
    mark: Mark = "none"  # debossed score line, cross or ring
    training_weight: float = 1.0  # class_map.json metadata (train.class_weights: from_class_map)


WHITE, YELLOW, PINK, ORANGE = (240, 240, 234), (236, 200, 64), (232, 150, 172), (238, 140, 52)
RED, BLUE, LIGHT_BLUE, GREEN = (196, 40, 44), (48, 78, 186), (124, 164, 222), (92, 168, 96)
# Three white pills tell apart only by shape, four round pills only by colour: the model needs both cues.
PILL_TYPES: tuple[PillType, ...] = (
    PillType("K-0001", "Round white 10 mg", "round", (WHITE,), 0.40, 0.40, "score", 1.2),
    PillType("K-0002", "Round yellow 5 mg", "round", (YELLOW,), 0.34, 0.34),
    PillType("K-0003", "Round pink 20 mg", "round", (PINK,), 0.38, 0.38, "cross"),
    PillType("K-0004", "Oval white 500 mg", "oval", (WHITE,), 0.52, 0.30, "score", 1.2),
    PillType("K-0005", "Oval orange 250 mg", "oval", (ORANGE,), 0.48, 0.30),
    PillType("K-0006", "Capsule red/white 100 mg", "capsule", (RED, WHITE), 0.58, 0.24),
    PillType("K-0007", "Capsule blue/yellow 50 mg", "capsule", (BLUE, YELLOW), 0.58, 0.24),
    PillType("K-0008", "Oblong light blue 40 mg", "oblong", (LIGHT_BLUE,), 0.56, 0.26, "score"),
    PillType("K-0009", "Oblong white 850 mg", "oblong", (WHITE,), 0.60, 0.27, "ring", 1.2),
    PillType("K-0010", "Round green 2 mg", "round", (GREEN,), 0.30, 0.30),
)
# Surfaces a pill is photographed on: wood, grey desk, paper, dark cloth, blue cloth, green cutting mat.
SURFACES: tuple[RGB, ...] = ((150, 108, 70), (122, 122, 128), (206, 200, 188), (58, 58, 68), (70, 92, 132),
                             (78, 110, 82))


@dataclass(frozen=True)
class RealLayout:
    """Where and how a pill lies in one real photo (pixels; the frame is ``width`` x ``height``)."""

    width: int
    height: int
    cx: float
    cy: float
    length_px: float  # the pill's long side in the photo
    angle: float  # degrees, any
    squash: float  # the short side shrunk by this factor: the camera tilted


def real_layout(rng: np.random.Generator, pill: PillType) -> RealLayout:
    """A random pose that keeps the whole pill inside the photo's centred square (``preprocess.crop``)."""
    long, short = REAL_FRAMES[int(rng.integers(len(REAL_FRAMES)))]
    width, height = (long, short) if rng.random() < 0.5 else (short, long)
    length = pill.length * short * rng.uniform(0.75, 1.05)
    room = max(0.0, short / 2 - length / 2 - 2)  # the pill's bounding circle stays inside the square
    shift = min(room, 0.14 * short)
    return RealLayout(width, height, width / 2 + rng.uniform(-shift, shift), height / 2 + rng.uniform(-shift, shift),
                      length, rng.uniform(0, 360), rng.uniform(0.85, 1.0))


# ------------------------------------------------------------------------------------------------- drawing

def pill_sprite(pill: PillType, length_px: float, colour_shift: np.ndarray) -> Image.Image:
    """The pill lying horizontally, RGBA, shaded darker towards its rim (a 3-D look); ``colour_shift`` [3] is
    this object's own tint."""
    import cv2

    s = SUPERSAMPLE
    length = max(8, round(length_px * s))
    width = length if pill.shape == "round" else max(4, round(length * pill.width / pill.length))
    pad = 2 * s
    w, h = length + 2 * pad, width + 2 * pad
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    box = (pad, pad, pad + length - 1, pad + width - 1)
    if pill.shape in ("round", "oval"):
        draw.ellipse(box, fill=255)
    else:
        draw.rounded_rectangle(box, radius=width // 2 if pill.shape == "capsule" else int(width * 0.3), fill=255)
    rgb = np.empty((h, w, 3), np.float32)
    rgb[:] = np.add(pill.colours[-1], colour_shift)
    if len(pill.colours) == 2:  # cap on the left half, with a darker seam
        rgb[:, : w // 2] = np.add(pill.colours[0], colour_shift)
        rgb[:, w // 2 - s // 2: w // 2 + s // 2] *= 0.8
    inside = (np.asarray(mask) > 127).astype(np.uint8)
    rim = np.clip(cv2.distanceTransform(inside, cv2.DIST_L2, 5) / (width / 2), 0, 1)
    rgb *= (0.7 + 0.3 * np.sqrt(rim))[..., None]
    rgb *= (1 - 0.25 * _mark(pill.mark, w, h, length, width))[..., None]
    rgba = np.dstack([np.clip(rgb, 0, 255).astype(np.uint8), np.asarray(mask)])
    return Image.fromarray(rgba, "RGBA").resize((w // s, h // s), Image.Resampling.BOX)


def _mark(mark: Mark, w: int, h: int, length: int, width: int) -> np.ndarray:
    """The debossed mark as a [h, w] float mask in 0..1."""
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    cx, cy, line = w / 2, h / 2, max(1, SUPERSAMPLE)
    if mark in ("score", "cross"):
        draw.line([(cx, cy - width * 0.42), (cx, cy + width * 0.42)], fill=255, width=line)
    if mark == "cross":
        draw.line([(cx - length * 0.42, cy), (cx + length * 0.42, cy)], fill=255, width=line)
    if mark == "ring":
        r = width * 0.22
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=line)
    return np.asarray(img, np.float32) / 255


def _place(canvas: np.ndarray, sprite: Image.Image, cx: float, cy: float, shadow: float, blur: float,
           offset: tuple[int, int]) -> None:
    """Alpha-composite ``sprite`` centred at (cx, cy) onto ``canvas`` [H, W, 3] float, over a soft shadow."""
    import cv2

    rgba = np.asarray(sprite, np.float32)
    alpha = rgba[..., 3:] / 255
    x0, y0 = round(cx - sprite.width / 2), round(cy - sprite.height / 2)
    soft = cv2.GaussianBlur(alpha[..., 0], (0, 0), blur)[..., None]
    _blend(canvas, np.zeros_like(rgba[..., :3]), soft * shadow, x0 + offset[0], y0 + offset[1])
    _blend(canvas, rgba[..., :3], alpha, x0, y0)


def _blend(canvas: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, x0: int, y0: int) -> None:
    """canvas = canvas * (1 - alpha) + rgb * alpha over the overlap of the patch at (x0, y0) and the canvas."""
    h, w = canvas.shape[:2]
    ys, xs = slice(max(0, y0), min(h, y0 + rgb.shape[0])), slice(max(0, x0), min(w, x0 + rgb.shape[1]))
    py, px = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
    a = alpha[py, px]
    canvas[ys, xs] = canvas[ys, xs] * (1 - a) + rgb[py, px] * a


def object_sprite(pill: PillType, rng: np.random.Generator) -> Image.Image:
    """One physical pill at studio scale: its colour and size differ a little from its type's."""
    tint, size = rng.normal(0, 4, 3), rng.uniform(0.97, 1.03)
    return pill_sprite(pill, pill.length * STUDIO_SIZE * size, tint)


def render_studio(pill: PillType, rng: np.random.Generator, sprite: Image.Image) -> Image.Image:
    """Plain light background, even light, the pill centred and almost level."""
    s = STUDIO_SIZE
    canvas = np.empty((s, s, 3), np.float32)
    canvas[:] = rng.uniform(226, 236) + rng.normal(0, 1.5, 3)
    sprite = sprite.rotate(rng.uniform(-6, 6), Image.Resampling.BICUBIC, expand=True)
    _place(canvas, sprite, s / 2 + rng.uniform(-2, 2), s / 2 + rng.uniform(-2, 2), 0.18, 2.0, (1, 2))
    return Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8), "RGB")


def _clutter(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A surface with uneven texture and things lying on it (paper, pens, packaging)."""
    import cv2

    surface = np.add(SURFACES[int(rng.integers(len(SURFACES)))], rng.normal(0, 12, 3))
    canvas = np.empty((h, w, 3), np.float32)
    canvas[:] = surface
    canvas += cv2.resize(rng.normal(0, 18, (5, 4)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)[..., None]
    for _ in range(int(rng.integers(2, 7))):
        colour = surface + rng.uniform(0.3, 0.9) * (rng.uniform(0, 255, 3) - surface)  # mostly muted, some bright
        layer = np.zeros((h, w), np.uint8)
        kind = rng.integers(3)
        if kind == 0:  # a sheet or a box edge: a random quadrilateral
            pts = rng.uniform([-0.3 * w, -0.3 * h], [1.3 * w, 1.3 * h], (4, 2)).astype(np.int32)
            cv2.fillPoly(layer, [pts], 255)
        elif kind == 1:  # a pen or a cable
            p, q = rng.uniform(0, [w, h], (2, 2)).astype(int)
            cv2.line(layer, tuple(map(int, p)), tuple(map(int, q)), 255, int(rng.integers(2, 7)))
        else:  # a cup or a lid, larger than any pill
            centre = tuple(map(int, rng.uniform(0, [w, h])))
            axes = tuple(map(int, rng.uniform(0.3, 0.6, 2) * min(h, w)))
            cv2.ellipse(layer, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        _blend(canvas, np.broadcast_to(colour.astype(np.float32), canvas.shape),
               layer[..., None] * np.float32(rng.uniform(0.4, 0.9) / 255), 0, 0)
    return canvas


def render_real(pill: PillType, rng: np.random.Generator, sprite: Image.Image) -> Image.Image:
    """The pill photographed: clutter, any rotation, tilt, off-centre, uneven light, colour cast, blur, noise."""
    import cv2

    lay = real_layout(rng, pill)
    h, w = lay.height, lay.width
    canvas = _clutter(rng, h, w)
    scale = lay.length_px / (pill.length * STUDIO_SIZE)  # the object's own size stays in the sprite
    sprite = sprite.resize((max(2, round(sprite.width * scale)), max(2, round(sprite.height * scale * lay.squash))),
                           Image.Resampling.BILINEAR)
    sprite = sprite.rotate(lay.angle, Image.Resampling.BICUBIC, expand=True)
    shadow = (int(rng.integers(-4, 5)), int(rng.integers(-4, 5)))
    _place(canvas, sprite, lay.cx, lay.cy, rng.uniform(0.25, 0.5), rng.uniform(1.5, 3.0), shadow)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = ((xx / w - 0.5) * math.cos(theta) + (yy / h - 0.5) * math.sin(theta)) * 2  # -1 .. 1 across the frame
    light = rng.uniform(0.75, 1.1) * (1 + rng.uniform(0.15, 0.4) * ramp)
    canvas *= light[..., None] * rng.uniform(0.88, 1.12, 3).astype(np.float32)  # uneven light, white balance off
    canvas = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(0.4, 1.4))
    if rng.random() < 0.3:  # a shaky hand
        k = int(rng.integers(3, 7))
        kernel = np.zeros((k, k), np.float32)
        kernel[k // 2] = 1 / k
        rot = cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), float(rng.uniform(0, 180)), 1.0)
        kernel = cv2.warpAffine(kernel, rot, (k, k))
        canvas = cv2.filter2D(canvas, -1, kernel / max(kernel.sum(), 1e-6))
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * rng.uniform(2, 7)
    return Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8), "RGB")


# ------------------------------------------------------------------------------------------------- writing

DOMAINS = {"studio": (0, "s", ".png", render_studio), "real": (1, "r", ".jpg", render_real)}


def write_pills(out: Path, seed: int = 0, classes: int = len(PILL_TYPES), studio_objects: int = 30,
                studio_views: int = 3, real_objects: int = 16, real_views: int = 2) -> dict[str, int]:
    """Write the data set under ``out`` (see the module docstring); returns the image count per domain.

    ``class_map.json`` is written last, so a folder holding it is complete (the demo reuses such a folder)."""
    if not 1 <= classes <= len(PILL_TYPES):
        raise UserError(f"classes: {classes} pill types asked for; valid: 1..{len(PILL_TYPES)}")
    counts = {"studio": (studio_objects, studio_views), "real": (real_objects, real_views)}
    written = {}
    for domain, (domain_id, prefix, ext, render) in DOMAINS.items():
        objects, views = counts[domain]
        for k, pill in enumerate(PILL_TYPES[:classes]):
            folder = out / domain / pill.code
            folder.mkdir(parents=True, exist_ok=True)
            for obj in range(objects):
                sprite = object_sprite(pill, np.random.default_rng([seed, domain_id, k, obj]))
                for view in range(views):
                    rng = np.random.default_rng([seed, domain_id, k, obj, 1 + view])
                    # phone JPEGs of varying quality; PNGs compressed fast (writing dominates the time otherwise)
                    options = {"quality": int(rng.integers(45, 86))} if ext == ".jpg" else {"compress_level": 1}
                    render(pill, rng, sprite).save(folder / f"{prefix}{obj:03d}_{view}{ext}", **options)
        written[domain] = classes * objects * views
    write_json(out / "class_map.json", class_map(PILL_TYPES[:classes]))
    return written


def class_map(pills: tuple[PillType, ...]) -> dict[str, object]:
    """Seed 003's class_mapping.json: the index order is the sorted codes (the class folders' order)."""
    codes = sorted(p.code for p in pills)
    by_code = {p.code: p for p in pills}
    return {
        "version": CLASS_MAP_VERSION,
        "num_classes": len(codes),
        "class_to_idx": {c: i for i, c in enumerate(codes)},
        "idx_to_class": {str(i): c for i, c in enumerate(codes)},
        "metadata": {c: {"index": i, "display_name": by_code[c].display_name, "shape": by_code[c].shape,
                         "imprint": by_code[c].mark, "training_weight": by_code[c].training_weight}
                     for i, c in enumerate(codes)},
    }
