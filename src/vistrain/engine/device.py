"""Device and precision choices, made once from the hardware and the config."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
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


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's limit), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# With the decode-once cache a worker only augments stored pixels: measured on 2 cores, resnet10t @ 64 px (about the
# cheapest timm network) spends ~13 ms per image in a 1-thread training step, the light policy ~0.4 ms (the hard one
# ~0.6 ms) per cached image. Loading in the training process between steps then costs a few % of the step per compute
# core, less than a worker's process takes from the cores; one worker feeds this many cores' compute.
CORES_PER_CACHED_WORKER = 8
OVERSUBSCRIBED = 1.5  # the 1-minute load average above this many times the machine's cores: warn


def auto_workers(setting: int | str, device: torch.device, cached: bool = False) -> int:
    """``train.num_workers: auto`` (see ``workers_reason``)."""
    return _workers(setting, device, cached)[0]


def workers_reason(setting: int | str, device: torch.device, cached: bool = False) -> str:
    """Why ``auto_workers`` chose its count, for the log."""
    return _workers(setting, device, cached)[1]


def _workers(setting: int | str, device: torch.device, cached: bool) -> tuple[int, str]:
    """A GPU: up to 8 workers (the device must never wait). A CPU: the workers take cores from the training step.
    Decoding every epoch (``cached`` False) is slow enough to give it half the cores (at most 4); with the
    decode-once cache (``cached``) a worker would only augment, so the training process loads between steps and
    every core computes, until a machine has ``CORES_PER_CACHED_WORKER`` cores per worker. Measured on 2 idle cores
    with a memory cache (1,000 JPEGs, resnet10t @ 64): 1 worker + 1 thread 33 s, 0 workers + 2 threads 22 s."""
    if setting != "auto":
        return int(setting), "set in the config"
    cpus = usable_cores()
    if device.type == "cuda":
        return min(8, max(cpus - 1, 0)), f"auto: training on a GPU: {cpus} usable cores - 1, at most 8"
    if cached:
        n = min(4, cpus // CORES_PER_CACHED_WORKER)
        return n, (f"auto: the cache holds decoded pixels, so loading is augmentation alone: on {cpus} usable cores "
                   + ("the training process loads between steps and every core computes" if n == 0 else
                      f"1 worker per {CORES_PER_CACHED_WORKER} cores"))
    return min(4, cpus // 2), f"auto: data.cache off decodes every image every epoch: half of {cpus} usable cores"


def resolve_num_threads(setting: int | str, workers: int) -> tuple[int, str]:
    """``train.num_threads``: a number as given; auto: ``$OMP_NUM_THREADS`` when the environment sets it (the
    user's or a scheduler's choice), else the usable cores left after ``workers`` DataLoader processes (shared
    with the other processes of a torchrun on this machine), at least 1. Returns the count and why, for the log."""
    if setting != "auto":
        return int(setting), "set in the config"
    env = env_threads()
    if env is not None:
        return env, f"auto: OMP_NUM_THREADS={env}"
    cores, local = usable_cores(), int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    share = f"{cores} usable cores" if local <= 1 else f"{cores} usable cores / {local} processes"
    why = f"auto: {share} - {workers} loader workers"
    busy = busy_cores() // max(local, 1)
    if busy:
        why += f" - {busy} kept busy by other processes"
    return max(cores // max(local, 1) - workers - busy, 1), why


@functools.cache
def busy_cores(window_s: float = 0.25) -> int:
    """How many of this process's usable cores other processes keep busy right now: their non-idle share over a
    short window (this process sleeps through it) from the per-CPU counters of /proc/stat; 0 where unreadable.

    Measured once per process. Why: an OpenMP thread that has to share its core spins at every barrier, so on a
    2-core machine with one core busy, 2 threads trained the demo in 170 s and 1 thread in 93 s (68 s vs 97 s on
    an idle machine, where the second thread pays off)."""
    cpus = {f"cpu{i}" for i in (os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else ())}

    def sample() -> tuple[int, int]:
        total = idle = 0
        with open("/proc/stat", encoding="ascii") as fh:
            for line in fh:
                name, *fields = line.split()
                if name in cpus:
                    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                    total += sum(ticks)
                    idle += ticks[3] + ticks[4]
        return total, idle

    try:
        t0, i0 = sample()
        time.sleep(window_s)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return 0
    if t1 <= t0:
        return 0
    return int(round((1 - (i1 - i0) / (t1 - t0)) * len(cpus)))


def oversubscription(threads: int, workers: int) -> str | None:
    """A warning when the machine is oversubscribed: its 1-minute load average (every process, this one's recent
    work included) above ``OVERSUBSCRIBED`` times its cores; None otherwise or where the load cannot be read. Why:
    compute threads that must wait for a core spin at every barrier; 2 threads forced on 2 loaded cores trained
    10x slower than on idle ones."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = os.cpu_count() or 1
    if load <= OVERSUBSCRIBED * cores:
        return None
    return (f"the machine is oversubscribed: load average {load:.1f} on {cores} cores; this run's {threads} compute "
            f"thread(s) and {workers} loader worker(s) wait for cores, so it will be several times slower than on an "
            "idle machine (train.num_threads: auto leaves out the cores other processes keep busy)")


def env_threads() -> int | None:
    """``$OMP_NUM_THREADS`` when it is set to a positive count."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(env) if env.isdigit() and int(env) > 0 else None


def apply_num_threads(setting: int | str, workers: int) -> int:
    """Resolve ``train.num_threads`` (see ``resolve_num_threads``) and set it for this process; returns the count,
    which an onnxruntime session should be given too (``SessionOptions.intra_op_num_threads``)."""
    n, _ = resolve_num_threads(setting, workers)
    set_num_threads(n)
    return n


def set_num_threads(n: int) -> None:
    """``n`` compute threads for torch, the OpenMP/BLAS libraries loaded (NumPy's, scikit-learn's) and OpenCV.
    Oversubscribed OpenMP threads spin while they wait for a core: an epoch can take several times longer."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # torch allows it once, before the first parallel work
        torch.set_num_interop_threads(n)
    threadpool_limits(limits=n)  # applied at once, for the libraries loaded so far
    try:
        import cv2  # not a dependency; albumentations and user transforms bring it
    except ImportError:
        return
    cv2.setNumThreads(n)


@contextlib.contextmanager
def pinned_threads(n: int) -> Iterator[None]:
    """A block that runs with ``n`` threads (torch and the OpenMP/BLAS pools), then the process's setting back."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
