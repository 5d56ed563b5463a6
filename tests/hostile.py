"""A corpus of hostile image files, generated (nothing downloaded): what a scraped or user-uploaded data set holds.

``write_corpus(folder)`` returns ``{file name: "ok" | "bad" | "either"}``: "ok" files must be used (decoded
correctly), "bad" ones listed as unreadable with a reason, "either" may go both ways (a mode-000 file is readable
by root).
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# One generator of these files for the tests and the load test
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serve_load import lying_jpeg as jpeg_claiming  # noqa: E402
from serve_load import png_bomb  # noqa: E402


def _image(rng: np.random.Generator, h: int = 48, w: int = 40) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def write_corpus(folder: Path, seed: int = 0) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    expect: dict[str, str] = {}

    def put(name: str, data: bytes, what: str) -> None:
        (folder / name).write_bytes(data)
        expect[name] = what

    jpeg, png = io.BytesIO(), io.BytesIO()
    _image(rng).save(jpeg, "JPEG")
    _image(rng).save(png, "PNG")
    put("zero_bytes.jpg", b"", "bad")
    put("truncated.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "bad")
    put("truncated.png", png.getvalue()[: len(png.getvalue()) // 2], "bad")
    put("text.jpg", b"this is a text file, not a picture\n" * 20, "bad")
    put("page.png", b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>", "bad")
    put("bomb.png", png_bomb(), "bad")
    put("huge_header.jpg", jpeg_claiming(65000, 65000), "bad")
    put("lying_header.jpg", jpeg_claiming(7000, 9000), "bad")  # under the pixel limit, but the data is not there

    frames = [_image(rng, 32, 32) for _ in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    expect["animated.gif"] = "ok"
    Image.fromarray(rng.integers(0, 256, (40, 36, 4), dtype=np.uint8), "CMYK").save(folder / "cmyk.jpg", "JPEG")
    expect["cmyk.jpg"] = "ok"
    Image.fromarray((rng.integers(0, 4096, (40, 40)) * 16).astype(np.uint16)).save(folder / "deep16.png")
    expect["deep16.png"] = "ok"
    pal = Image.fromarray(rng.integers(0, 8, (40, 40), dtype=np.uint8), "P")
    pal.putpalette([v for i in range(8) for v in (i * 30, 255 - i * 30, 90)])
    pal.info["transparency"] = 0
    pal.save(folder / "palette_alpha.png", transparency=0)
    expect["palette_alpha.png"] = "ok"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    _image(rng, 30, 50).save(folder / "exif_rotated.jpg", "JPEG", exif=exif.tobytes())
    expect["exif_rotated.jpg"] = "ok"

    os.symlink("loop.jpg", folder / "loop.jpg")  # a link to itself: ELOOP on open
    expect["loop.jpg"] = "bad"
    _image(rng).save(folder / "mode000.png")
    os.chmod(folder / "mode000.png", 0)
    expect["mode000.png"] = "either" if os.geteuid() == 0 else "bad"  # root reads it anyway
    return expect
