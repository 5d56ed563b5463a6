"""Automatic batch size: the search on a model that runs "out of memory" above a batch size (CPU only)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vistrain.config.loader import load_config
from vistrain.engine.autobatch import find_batch_size, is_oom, resolve_batch_size, with_headroom
from vistrain.engine.device import PRECISIONS
from vistrain.errors import UserError

CPU = torch.device("cpu")
FP32 = PRECISIONS["fp32"]


class OOMAbove(nn.Module):
    """A tiny classifier that raises CUDA's out-of-memory error for batches above ``limit`` (a small GPU)."""

    def __init__(self, limit: int, n_classes: int = 3):
        super().__init__()
        self.limit, self.seen = limit, []
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} images")
        return self.net(x)


def search(limit: int, **kwargs: object) -> tuple[int, OOMAbove]:
    model = OOMAbove(limit)
    return find_batch_size(lambda: model, (16, 16), CPU, FP32, **kwargs), model


def test_simulated_oom_above_48_gives_a_batch_that_fits_with_headroom() -> None:
    batch, model = search(48)
    assert 0 < batch <= 48
    assert batch == 40  # 48 fitted -> 90% = 43 -> a multiple of 8
    assert 64 in model.seen and 48 in model.seen  # doubled past the limit, then bisected back to it
    assert max(b for b in model.seen if b <= 48) == 48


def test_start_too_big_halves_down() -> None:
    batch, model = search(5)
    assert 1 <= batch <= 5
    assert model.seen[0] == 8 and 4 in model.seen


def test_no_limit_returns_max_batch() -> None:
    batch, _ = search(10_000, max_batch=64)
    assert batch == 64


def test_not_even_one_fits_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"train\.batch_size: auto: not even a batch of 1"):
        search(0)


def test_other_errors_are_not_swallowed() -> None:
    class Broken(OOMAbove):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        find_batch_size(lambda: Broken(48), (8, 8), CPU, FP32)


def test_global_rng_is_left_as_it_was() -> None:
    model = OOMAbove(48)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    find_batch_size(lambda: model, (16, 16), CPU, FP32)
    assert torch.equal(before, torch.random.get_rng_state())


def test_headroom_and_oom_detection() -> None:
    assert with_headroom(48) == 40
    assert with_headroom(1000) == 896
    assert with_headroom(7) == 6
    assert with_headroom(1) == 1
    assert is_oom(torch.cuda.OutOfMemoryError("x"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("size mismatch"))


def test_resolve_on_cpu_uses_batch_size_cpu() -> None:
    cfg = load_config(None, overrides=["train.batch_size=auto", "train.batch_size_cpu=12"])
    batch, why = resolve_batch_size(cfg, CPU, FP32, n_classes=3)
    assert batch == 12 and "batch_size_cpu" in why


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpu_search_fits_and_frees_memory() -> None:
    import timm

    device = torch.device("cuda")
    precision = PRECISIONS["bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"]
    before = torch.cuda.memory_allocated(device)
    batch = find_batch_size(lambda: timm.create_model("resnet18", num_classes=10), (224, 224), device, precision,
                            max_batch=1024)
    assert 8 <= batch <= 1024 and batch % 8 == 0
    assert torch.cuda.memory_allocated(device) - before < 2**20  # model, optimizer and batches all released
