"""Classify images with an exported vistrain model, without vistrain: onnxruntime, Pillow, OpenCV and numpy follow
the run's preprocess.json (decode, a large JPEG reduced, crop, resize, CLAHE, normalise) and give `vistrain
predict`'s probabilities.

    python examples/onnx_client.py RUN/export/model_fold0.onnx IMAGE [IMAGE ...] [--top-k 5] [--preprocess FILE]
prints per image: file, then the top-k classes and probabilities, tab-separated."""
import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

KNOWN = {("high_bit_depth", "rule"): "min_max", ("transparency", "background"): [255, 255, 255]}
SHRINKS = ("reduced_area", "area", "interpolation")


def reduced(img: Image.Image, p: dict) -> None:
    """A large JPEG: libjpeg's DCT-scaled decode, as preprocess.json's decode.reduce says (absent: full decode)."""
    r = p["decode"].get("reduce")
    if not r or img.format not in r["formats"]:
        return
    w, h = (img.height, img.width) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else img.size  # as shown
    out_h, out_w = p["resize"]["size"]
    for s in r["scales"]:
        sw, sh = -(-w // s), -(-h // s)
        if (min(sw, sh) >= r["at_least"] * max(out_h, out_w) if p["crop"] == "center_square"
                else sw >= r["at_least"] * out_w and sh >= r["at_least"] * out_h):
            img.draft(None, (img.width // s, img.height // s))
            return


def decode(path: str, p: dict) -> np.ndarray:
    """A file -> RGB uint8 [H, W, 3], step by step as preprocess.json's "decode" block says."""
    d = p["decode"]
    with Image.open(path) as img:  # an animated file: its first frame
        reduced(img, p)
        img = ImageOps.exif_transpose(img)
        if img.mode in d["high_bit_depth"]["modes"]:
            a = np.asarray(img).astype(np.float32)
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) * np.float32(255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
            img = Image.fromarray(a.astype(np.uint8))
        if img.mode in d["transparency"]["modes"] or (img.mode == "P" and "transparency" in img.info):
            white = Image.new("RGBA", img.size, (*d["transparency"]["background"], 255))
            img = Image.alpha_composite(white, img.convert("RGBA"))
        return np.asarray(img.convert("RGB"))


def tensor(rgb: np.ndarray, p: dict) -> np.ndarray:
    """Crop, resize, CLAHE, normalise: RGB uint8 -> float32 [3, H, W]."""
    if p["crop"] == "center_square":
        s = min(rgb.shape[:2])
        top, left = (rgb.shape[0] - s) // 2, (rgb.shape[1] - s) // 2
        rgb = rgb[top:top + s, left:left + s]
    h, w = p["resize"]["size"]
    flags = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA,
             "nearest": cv2.INTER_NEAREST}
    shrink = p["resize"].get("shrink", "interpolation") != "interpolation" and rgb.shape[0] >= h and rgb.shape[1] >= w
    if rgb.shape[:2] != (h, w):  # a shrink: INTER_AREA (resize.shrink_rule); else the named interpolation
        flag = cv2.INTER_AREA if shrink else flags[p["resize"]["interpolation"]]
        rgb = cv2.resize(np.ascontiguousarray(rgb), (w, h), interpolation=flag)
    if p["clahe"]["enabled"]:
        lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
        grid = p["clahe"]["grid"]
        lab[..., 0] = cv2.createCLAHE(p["clahe"]["clip_limit"], (grid, grid)).apply(np.ascontiguousarray(lab[..., 0]))
        rgb = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    n = p["normalize"]
    x = (rgb.astype(np.float32) / np.float32(1 / n["scale"]) - np.float32(n["mean"])) / np.float32(n["std"])
    return x.transpose(2, 0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx")
    ap.add_argument("images", nargs="+")
    ap.add_argument("--preprocess", help="default: preprocess.json beside the .onnx file")
    ap.add_argument("--top-k", type=int, default=5)
    args = ap.parse_args()
    spec = json.loads(Path(args.preprocess or Path(args.onnx).with_name("preprocess.json")).read_text())
    for (block, key), value in KNOWN.items():  # a decode this client does not implement: refuse, never guess
        if spec["decode"][block][key] != value:
            raise SystemExit(f"preprocess.json: decode.{block}.{key} is {spec['decode'][block][key]!r}; "
                             f"this client implements {value!r}")
    if spec["resize"].get("shrink", "interpolation") not in SHRINKS:
        raise SystemExit(f"preprocess.json: resize.shrink is {spec['resize']['shrink']!r}; this client implements "
                         f"{', '.join(SHRINKS)}")
    session = ort.InferenceSession(args.onnx, providers=["CPUExecutionProvider"])
    classes = json.loads(session.get_modelmeta().custom_metadata_map["vistrain.classes"])
    for path in args.images:
        _, probs = session.run(["logits", "probs"], {"image": tensor(decode(path, spec), spec)[None]})
        top = np.argsort(-probs[0], kind="stable")[: args.top_k]
        print("\t".join([path, *(f"{classes[i]}\t{probs[0][i]:.8f}" for i in top)]))


if __name__ == "__main__":
    main()
