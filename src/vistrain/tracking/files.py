"""Atomic writes for every result file: a temporary file in the same folder, then ``os.replace``.

A write the file system refuses (full, read-only, no permission, over the file-size limit) is a ``StorageError``
naming the file and the cause, and leaves the previous version of the file as it was.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from vistrain.errors import UserError

# What the file system says when it will not take a write, and what to do about it.
STORAGE_ERRNOS = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space",
    errno.EFBIG: "the file is over the file-size limit (ulimit -f)",
    errno.EROFS: "make the file system writable",
    errno.EACCES: "make the folder writable for this user",
    errno.EPERM: "make the folder writable for this user",
}


class StorageError(UserError):
    """A result file or checkpoint could not be written: the disk, not the run, is the problem."""


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn the file system refusing a write of ``path`` into a one-line ``StorageError`` naming it."""
    try:
        yield
    except OSError as err:
        if err.errno not in STORAGE_ERRNOS:
            raise
        cause = f"{os.strerror(err.errno)} ({errno.errorcode[err.errno]})"
        raise StorageError(f"cannot write {path}: {cause}; {STORAGE_ERRNOS[err.errno]}, then continue the run with "
                           "vistrain train --resume RUN (the last good checkpoint is kept)") from err


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write(path: Path, write: Any) -> None:
    """``write(fh)`` into a temporary file beside ``path``, synced, then renamed over it."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                out = _Recording(fh)
                try:
                    write(out)
                except RuntimeError as err:  # torch.save's writer turns the file's OSError into a RuntimeError
                    if out.error is None:
                        raise
                    raise out.error from err
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class _Recording:
    """A binary file whose writes keep the first OSError, for writers that hide it behind their own error."""

    def __init__(self, fh: Any):
        self.fh, self.error = fh, None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.fh.flush()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _strict(obj: Any) -> Any:
    """``obj`` with every NaN / inf float (Python or NumPy) as None: strict JSON, which every parser reads
    (``NaN`` is a Python extension that e.g. JavaScript's ``JSON.parse`` and ``jq`` reject)."""
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _strict(obj.tolist())
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Indented, strict JSON (non-finite numbers become null), written atomically."""
    atomic_write_text(path, json.dumps(_strict(obj), indent=2, default=_json_default, allow_nan=False) + "\n")


def write_yaml(path: Path, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


def write_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def write_npy(path: Path, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def read_json_dict(path: Path) -> dict[str, Any]:
    """A JSON file as a dict; an absent, broken or non-object file reads as empty (reports, plots and the model card
    are best-effort: a missing file costs its section, never the page)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def json_line(obj: dict[str, Any]) -> str:
    """One line of strict JSON (non-finite numbers become null), for metrics.jsonl."""
    return json.dumps(_strict(obj), default=_json_default, allow_nan=False) + "\n"
