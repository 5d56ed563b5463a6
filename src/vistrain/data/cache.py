"""Decode-once image cache: every image is decoded and put through the deterministic preprocessing once, and
every fold, tune trial, resumed run and ``evaluate`` / ``predict`` on the same files reads the stored uint8
pixels instead of the JPEG.

``data.cache``: ``memory`` keeps one [N, H, W, 3] uint8 array in this process (DataLoader workers fork and read it
without a copy); ``disk`` writes the same array to one file under ``data.cache_dir`` that every process maps with
``np.memmap``, so a worker's private memory does not grow with the data set; ``auto`` takes memory when the pixels
fit in a quarter of the available memory, else disk.

A row holds exactly what ``data.cache: off`` decodes for that file (``Preprocessor.load``: the training size,
aspect not kept, as inference does), so training, validation and inference read one array, and the cache is a
speed switch: the augmentation (a random resized crop included) runs on the same pixels either way, and a run with
the same seed trains on the same tensors with the cache on or off. Every row has the same shape, so a fixed-size
array needs no offset table and row ``i`` is one slice.

A disk cache is ``<key>.u8`` (the pixels) plus ``<key>.json`` (the index: files with their byte size and mtime,
the row of each, the unreadable ones with the reason, what decided the pixels). The key hashes the file list (path,
size, mtime) with everything that decides the stored pixels or which files are readable (``_pixel_spec``): the
preprocessing as ``preprocess.json`` describes it less the normalisation, ``data.max_image_pixels`` and the
versions of the decoding libraries. Touching one image, changing the limit or upgrading Pillow gives a new key and
a rebuild. Both files are written under temporary names and renamed when complete, the index last: a killed build
leaves no index, and an index whose data file is missing or of the wrong length is rebuilt, never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vistrain.data.images import get_max_pixels
from vistrain.data.preprocess import Preprocessor

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the stored layout or the decoding changes: older caches then miss and are rebuilt
MODES = ("auto", "off", "memory", "disk")
PARALLEL_FROM = 256  # fewer images decode faster in this process than a pool takes to start
_MEMORY: dict[str, ImageCache] = {}  # this process's memory caches by key: folds and tune trials share them
_MEMORY_KEEP = 4


def cache_dir(configured: Path | None) -> Path:
    """``data.cache_dir`` when set, else ``$VISTRAIN_CACHE_DIR``, else ``~/.cache/vistrain``."""
    if configured is not None:
        return Path(configured).expanduser()
    env = os.environ.get("VISTRAIN_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vistrain"


@dataclass
class ImageCache:
    """Stored pixels of one file list; ``decode(path)`` is an ``ImageDataset`` decode step, the twin of
    ``Preprocessor.load``."""

    key: str
    size: tuple[int, int]  # [H, W] of every stored image
    spec: dict[str, Any]  # the pixel preprocessing (``_pixel_spec``)
    count: int  # rows: one per file of the list, readable or not (an unreadable file's row stays black)
    rows: dict[str, int]  # path -> row of the readable files
    errors: dict[str, str]  # path -> why it could not be decoded
    kind: str  # "memory" or "disk"
    data_path: Path | None = None  # disk: the .u8 file
    pre: Preprocessor | None = None  # decodes a file the cache does not hold, as the cache would have stored it
    _pixels: np.ndarray | None = field(default=None, repr=False)  # memory: the array; disk: opened on first use

    def pixels(self) -> np.ndarray:
        """[N, H, W, 3] uint8: the array itself, or a read-only memory map of the file (opened per process)."""
        if self._pixels is None:
            assert self.data_path is not None
            self._pixels = np.memmap(self.data_path, dtype=np.uint8, mode="r", shape=(self.count, *self.size, 3))
        return self._pixels

    def decode(self, path: str) -> np.ndarray:
        """uint8 [H, W, 3] of ``path``: a copy of its row (the transforms may write to it); a file the cache does not
        hold is decoded as the cache would have stored it."""
        row = self.rows.get(str(path))
        if row is None:
            return (self.pre or Preprocessor(size=self.size)).load(path)
        return np.array(self.pixels()[row])

    def paths(self) -> list[str]:
        """The file list the cache was built from, in its order (its key depends on it): row i is file i; the
        unreadable files keep their empty rows, and ``errors`` holds them in the order the decode met them."""
        slots: list[str | None] = [None] * self.count
        for path, row in self.rows.items():
            slots[row] = path
        unreadable = iter(self.errors)
        return [path if path is not None else next(unreadable) for path in slots]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.kind == "disk":  # a spawned worker maps the file itself instead of receiving the pixels
            state["_pixels"] = None
        return state

    @property
    def nbytes(self) -> int:
        return self.count * self.size[0] * self.size[1] * 3


@dataclass
class RunCache:
    """The cache of one run's images, as opened for it: what training and validation read."""

    images: ImageCache
    lines: list[str]  # what was built or reused, for the run's log ("cache memory built: ...")

    @property
    def errors(self) -> dict[str, str]:
        """Unreadable files with the reason, for bad_images.csv."""
        return self.images.errors


