"""Device and precision choices, made once from the hardware and the config."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16" | "fp16" | "fp32"
    dtype: torch.dtype | None  # autocast dtype; None for fp32
    use_scaler: bool  # fp16 needs loss scaling; bf16 has fp32's range and does not


PRECISIONS = {
    "bf16": Precision("bf16", torch.bfloat16, False),
    "fp16": Precision("fp16", torch.float16, True),
    "fp32": Precision("fp32", None, False),
}


def pick_device(setting: str = "auto", local_rank: int | None = None) -> torch.device:
    """``local_rank``: this process's GPU under torchrun; the current device otherwise."""
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from vistrain.errors import UserError

            raise UserError("train.device: cuda was asked for but no CUDA GPU is visible; valid here: auto, cpu")
        return torch.device("cuda", torch.cuda.current_device() if local_rank is None else local_rank)
    return torch.device("cpu")


def pick_precision(amp: str, device: torch.device) -> Precision:
    """auto: bf16 on compute capability >= 8 (Ampere+), fp16 + grad scaler below, fp32 on the CPU."""
    if device.type != "cuda":
        return PRECISIONS["fp32"]  # CPU autocast is slower than fp32 for most convolutional nets
    if amp == "auto":
        return PRECISIONS["bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"]
    return PRECISIONS[amp]


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def configure_backends(device: torch.device) -> None:
    """TF32 matmuls on Ampere+ and cuDNN autotuning (inputs have one fixed size)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def auto_workers(setting: int | str, device: torch.device) -> int:
    """``train.num_workers: auto``: up to 8 workers on a GPU; on a CPU the workers would steal the
    cores the model trains on, so at most half of them."""
    if setting != "auto":
        return int(setting)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, max(cpus - 1, 0)) if device.type == "cuda" else min(4, cpus // 2)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
