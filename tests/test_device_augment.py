"""augment.device: the Kornia policy on uint8 batches draws what the CPU policy (torchvision on PIL) draws: per
operation, on a fixed seed, the output statistics of the two match within tolerance (on CPU tensors here; on CUDA
in the ``gpu`` test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vistrain.config.schema import AugmentCfg
from vistrain.data.device_augment import DeviceAugment, device_ops
from vistrain.data.preprocess import Preprocessor
from vistrain.data.transforms import TrainTransform, augment_ops, to_uint8_tensor

pytest.importorskip("kornia")

AUG = AugmentCfg(policy="hard", hflip=0.5, vflip=0.5, rotate=20, color_jitter=0.4)
HW = (32, 32)
N = 1024  # the whole policy's statistics vary by about 0.01 (pixel mean) between seeds at this size
PER_OP = 384


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> object:
    """Per-sample CPU transforms and small Kornia batches run fastest on one thread (test processes share cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """N textured pictures uint8 [N, 40, 40, 3]: gradients, stripes and colour that every operation changes."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:40].astype(np.float64)
    out = []
    for _ in range(N):
        base = rng.uniform(30, 220, 3)
        img = base + 50 * np.sin(xx[..., None] / rng.uniform(2, 8)) + 2 * yy[..., None] - 40
        out.append(np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def stats(out: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Mean and spread of the pixels, each channel's mean, and how much the operation changed the picture."""
    return {"mean": out.mean().item(), "std": out.std().item(),
            **{f"mean_c{c}": out[:, c].mean().item() for c in range(3)},
            "change": (out - reference).abs().mean().item(),
            "row_asym": (out[..., :16] - out[..., 16:].flip(-1)).mean().item()}


def cpu_apply(op: object, images: np.ndarray) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(op(Image.fromarray(x)))).permute(2, 0, 1) for x in images]
                       ).float() / 255


@pytest.mark.parametrize("index", range(6), ids=["crop", "hflip", "vflip", "affine", "color_jitter", "blur"])
def test_each_operation_matches_its_cpu_twin(pixels: np.ndarray, index: int) -> None:
    cpu_ops, dev_ops = augment_ops(AUG, HW), device_ops(AUG, HW)
    assert len(cpu_ops) == len(dev_ops) == 6
    # every op after the crop sees the crop's output size, as in the policy; one op alone varies less: 384 images
    source = pixels[:PER_OP] if index == 0 else pixels[:PER_OP, 4:36, 4:36]
    torch.manual_seed(0)
    cpu = cpu_apply(cpu_ops[index], source)
    torch.manual_seed(0)
    dev = dev_ops[index](torch.from_numpy(source).permute(0, 3, 1, 2).float() / 255).clamp(0, 1)
    assert cpu.shape == dev.shape == (PER_OP, 3, *HW)
    ref = (torch.nn.functional.interpolate(torch.from_numpy(source).permute(0, 3, 1, 2).float() / 255, size=HW,
                                           mode="bilinear", antialias=True))
    a, b = stats(cpu, ref), stats(dev, ref)
    for key in a:
        tol = 0.08 * max(abs(a[key]), 0.05) + 0.01
        assert abs(a[key] - b[key]) <= tol, (key, a, b)


def test_the_whole_policy_matches_the_cpu_transform(pixels: np.ndarray) -> None:
    pre = Preprocessor(size=HW)
    torch.manual_seed(0)
    cpu = torch.stack([TrainTransform(AUG, pre)(x) for x in pixels])
    torch.manual_seed(0)
    batch = torch.stack([to_uint8_tensor(x) for x in pixels])
    assert batch.dtype == torch.uint8 and batch.shape == (N, 3, 40, 40)
    dev = DeviceAugment(AUG, pre)(batch)
    assert dev.dtype == torch.float32 and dev.shape == cpu.shape == (N, 3, *HW)
    for fn in (torch.mean, torch.std):
        assert fn(dev).item() == pytest.approx(fn(cpu).item(), abs=0.05 + 0.05 * abs(fn(cpu).item()))
    erased_cpu = (cpu == 0).all(dim=1).float().mean().item()  # erased pixels are exactly 0 after normalising
    erased_dev = (dev == 0).all(dim=1).float().mean().item()
    assert erased_dev == pytest.approx(erased_cpu, abs=0.02) and erased_cpu > 0.01