# ------------------------------------------------------------------------------------------------- keys

def _libraries() -> dict[str, str | None]:
    """Versions of what makes the stored pixels: Pillow and the codecs it decodes with (JPEG, PNG's zlib, TIFF, WebP),
    OpenCV (resize, CLAHE), NumPy (the 16-bit rescaling). Another version may round a pixel differently."""
    import cv2
    import PIL
    from PIL import features

    codecs = {name: features.version(name) for name in ("jpg", "libjpeg_turbo", "zlib", "libtiff", "webp")}
    return {"pillow": PIL.__version__, **codecs, "opencv": cv2.__version__, "numpy": np.__version__}


def _pixel_spec(pre: Preprocessor, max_pixels: int) -> dict[str, Any]:
    """What decides the stored pixels and which files are readable: the preprocessing as ``preprocess.json``
    describes it (a decode rule added there keys the cache too) less its normalisation, which is applied to the
    stored pixels afterwards (models of other mean / std share a cache); ``data.max_image_pixels``; the libraries."""
    described = {k: v for k, v in pre.to_dict().items() if k not in ("normalize", "hash")}
    return {"format": FORMAT, **described, "max_image_pixels": max_pixels, "libraries": _libraries()}


def _file_list(paths: Sequence[str]) -> list[list[Any]]:
    """[path, bytes, mtime_ns] of each file: a changed file changes the key. A file that cannot be stat'ed (gone, a
    link loop, no permission) keys as [path, -1, -1]; its decode then fails and lists it as unreadable."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append([str(p), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([str(p), -1, -1])
    return out


def _key(files: list[list[Any]], spec: dict[str, Any]) -> str:
    blob = json.dumps({"files": files, "pixels": spec}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


# ----------------------------------------------------------------------------------------------- decoding

_WORKER: dict[str, Any] = {}


def _init_worker(pre: Preprocessor, max_pixels: int) -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already
    _WORKER.update(pre=pre, max_pixels=max_pixels)


def _decode_one(path: str) -> tuple[np.ndarray | None, str | None]:
    """``Preprocessor.load`` under the cache's pixel limit; or the reason it failed."""
    try:
        return _WORKER["pre"].load(path, _WORKER["max_pixels"]), None
    except Exception as err:  # noqa: BLE001 - any decode failure makes the file unreadable
        return None, f"{type(err).__name__}: {err}"


