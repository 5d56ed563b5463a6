"""Image files: finding them from an ID, and decoding any of them to an 8-bit RGB picture."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def list_images(folder: Path) -> list[Path]:
    """Every image file directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


class ImageIndex:
    """Finds the file for an ID in one folder, case-insensitively, with or without its extension.

    ``abc.jpg`` is looked up as given (never ``abc.jpg.jpg``); ``abc`` tries ``image_ext`` first, then
    the usual extensions. The folder is listed once, so lookups cost no file-system calls.
    """

    def __init__(self, folder: Path, image_ext: str = ".jpg"):
        self.folder = folder
        self.exts = [image_ext.lower()] + [e for e in IMAGE_EXTS if e != image_ext.lower()]
        self._by_lower = {p.name.lower(): p for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}

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


def load_rgb(path: str | Path | IO[bytes]) -> Image.Image:
    """Decode any image (L, LA, RGBA, P, CMYK, I;16, F ...) to RGB with its EXIF orientation applied.

    ``path`` may also be an open binary file (``serve`` decodes uploads with this same function)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # 16-bit and float images: scale the actual range to 0..255 instead of clipping it.
            arr = np.asarray(img, dtype=np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
            img = Image.fromarray(arr.astype(np.uint8), mode="L")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            # Composite transparency on white, as documents and product photos are shown.
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        return img.convert("RGB")


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
