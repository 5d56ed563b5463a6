"""``train.batch_size: auto``: the largest batch that really trains in the device's memory, with head-room.

The only reliable answer to "does batch B fit?" is to try it: activation memory depends on the model, the
image size, the precision, the memory format and cuDNN's algorithm choices, none of which a formula knows.
So ``find_batch_size`` runs real forward / backward / optimiser steps, doubling the batch until the device
runs out of memory, then bisects between the last batch that fitted and the first that did not, and keeps
head-room for what a real run adds (data-loader pinned buffers, fragmentation over many steps, the
evaluation pass). An out-of-memory error is caught and its memory freed, so the search ends with the
device as clean as it started.

Everything CUDA-specific is guarded by ``device.type``, so the search also runs on a CPU: there it only
stops at ``max_batch`` or where the model raises ``torch.cuda.OutOfMemoryError`` (which is how the
tests simulate a small GPU).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vistrain.engine.device import Precision, autocast
from vistrain.errors import UserError

if TYPE_CHECKING:  # annotations only: importing the schema here would be a cycle for no benefit
    from vistrain.config.schema import Config

log = logging.getLogger(__name__)

START_BATCH = 8  # small enough to fit almost anywhere, large enough that doubling reaches big GPUs fast
MAX_BATCH = 4096  # beyond this the batch size is no longer limited by memory but by generalisation
HEADROOM = 0.9  # keep 10% of the largest batch that fitted free for what a real run adds
STEPS_PER_TRY = 2  # the second step is the steady state: optimiser moments exist from the first one


def is_oom(err: BaseException) -> bool:
    """True for an out-of-memory error of any accelerator (torch raises a few kinds)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    # cuDNN / cuBLAS allocation failures and older torch versions raise a plain RuntimeError.
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def free_memory(device: torch.device) -> None:
    """Return cached blocks to the device after an out-of-memory error or at the end of the search.

    Only CUDA keeps freed blocks in a cache, and only there is the (slow, ~0.5 s) full garbage collection
    worth it: a reference cycle may still hold a batch's activations.
    """
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


class _Trainer:
    """One model and optimiser, kept across tries so each try measures the steady state of training."""

    def __init__(self, model: nn.Module, img_size_hw: tuple[int, int], device: torch.device, precision: Precision,
                 channels_last: bool, n_classes: int | None):
        self.model = model.to(device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.train()
        # AdamW keeps two moments per weight: the most memory any of train.optimizer's choices needs.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-6)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
        self.hw, self.device, self.precision = img_size_hw, device, precision
        self.channels_last, self.n_classes = channels_last, n_classes

    def release(self) -> None:
        """Drop the model and optimiser so the training run that follows gets their memory back."""
        del self.model, self.optimizer, self.scaler
        free_memory(self.device)

    def step(self, batch: int) -> None:
        """One forward / backward / optimiser step on random data of ``batch`` images."""
        images = torch.randn(batch, 3, *self.hw, device=self.device)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            logits = self.model(images)
        n_classes = self.n_classes or logits.shape[-1]
        targets = torch.randint(0, n_classes, (batch,), device=self.device)
        loss = F.cross_entropy(logits.float(), targets)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # an asynchronous OOM must surface inside this try

    def fits(self, batch: int) -> bool:
        """Whether ``batch`` trains; an out-of-memory error is caught and its memory released."""
        out_of_memory = False
        try:
            for _ in range(STEPS_PER_TRY):
                self.step(batch)
        except Exception as err:  # noqa: BLE001 - only OOM is an answer; anything else is re-raised
            if not is_oom(err):
                raise
            out_of_memory = True
        # Freed only here, outside the except block: until it ends, the exception's traceback keeps the
        # failed step's frames, and with them its activations, alive.
        if out_of_memory:
            self.optimizer.zero_grad(set_to_none=True)
            # An OOM inside scaler.step() would leave the scaler believing its gradients are unscaled.
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.use_scaler)
            free_memory(self.device)
        log.debug("[AUTOBATCH] batch %d: %s", batch, "out of memory" if out_of_memory else "fits")
        return not out_of_memory


def with_headroom(batch: int, headroom: float = HEADROOM) -> int:
    """``batch`` scaled by ``headroom``, then down to a multiple of 8 (tensor-core friendly) when >= 8."""
    kept = max(1, int(batch * headroom))
    return kept // 8 * 8 if kept >= 8 else kept


