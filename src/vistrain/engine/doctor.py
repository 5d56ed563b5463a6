"""``vistrain doctor``: what this machine offers a training run, and what would slow or stop one.

One table: Python, torch, CUDA and cuDNN versions, each GPU (memory, compute capability), the precision
and TF32 setting training would use, DataLoader workers, compute threads, CPUs and the size of ``/dev/shm``, then the
warnings. With ``--auto-batch`` and a config, also the batch size ``train.batch_size: auto`` would pick.
Nothing here changes the machine; every probe that can fail is guarded, so the doctor itself never crashes
on a broken set-up (that is when it is needed most).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from vistrain.config.schema import Config
from vistrain.engine import device as dev
from vistrain.errors import UserError

SHM_MIN_BYTES = 1 << 30  # below 1 GiB, DataLoader workers fail with "bus error" on real image batches
GIB = 1 << 30


def run_doctor(cfg: Config | None, auto_batch: bool = False, echo: bool = True) -> dict[str, Any]:
    """Probe the machine (for ``cfg`` when given), print the table (``echo``), return the findings as a dict."""
    if auto_batch and cfg is None:
        raise UserError("--auto-batch: needs --config (the model and image size to try)")
    warnings: list[str] = []
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,  # the CUDA torch was built for; None for a CPU-only build
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "driver": _driver(),
        "gpus": _gpus(warnings),
    }
    device = _device(cfg, warnings)
    t = cfg.train if cfg is not None else None
    precision = dev.pick_precision(t.amp if t else "auto", device)
    cached = cfg is None or cfg.data.cache != "off"  # the default data.cache (auto) always caches
    workers = dev.auto_workers(t.num_workers if t else "auto", device, cached)
    threads, threads_why = dev.resolve_num_threads(t.num_threads if t else "auto", workers)
    info.update(
        device=str(device),
        precision=precision.name,
        tf32=_tf32(device),
        num_workers=workers,
        num_workers_why=dev.workers_reason(t.num_workers if t else "auto", device, cached),
        num_threads=threads,
        num_threads_why=threads_why,
        cpu_count=os.cpu_count(),
        cpus_usable=dev.usable_cores(),
        shm_bytes=_shm_bytes(),
    )
    _check(info, warnings)
    crowded = dev.oversubscription(threads, workers)
    if crowded:
        warnings.append(crowded)
    if auto_batch and cfg is not None:
        info["auto_batch"] = _auto_batch(cfg, device, precision)
    info["warnings"] = warnings
    if echo:
        print(format_table(info))
    return info


def _device(cfg: Config | None, warnings: list[str]) -> torch.device:
    """The device a run of ``cfg`` would use; a config asking for a missing GPU is a warning here."""
    try:
        return dev.pick_device(cfg.train.device if cfg is not None else "auto")
    except UserError as err:
        warnings.append(str(err))
        return torch.device("cpu")


def _gpus(warnings: list[str]) -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        try:
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            gpus.append({"index": i, "name": props.name, "memory_total_MiB": round(total / 2**20),
                         "memory_used_MiB": round((total - free) / 2**20),
                         "compute_capability": f"{props.major}.{props.minor}"})
        except RuntimeError as err:  # a GPU that is visible but unusable (busy, fallen off the bus, ...)
            warnings.append(f"GPU {i}: cannot be queried: {str(err).splitlines()[0]}")
    return gpus


def _driver() -> dict[str, str] | None:
    """Driver version and the newest CUDA it supports, from nvidia-smi when it is installed."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=15).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = {k: re.search(rf"{k}:\s*([\d.]+)", out) for k in ("Driver Version", "CUDA Version")}
    return {k.split()[0].lower(): m.group(1) for k, m in found.items() if m} or None


