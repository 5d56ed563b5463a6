"""Atomic checkpoints with the full training state (model, optimiser, scheduler, scaler, hooks, RNG).

Checkpoints hold only tensors and plain values (dicts, lists, numbers, strings), so every one loads with
``torch.load(weights_only=True)``: a file from elsewhere (a shared run, a downloaded ``pretrained_path``) cannot run
code while it is read. A file that needs more (a pickled object, a checkpoint of vistrain before 0.1 holding NumPy
RNG state) is refused with a UserError naming it. ``save_weights`` also writes the model's weights as
``.safetensors`` beside the ``.pth``: the format other tools read without any unpickler.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vistrain.errors import UserError
from vistrain.tracking.files import atomic_write, atomic_write_bytes


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a reader never sees half a file, and a
    full or read-only disk is a ``StorageError`` naming the file, the previous version left intact."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def save_weights(obj: dict[str, Any], path: Path) -> None:
    """``atomic_save(obj, path)`` and the evaluated weights (``obj["ema"]`` when set, else ``obj["model"]``) as
    ``path.with_suffix(".safetensors")``, with the checkpoint's plain fields as JSON metadata."""
    atomic_save(obj, path)
    weights = obj["ema"] if obj.get("ema") is not None else obj["model"]
    write_safetensors(weights, path.with_suffix(".safetensors"), vistrain_fields(obj))


def vistrain_fields(obj: dict[str, Any]) -> dict[str, str]:
    """A vistrain checkpoint's plain fields (``SAFETENSORS_META``) as the JSON strings of .safetensors metadata."""
    return {k: json.dumps(obj[k], default=str) for k in SAFETENSORS_META if k in obj}


def write_safetensors(weights: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``weights`` as one .safetensors file, written atomically, with ``metadata`` (strings) beside ``format``."""
    from safetensors.torch import save

    # clone: safetensors refuses tensors sharing storage (tied weights), and views of a bigger buffer
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    atomic_write_bytes(path, save(tensors, metadata={"format": "pt", **metadata}))


# The checkpoint fields copied into a .safetensors file's metadata (JSON strings).
SAFETENSORS_META = ("fold", "epoch", "classes", "task", "preprocess", "metrics", "vistrain_version")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", hint: str = "") -> dict[str, Any]:
    """The checkpoint's dict, read with the safe unpickler (tensors and plain values only, no code runs); a file
    that is not a whole checkpoint (cut short, overwritten) or holds other objects is a user error naming it,
    followed by ``hint`` (what to do about it)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise UserError(f"{path}: not a readable checkpoint, the file is corrupt or cut short "
                            f"({_reason(err)}){hint}") from err
        found = unsafe_reason(err)
        raise UnsafePickle(f"{path}: refused: the file holds Python objects, not only tensors and plain values "
                           f"({found}); loading it could run code from it. vistrain writes no such file "
                           f"(a last checkpoint of an older vistrain held NumPy RNG state){hint}", found) from err
    except OSError:
        raise  # the file system's error (missing, no permission), not the file's content
    except Exception as err:  # the safe unpickler's parse errors on garbage: KeyError, IndexError, RuntimeError ...
        raise UserError(f"{path}: not a readable checkpoint, the file is corrupt or cut short ({_reason(err)}){hint}") \
            from err


class UnsafePickle(UserError):
    """A checkpoint the safe unpickler refused: it holds a Python object (``found``: the unpickler's words, e.g.
    "Unsupported global: GLOBAL argparse.Namespace"), which only the full unpickler, able to run code, reads."""

    def __init__(self, message: str, found: str):
        super().__init__(message)
        self.found = found


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].split(". ")[0][:160] if text else type(err).__name__


def unsafe_reason(err: BaseException) -> str:
    """What torch's safe unpickler refused ("Unsupported global: GLOBAL posix.system"), from its long message."""
    for line in str(err).splitlines():
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            if rest:
                return rest.split(" was not an allowed global")[0][:160]
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    idx = next((i for i, ln in enumerate(lines) if ln.startswith("WeightsUnpickler error")), None)
    return lines[idx + 1][:160] if idx is not None and idx + 1 < len(lines) else "a pickled object"


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values (NumPy's key array as a list), for the safe unpickler."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