def _decoded(paths: Sequence[str], pre: Preprocessor, max_pixels: int, processes: int
             ) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """``_decode_one`` over ``paths`` in order, in a pool of ``processes`` when it pays."""
    if processes <= 1 or len(paths) < PARALLEL_FROM:
        _init_worker(pre, max_pixels)
        yield from map(_decode_one, paths)
        return
    import multiprocessing as mp

    # fork: the workers start in milliseconds with everything imported; they only run PIL and OpenCV
    with ProcessPoolExecutor(processes, mp_context=mp.get_context("fork"), initializer=_init_worker,
                             initargs=(pre, max_pixels)) as pool:
        yield from pool.map(_decode_one, paths, chunksize=max(1, min(64, len(paths) // (processes * 8))))


def _progress(total: int, label: str) -> Callable[[int], None]:
    """A tqdm bar on a terminal, else a [DATA] line every 10 %."""
    from tqdm import tqdm

    from vistrain.tracking.logs import show_progress

    if show_progress():
        bar = tqdm(total=total, desc=label, leave=False, dynamic_ncols=True)

        def tick(done: int) -> None:
            bar.update(1)
            if done == total:
                bar.close()
        return tick
    step = max(1, total // 10)

    def line(done: int) -> None:
        if done % step == 0 and done < total:
            log.info("[DATA] %s: %d/%d images", label, done, total)
    return line


# ------------------------------------------------------------------------------------------------- disk

def _index_path(root: Path, key: str) -> Path:
    return root / f"{key}.json"


def _open_disk(root: Path, key: str, pre: Preprocessor) -> ImageCache | None:
    """The complete cache of ``key``, or None when it is missing, partial or unreadable (then it is rebuilt)."""
    size = pre.size
    index = _index_path(root, key)
    if not index.is_file():
        return None
    try:
        meta = json.loads(index.read_text())
        count = len(meta["files"])
        rows = {f[0]: int(f[3]) for f in meta["files"] if f[3] >= 0}
        data = root / meta["data"]
        if meta["key"] != key or tuple(meta["size"]) != tuple(size) or meta["format"] != FORMAT:
            raise ValueError("the index does not match its name")
        if data.stat().st_size != count * size[0] * size[1] * 3:
            raise ValueError(f"{data.name} has {data.stat().st_size} bytes, not {count} images")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        log.warning("[DATA] cache %s is incomplete or damaged (%s); rebuilding it", index, err)
        return None
    return ImageCache(key, size, meta["pixels"], count, rows, dict(meta.get("errors", {})), "disk", data, pre)


def _remove_leftovers(root: Path, key: str) -> None:
    """Temporary files of builds of ``key`` that were killed (their process is gone)."""
    for tmp in root.glob(f".{key}.*.tmp"):
        pid = tmp.name.split(".")[2]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _family(files: list[list[Any]], spec: dict[str, Any]) -> str:
    """What a newer cache replaces: the same file paths and settings, whatever the files' contents and the
    libraries' versions (a cache of older files, or made by an older Pillow, is never read again)."""
    return _key([[f[0]] for f in files], {k: v for k, v in spec.items() if k != "libraries"})


def _remove_older(root: Path, family: str, keep: str) -> None:
    """Caches of ``family`` other than ``keep``: older file contents or library versions, never read again."""
    for index in root.glob("*.json"):
        if index.stem == keep:
            continue
        try:
            meta = json.loads(index.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("family") == family:
            index.unlink(missing_ok=True)
            (root / str(meta.get("data", ""))).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ building

def _build(paths: list[str], files: list[list[Any]], pre: Preprocessor, key: str, spec: dict[str, Any], kind: str,
           root: Path, processes: int) -> tuple[ImageCache, str]:
    """Decode ``paths`` once, row by row into the cache's pixels (disk: into a temporary file's memory map, so a
    data set larger than memory never sits in memory); returns the cache and a line for the log."""
    started = time.time()
    shape = (len(paths), *pre.size, 3)
    tmp = None
    if kind == "disk":
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root, key)
        tmp = root / f".{key}.{os.getpid()}.tmp"
        pixels: np.ndarray = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)
    else:
        pixels = np.zeros(shape, dtype=np.uint8)
    errors: dict[str, str] = {}
    tick = _progress(len(paths), f"cache {kind} build")
    try:
        for i, (array, error) in enumerate(_decoded(paths, pre, spec["max_image_pixels"], processes)):
            if array is None:
                errors[paths[i]] = error or "unreadable"
            else:
                pixels[i] = array
            tick(i + 1)
        rows = {p: i for i, p in enumerate(paths) if p not in errors}
        cache = ImageCache(key, pre.size, spec, len(files), rows, errors, kind, None, pre, pixels)
        del pixels  # the cache holds the only reference: _finish_disk unmaps the file before renaming it
        if tmp is not None:
            _finish_disk(cache, tmp, root, files)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    seconds = time.time() - started
    line = (f"cache {kind} built: {len(rows)} images{f' ({len(errors)} unreadable)' if errors else ''} at "
            f"{pre.size[0]}x{pre.size[1]} in {seconds:.1f} s ({len(paths) / max(seconds, 1e-9):.0f} img/s, "
            f"{processes if len(paths) >= PARALLEL_FROM else 1} process(es)), {cache.nbytes / 2**20:.1f} MiB"
            + (f" -> {root}" if kind == "disk" else ""))
    return cache, line


def _finish_disk(cache: ImageCache, tmp: Path, root: Path, files: list[list[Any]]) -> None:
    """The pixels flushed and renamed into place, then the index written (last); ``cache`` then maps the file."""
    from vistrain.tracking.files import atomic_write_text

    assert isinstance(cache._pixels, np.memmap)
    cache._pixels.flush()
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    cache._pixels = None  # unmapped before the rename; mapped again on first use
    data = root / f"{cache.key}.u8"
    os.replace(tmp, data)
    cache.data_path = data
    family = _family(files, cache.spec)
    meta = {"kind": "vistrain image cache", "format": FORMAT, "key": cache.key, "family": family, "data": data.name,
            "size": list(cache.size), "pixels": cache.spec,
            "files": [[p, size, mtime, cache.rows.get(p, -1)] for p, size, mtime in files],
            "errors": cache.errors, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(_index_path(root, cache.key), json.dumps(meta))
    _remove_older(root, family, cache.key)


def _available_memory() -> int:
    """Bytes the system can give without swapping (MemAvailable); a large number where it cannot tell."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 40


def resolve_mode(mode: str, n_images: int, size: tuple[int, int]) -> str:
    """``auto``: memory when the stored pixels fit in a quarter of the available memory, else disk."""
    if mode != "auto":
        return mode
    return "memory" if n_images * size[0] * size[1] * 3 <= _available_memory() // 4 else "disk"


def open_cache(paths: Sequence[str], pre: Preprocessor, mode: str, root: Path | None = None,
               processes: int | None = None, max_pixels: int | None = None) -> RunCache:
    """The cache of ``paths`` as ``pre.load`` decodes them: reused when a complete one exists (this process's
    memory, or the disk), else built with one decode per image. ``max_pixels``: the ``data.max_image_pixels`` of the
    decode, by default this process's (``images.set_max_pixels``)."""
    from vistrain.engine.device import usable_cores

    paths = [str(p) for p in paths]
    files = _file_list(paths)
    kind = resolve_mode(mode, len(paths), pre.size) if paths else "memory"  # nothing to map: no empty file
    root = cache_dir(root)
    spec = _pixel_spec(pre, max_pixels or get_max_pixels())
    key = _key(files, spec)
    cache = _MEMORY.get(key) if kind == "memory" else _open_disk(root, key, pre)
    if cache is not None:
        line = (f"cache {kind} reused: {len(cache.rows)} images at {pre.size[0]}x{pre.size[1]}"
                + (f" ({cache.data_path})" if cache.data_path else ""))
    else:
        cache, line = _build(paths, files, pre, key, spec, kind, root, processes or usable_cores())
    if kind == "memory":
        _remember(cache)
    return RunCache(cache, [line])


def on_this_machine(cache: RunCache) -> RunCache:
    """``cache`` as a process on another machine received it from rank 0 (torchrun): a memory cache came with the
    object, but a disk cache under ``data.cache_dir`` on a machine-local disk is not here. Such a cache is opened from
    this machine's disk when complete there, else built there from the same files under the same pixel limit (the
    same key when the files and libraries are the same: a shared file system); call it on one process per machine
    first (``distributed.node_first``)."""
    images = cache.images
    if images.kind != "disk" or _complete_here(images):
        return cache
    assert images.data_path is not None and images.pre is not None  # a disk cache has both
    return open_cache(images.paths(), images.pre, "disk", images.data_path.parent,
                      max_pixels=images.spec["max_image_pixels"])


def _complete_here(cache: ImageCache) -> bool:
    """The data file of ``cache`` at its full length and its index, on this machine (a build in progress has neither
    name: both are renamed into place when complete)."""
    data = cache.data_path
    return (data is not None and data.is_file() and data.stat().st_size == cache.nbytes
            and _index_path(data.parent, cache.key).is_file())


def _remember(cache: ImageCache) -> None:
    _MEMORY.pop(cache.key, None)
    _MEMORY[cache.key] = cache
    while len(_MEMORY) > _MEMORY_KEEP:
        _MEMORY.pop(next(iter(_MEMORY)))


def find_cache(paths: Sequence[str], pre: Preprocessor, root: Path | None = None) -> ImageCache | None:
    """A complete disk cache holding every one of ``paths``, unchanged, at ``pre``'s size and preprocessing: what
    ``evaluate`` and ``predict`` read instead of decoding, under this process's pixel limit and libraries; None if
    there is none (a memory cache lives and dies with its run)."""
    spec = _pixel_spec(pre, get_max_pixels())
    try:
        wanted = {f[0]: (f[1], f[2]) for f in _file_list([str(p) for p in paths])}
    except OSError:
        return None
    root = cache_dir(root)
    for index in sorted(root.glob("*.json"), key=lambda p: -p.stat().st_mtime) if root.is_dir() else []:
        try:
            meta = json.loads(index.read_text())
            if meta.get("pixels") != spec:
                continue
            stored = {f[0]: (f[1], f[2]) for f in meta["files"] if f[3] >= 0}
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue
        if all(stored.get(p) == v for p, v in wanted.items()):
            return _open_disk(root, index.stem, pre)
    return None