def test_no_augmentation_is_only_the_normalisation(pixels: np.ndarray) -> None:
    pre = Preprocessor(size=(40, 40))
    batch = torch.stack([to_uint8_tensor(x) for x in pixels[:4]])
    out = DeviceAugment(AugmentCfg(policy="none"), pre)(batch)
    assert torch.allclose(out, torch.stack([pre.normalize(x) for x in pixels[:4]]), atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_policy_matches_its_cpu_twin(pixels: np.ndarray) -> None:
    pre = Preprocessor(size=HW)
    torch.manual_seed(0)
    cpu = torch.stack([TrainTransform(AUG, pre)(x) for x in pixels])
    batch = torch.stack([to_uint8_tensor(x) for x in pixels]).cuda()
    dev = DeviceAugment(AUG, pre).cuda()(batch).cpu()
    for fn in (torch.mean, torch.std):
        assert fn(dev).item() == pytest.approx(fn(cpu).item(), abs=0.05 + 0.05 * abs(fn(cpu).item()))


def test_the_loop_augments_uint8_batches_with_the_device_policy() -> None:
    """LoopOptions.batch_transform: the loader's uint8 batches reach the model augmented and normalised."""
    from vistrain.engine.device import pick_precision
    from vistrain.engine.loop import LoopOptions, TrainState, train_one_epoch

    cpu = torch.device("cpu")
    seen: list[torch.Tensor] = []

    class Task:
        def training_loss(self, model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple:
            seen.append(images)
            return torch.nn.functional.cross_entropy(model(images), targets), {}

    class Scheduler:
        def step_update(self, num_updates: int) -> None: ...

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    state = TrainState(model, optimizer, Scheduler(), torch.amp.GradScaler("cpu", enabled=False), seed=0)
    batches = [(torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), None)] * 2
    augment = DeviceAugment(AUG, Preprocessor(size=HW))
    opts = LoopOptions(cpu, pick_precision("fp32", cpu), log_interval=0, batch_transform=augment)
    train_one_epoch(state, Task(), batches, opts)
    assert len(seen) == 2 and all(x.dtype == torch.float32 and x.shape == (4, 3, *HW) for x in seen)
    assert not torch.equal(seen[0], seen[1])  # the same uint8 batch drew other augmentations


def test_augment_device_cuda_without_a_gpu_is_a_user_error(tmp_path: Path) -> None:
    from conftest import tiny_config, write_csv_dataset

    from vistrain.config.loader import validate
    from vistrain.errors import UserError
    from vistrain.pipelines.train import run_train

    root = write_csv_dataset(tmp_path / "data", per_class=4).root
    raw = tiny_config(root, augment={"policy": "light", "device": "cuda"},
                      output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None})
    with pytest.raises(UserError, match=r"^augment.device: cuda needs training on a GPU; train.device resolved to "
                                        r"cpu \(valid here: auto, cpu\)$"):
        run_train(validate(raw))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_run_augments_on_the_device(tmp_path: Path) -> None:
    import yaml
    from conftest import read_metrics, tiny_config, write_csv_dataset

    from vistrain.config.loader import validate
    from vistrain.pipelines.train import run_train

    root = write_csv_dataset(tmp_path / "data", per_class=8).root
    raw = tiny_config(root, augment={"policy": "hard"}, train={"device": "cuda", "epochs": 2},
                      output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None})
    run = run_train(validate(raw)).run_dir
    assert yaml.safe_load((run / "config.yaml").read_text())["augment"]["device"] == "cuda"
    assert all(r["img_per_s"] > 0 for r in read_metrics(run))
