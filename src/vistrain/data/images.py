"""Image files: finding them from an ID, and decoding any of them to an 8-bit RGB picture."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

# data.max_image_pixels: an image whose header claims more pixels is refused before anything is decoded, so a
# decompression bomb (a tiny PNG of 30000 x 30000) or a lying header costs no memory. Every command sets it from
# its config (set_max_pixels); DataLoader workers inherit it (fork). It replaces Pillow's own check (a warning
# above 89 M pixels, an error above twice that), which would otherwise fire first with another number.
DEFAULT_MAX_PIXELS = 100_000_000
_max_pixels = DEFAULT_MAX_PIXELS
Image.MAX_IMAGE_PIXELS = None


def set_max_pixels(limit: int) -> None:
    """The pixel limit of every later ``load_rgb`` in this process."""
    global _max_pixels
    _max_pixels = int(limit)


def get_max_pixels() -> int:
    """The pixel limit ``load_rgb`` applies in this process (``set_max_pixels``)."""
    return _max_pixels


ORIENTATION_TAG = 0x0112  # EXIF Orientation; 5..8 turn the picture a quarter, so width and height swap
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # 16-bit, 32-bit integer and float greyscale
TRANSPARENT_MODES = ("RGBA", "LA", "PA")  # and "P" with a transparent palette index

# What load_rgb does, in the words a client in another program needs to do the same: preprocess.json's "decode"
# block (Preprocessor.to_dict). examples/onnx_client.py follows it, and a test holds it to predict's probabilities.
DECODE: dict[str, Any] = {
    "library": "Pillow (PIL.Image.open), numpy for the high_bit_depth rule",
    "order": ["frame", "orientation", "high_bit_depth", "transparency", "rgb"],
    "frame": "first: an animated GIF / WebP / PNG / TIFF gives the frame Image.open shows before any seek",
    "orientation": "the EXIF Orientation tag applied: PIL.ImageOps.exif_transpose(img)",
    "high_bit_depth": {
        "modes": list(HIGH_BIT_DEPTH_MODES),
        "rule": "min_max",
        "formula": "a = np.asarray(img).astype(float32); lo, hi = float(a.min()), float(a.max()); if hi > lo: "
                   "a = (a - lo) * float32(255.0 / (hi - lo)) (float32 arithmetic), else a = 0; "
                   "uint8 by truncation (a.astype(uint8)); the result is mode L",
    },
    "transparency": {
        "modes": list(TRANSPARENT_MODES),
        "palette": "mode P with a transparent index (img.info['transparency']) is composited too",
        "background": [255, 255, 255],
        "rule": "PIL.Image.alpha_composite(Image.new('RGBA', img.size, (255, 255, 255, 255)), img.convert('RGBA'))",
    },
    "palette": "P: converted via RGBA and composited on white when it has a transparent index, else convert('RGB')",
    "cmyk": "img.convert('RGB'), Pillow's arithmetic conversion; an embedded ICC profile is not applied",
    "rgb": "every mode then img.convert('RGB') (L, 1, YCbCr, CMYK, P ...); output uint8 [H, W, 3]",
}


class ImageTooLarge(ValueError):
    """The header claims more pixels than data.max_image_pixels allows."""


class ImageTruncated(ValueError):
    """The file is too short for the image its header describes."""


def _file_size(path: str | Path | IO[bytes]) -> int:
    if isinstance(path, (str, Path)):
        return Path(path).stat().st_size
    here = path.tell()
    size = path.seek(0, 2)
    path.seek(here)
    return size


def _check_jpeg_length(img: Image.Image, path: str | Path | IO[bytes]) -> None:
    """A JPEG codes every 8x8 luminance block with at least one bit (a DC difference; usually far more), so a file
    shorter than blocks / 8 bytes cannot hold its image: libjpeg would pad the missing part with grey and report
    nothing. Such a file (a truncated download, a header that lies about the size) is refused before decoding."""
    w, h = img.size
    least = -(-w // 8) * -(-h // 8) // 8
    size = _file_size(path)
    if size < least:
        raise ImageTruncated(f"{size:,} bytes cannot hold a {w}x{h} JPEG (at least {least:,}): truncated, or its "
                             "header lies about the size")


def is_image_entry(path: Path) -> bool:
    """A directory entry to treat as an image: an image suffix on a file, or on a link whether or not it leads
    anywhere (a dangling link or a link loop is then reported as unreadable, never silently left out)."""
    return path.suffix.lower() in IMAGE_EXTS and (path.is_file() or path.is_symlink())


def list_images(folder: Path) -> list[Path]:
    """Every image file directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if is_image_entry(p))