def _tf32(device: torch.device) -> bool:
    """Training turns TF32 on for CUDA (``configure_backends``); it only takes effect on Ampere or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def _shm_bytes() -> int | None:
    try:
        return shutil.disk_usage("/dev/shm").total
    except OSError:  # no /dev/shm (macOS, Windows): workers use other shared memory there
        return None


def _version(text: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text or ""))[:2]


def _check(info: dict[str, Any], warnings: list[str]) -> None:
    """Warnings a user should act on before a long run."""
    driver = info["driver"] or {}
    if not info["gpus"]:
        why = "torch was built without CUDA" if info["cuda"] is None else "no CUDA GPU is visible"
        if info["cuda"] and driver:
            why = "a driver is installed but CUDA cannot start (a driver older than torch's CUDA, or no device)"
        warnings.append(f"no GPU: training will run on the CPU ({why})")
    if info["cuda"] and driver.get("cuda") and _version(driver["cuda"]) < _version(info["cuda"]):
        warnings.append(f"old driver: {driver.get('driver', '?')} supports CUDA {driver['cuda']} but torch was built "
                        f"for CUDA {info['cuda']}; update the NVIDIA driver")
    for gpu in info["gpus"]:
        if gpu["memory_used_MiB"] > 0.5 * gpu["memory_total_MiB"]:
            warnings.append(f"GPU {gpu['index']}: {gpu['memory_used_MiB']} of {gpu['memory_total_MiB']} MiB already "
                            "in use by other processes")
    shm = info["shm_bytes"]
    if shm is not None and shm < SHM_MIN_BYTES:
        warnings.append(f"/dev/shm is {shm / 2**20:.0f} MiB: DataLoader workers pass batches through it and can "
                        "fail with 'bus error'; give the container more (docker run --shm-size=8g) or set "
                        "train.num_workers=0")


def _auto_batch(cfg: Config, device: torch.device, precision: dev.Precision) -> dict[str, Any]:
    from vistrain.engine.autobatch import resolve_batch_size

    dev.configure_backends(device)  # the search must see the same cuDNN / TF32 settings as training
    batch, why = resolve_batch_size(cfg, device, precision, _n_classes(cfg))
    return {"batch_size": batch, "why": why, "model": cfg.model.name, "img_size": cfg.train.img_size}


def _n_classes(cfg: Config) -> int:
    """The class count from the config or a cheap look at the data; only the head's size depends on it."""
    d = cfg.data
    if d.class_names:
        return len(d.class_names)
    try:
        if d.source == "folders" and d.image_dir_train is not None:
            return max(2, sum(1 for p in Path(d.image_dir_train).iterdir() if p.is_dir()))
        if d.train_csv is not None:
            import pandas as pd

            return max(2, int(pd.read_csv(d.train_csv, usecols=[d.target_col])[d.target_col].nunique()))
    except (OSError, ValueError):
        pass
    return 2


def format_table(info: dict[str, Any]) -> str:
    """The findings as aligned ``name  value`` lines, then the warnings."""
    rows: list[tuple[str, str]] = [
        ("Python", info["python"]), ("torch", info["torch"]),
        ("CUDA (torch build)", info["cuda"] or "none (CPU-only build)"),
        ("cuDNN", str(info["cudnn"]) if info["cudnn"] else "none"),
    ]
    driver = info["driver"]
    if driver:
        rows.append(("NVIDIA driver", f"{driver.get('driver', '?')} (supports CUDA <= {driver.get('cuda', '?')})"))
    for g in info["gpus"]:
        rows.append((f"GPU {g['index']}", f"{g['name']} | {g['memory_used_MiB']}/{g['memory_total_MiB']} MiB used | "
                                          f"compute {g['compute_capability']}"))
    if not info["gpus"]:
        rows.append(("GPU", "none"))
    shm = info["shm_bytes"]
    rows += [
        ("device", info["device"]), ("precision", info["precision"]), ("TF32", "on" if info["tf32"] else "off"),
        ("num_workers", f"{info['num_workers']} ({info['num_workers_why']})"),
        ("num_threads", f"{info['num_threads']} ({info['num_threads_why']})"),
        ("CPUs", f"{info['cpus_usable']} usable of {info['cpu_count']}"),
        ("/dev/shm", "n/a" if shm is None else f"{shm / GIB:.1f} GiB"),
    ]
    if "auto_batch" in info:
        a = info["auto_batch"]
        rows.append(("auto batch size", f"{a['batch_size']} for {a['model']} at {a['img_size']} px ({a['why']})"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines += [f"WARNING: {w}" for w in info["warnings"]] or ["no warnings"]
    return "\n".join(lines)