def _bracket(fits: Callable[[int], bool], start: int, max_batch: int) -> tuple[int, int | None]:
    """Double from ``start``: (largest batch that fitted, first that did not or None). 0 fitted -> (0, b)."""
    batch = min(start, max_batch)
    if not fits(batch):
        # Even the start is too big: halve down to 1 instead.
        while batch > 1:
            bad, batch = batch, batch // 2
            if fits(batch):
                return batch, bad
        return 0, 1
    good = batch
    while good < max_batch:
        batch = min(good * 2, max_batch)
        if not fits(batch):
            return good, batch
        good = batch
    return good, None


def _bisect(fits: Callable[[int], bool], good: int, bad: int) -> int:
    """Largest batch in [good, bad) that fits, to within ~3% (the head-room makes more precision moot)."""
    while bad - good > max(1, good // 32):
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def find_batch_size(model_factory: Callable[[], nn.Module], img_size_hw: tuple[int, int], device: torch.device,
                    precision: Precision, channels_last: bool = False, start: int = START_BATCH,
                    max_batch: int = MAX_BATCH, headroom: float = HEADROOM, n_classes: int | None = None) -> int:
    """The training batch size for this model, image size, precision and device.

    ``model_factory()`` builds a fresh model (on the CPU; it is moved here). Batches are tried with real
    training steps: doubled from ``start`` until out of memory, then bisected. The largest batch that fitted
    is reduced by ``headroom`` and to a multiple of 8. When even ``max_batch`` fits, memory is not the limit
    and ``max_batch`` is returned as is. ``n_classes`` sets the targets' range (default: the model's outputs).
    A batch of 1 that does not fit is a ``UserError``. The global RNG is left as it was.
    """
    if start < 1 or max_batch < 1:
        raise ValueError(f"start and max_batch must be positive; got {start}, {max_batch}")
    if device.type != "cuda":
        log.info("[AUTOBATCH] %s has no memory limit to find; only max_batch=%d or an out-of-memory error stops",
                 device, max_batch)
    # Random weights and batches must not shift the seeded run that follows.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        trainer = _Trainer(model_factory(), img_size_hw, device, precision, channels_last, n_classes)
        tried: dict[int, bool] = {}

        def fits(batch: int) -> bool:
            tried[batch] = trainer.fits(batch)
            return tried[batch]

        try:
            good, bad = _bracket(fits, start, max_batch)
            if good and bad is not None:
                good = _bisect(fits, good, bad)
        finally:
            trainer.release()
    return _conclude(good, bad, tried, img_size_hw, precision, headroom)


def _conclude(good: int, bad: int | None, tried: dict[int, bool], img_size_hw: tuple[int, int],
              precision: Precision, headroom: float) -> int:
    """Log the search and turn its outcome into the batch size (or a one-line error)."""
    trace = " ".join(f"{b}{'ok' if ok else 'x'}" for b, ok in tried.items())
    if good == 0:
        raise UserError(f"train.batch_size: auto: not even a batch of 1 fits in memory at train.img_size="
                        f"{list(img_size_hw)} and precision {precision.name}; use a smaller train.img_size or "
                        "model, or train.amp=bf16/fp16")
    batch = good if bad is None else with_headroom(good, headroom)
    log.info("[AUTOBATCH] tried %s -> largest that fitted %d%s -> batch_size %d", trace, good,
             " (no limit reached)" if bad is None else f", {headroom:.0%} head-room", batch)
    return batch


def resolve_batch_size(cfg: Config, device: torch.device, precision: Precision, n_classes: int
                       ) -> tuple[int, str]:
    """What ``train.batch_size: auto`` resolves to for ``cfg`` on ``device``: (batch size, why).

    On a CPU it is ``train.batch_size_cpu``: host memory is not what limits a CPU run, its speed is, and
    the search would only stop at ``max_batch`` after minutes of huge batches.
    """
    t = cfg.train
    if device.type != "cuda":
        return t.batch_size_cpu, "train.batch_size_cpu: the memory search needs a GPU"
    from vistrain.data.preprocess import size_hw
    from vistrain.models.build import build_model

    batch = find_batch_size(lambda: build_model(cfg.task, cfg.model, n_classes, pretrained=False),
                            size_hw(t.img_size), device, precision, channels_last=t.channels_last is True,
                            n_classes=n_classes)
    if cfg.augment.splits:  # the model sees each image as augment.splits views: K·B inputs per batch
        return max(1, batch // cfg.augment.splits), (f"largest batch that trained within GPU memory, with head-room, "
                                                     f"divided by augment.splits={cfg.augment.splits}")
    return batch, "largest batch that trained within GPU memory, with head-room"