class ImageIndex:
    """Finds the file for an ID in one folder, case-insensitively, with or without its extension.

    ``abc.jpg`` is looked up as given (never ``abc.jpg.jpg``); ``abc`` tries ``image_ext`` first, then
    the usual extensions. The folder is listed once, so lookups cost no file-system calls.
    """

    def __init__(self, folder: Path, image_ext: str = ".jpg"):
        self.folder = folder
        self.exts = [image_ext.lower()] + [e for e in IMAGE_EXTS if e != image_ext.lower()]
        self._by_lower = {p.name.lower(): p for p in folder.iterdir() if p.is_file() or p.is_symlink()
                          } if folder.is_dir() else {}

    def find(self, image_id: str) -> Path | None:
        name = str(image_id).strip()
        if "/" in name or "\\" in name:  # an ID with a sub-folder: ask the file system
            return self._find_on_disk(name)
        suffix = Path(name).suffix.lower()
        if suffix in (*IMAGE_EXTS, *self.exts[:1]):
            hit = self._by_lower.get(name.lower())
            if hit is not None:
                return hit
            name = name[: -len(suffix)]
        for ext in self.exts:
            hit = self._by_lower.get(f"{name}{ext}".lower())
            if hit is not None:
                return hit
        return None

    def _find_on_disk(self, name: str) -> Path | None:
        path = self.folder / name
        if path.suffix.lower() in IMAGE_EXTS and path.is_file():
            return path
        stem = path.with_suffix("") if path.suffix.lower() in IMAGE_EXTS else path
        for ext in self.exts:
            for cand in (stem.with_name(stem.name + ext), stem.with_name(stem.name + ext.upper())):
                if cand.is_file():
                    return cand
        return None


def load_rgb(path: str | Path | IO[bytes], max_pixels: int | None = None, reduce_over: int | None = None,
             scale_for: Callable[[int, int], int] | None = None) -> Image.Image:
    """Decode any image (L, LA, RGBA, P, CMYK, I;16, F ...) to RGB with its EXIF orientation applied; an animated
    image gives its first frame. More pixels than ``max_pixels`` (default: ``set_max_pixels``) in the header (under
    ``reduce_over``: in the decoded image) is an ``ImageTooLarge`` before decoding; a truncated or corrupt file
    raises (Pillow's ``OSError``), never half an image.

    A JPEG may be decoded reduced, at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, ``Image.draft``): at the factor
    ``scale_for(W, H)`` returns for its displayed size (after the EXIF orientation; ``Preprocessor.decode_scale``,
    the rule every path shares), or more when ``reduce_over`` (serve's decode budget) needs more to keep the decoded
    pixels within it. ``img.info["reduced"]`` then holds the factor. ``path`` may also be an open binary file
    (``serve`` decodes uploads with this same function)."""
    limit, scale = max_pixels or _max_pixels, 1
    with Image.open(path) as img:
        w, h = counted = img.size  # the limit counts the header's size, or under a budget the decoded size
        if img.format == "JPEG":
            _check_jpeg_length(img, path)
            if scale_for is not None:
                shown = (h, w) if img.getexif().get(ORIENTATION_TAG, 1) in SWAPPING_ORIENTATIONS else (w, h)
                scale = scale_for(*shown)
            if reduce_over and -(-w // scale) * -(-h // scale) > reduce_over:
                scale = next((s for s in (2, 4, 8) if s >= scale and -(-w // s) * -(-h // s) <= reduce_over), 8)
            if scale > 1:
                # A request of (W // s, H // s) makes Pillow pick exactly s (its draft takes the largest of 8, 4, 2
                # that keeps at least the requested size); the decoded image is (ceil(W / s), ceil(H / s)).
                img.draft(None, (max(1, w // scale), max(1, h // scale)))
                scale = img.decoderconfig[0] if img.decoderconfig else 1
                counted = img.size if reduce_over else counted
        w, h = counted
        if w * h > limit:
            raise ImageTooLarge(f"{w}x{h} = {w * h:,} pixels is over data.max_image_pixels={limit:,}")
        rgb = _as_rgb(ImageOps.exif_transpose(img))
    if scale > 1:
        rgb.info["reduced"] = scale
    return rgb


def _as_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> RGB by the rules of ``DECODE`` (after the EXIF orientation)."""
    if img.mode in HIGH_BIT_DEPTH_MODES:
        # 16-bit and float images: scale the actual range to 0..255 instead of clipping it.
        arr = np.asarray(img).astype(np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode in TRANSPARENT_MODES or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency on white, as documents and product photos are shown.
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def to_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """An image already in memory -> RGB uint8 [H, W, 3] by the same rules as a file (``load_rgb``): a PIL image
    of any mode (its EXIF orientation applied), or a numpy array: [H, W] greyscale, [H, W, 3] RGB or [H, W, 4] RGBA
    (uint8; 16-bit and float greyscale rescaled min-max)."""
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[2] in (3, 4) and a.dtype == np.uint8:
            image = Image.fromarray(a, "RGBA" if a.shape[2] == 4 else "RGB")
        elif a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 1):
            a = a.reshape(a.shape[:2])
            image = Image.fromarray(a if a.dtype != np.float64 else a.astype(np.float32))
        else:
            raise ValueError(f"an image array must be [H, W] greyscale or [H, W, 3|4] uint8 RGB(A); got {a.dtype} "
                             f"{a.shape}")
    return np.asarray(_as_rgb(ImageOps.exif_transpose(image)))


def check_images(paths: list[str], workers: int = 8) -> dict[str, str]:
    """Fully decode every path; return ``{path: error}`` for the unreadable ones."""

    def _check(path: str) -> tuple[str, str | None]:
        try:
            load_rgb(path).load()
            return path, None
        except Exception as err:  # noqa: BLE001 - any decode failure makes the file unreadable
            return path, f"{type(err).__name__}: {err}"

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return {p: e for p, e in pool.map(_check, paths) if e is not None}
