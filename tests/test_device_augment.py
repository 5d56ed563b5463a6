"""augment.device: the Kornia policy on uint8 batches draws what the CPU policy (torchvision on PIL) draws: per
operation, and for every ``augment`` key set away from its default, on a fixed seed, the output statistics of the
two match within tolerance (on CPU tensors here; on CUDA in the ``gpu`` tests)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vistrain.config.bundled import bundled_config
from vistrain.config.schema import AugmentCfg
from vistrain.data.device_augment import DeviceAugment, device_ops, device_supports
from vistrain.data.preprocess import Preprocessor
from vistrain.data.transforms import TrainTransform, augment_ops, to_uint8_tensor

pytest.importorskip("kornia")

AUG = AugmentCfg(policy="hard", hflip=0.5, vflip=0.5, rotate=20, color_jitter=0.4, hue=0.1)
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


# Every key of the CPU policy (TrainTransform) with a value away from its default, one case each, then the combinations
# that matter: hue without colour jitter, and the pills recipe's policy (hue 0.1). The remaining keys act on whole
# batches inside ClassificationTask, after either policy (mixup / cutmix), pick the path itself (device) or the
# sampling (repeats), or have no device twin yet (CPU_ONLY_CASES: the device policy falls back to the CPU); a new
# augment key must land in one of them, or this file fails.
LOOP_KEYS = {"device", "mixup_alpha", "cutmix_alpha", "mix_prob", "mix_switch_prob", "repeats"}  # splits: CPU_ONLY
# Each case names the key device_supports must report; a key given its Kornia twin moves to KEY_CASES.
CPU_ONLY_CASES = [("auto", {"auto": "rand-m9-mstd0.5-inc1"}), ("crop", {"crop": "rrc"}), ("crop", {"crop": "pad_crop"}),
                  ("crop", {"crop": "none", "policy": "hard"}),
                  ("erasing_mode", {"erasing_mode": "rand", "random_erasing": 0.5}),
                  ("erasing_count", {"erasing_count": 2, "random_erasing": 0.5}), ("splits", {"splits": 3}),
                  ("albumentations", {"albumentations": "pipeline.yaml"})]
WITHIN_CROP = {"scale", "ratio", "pad"}  # read only by crop: rrc / pad_crop, which have no twin yet
KEY_CASES = [{"policy": "none"}, {"policy": "hard"}, {"hflip": 1.0}, {"vflip": 0.5}, {"rotate": 45.0},
             {"color_jitter": 0.5}, {"hue": 0.1}, {"random_erasing": 0.5}]
PILLS = {k: v for k, v in yaml.safe_load(bundled_config("pill_efficientnetv2s.yaml").read_text())["augment"].items()
         if k not in LOOP_KEYS}
CASES = [*KEY_CASES, {"color_jitter": 0.0, "hue": 0.1}, PILLS]
CASE_IDS = [*(",".join(f"{k}={v}" for k, v in case.items()) for case in CASES[:-1]), "pills"]
# Per statistic: CPU and device may differ by this much at N images on one seed (about 4x the spread between seeds
# measured for either policy; the CPU policy also runs about 0.005 darker: PIL truncates to 8 bits after each
# colour step, Kornia stays in float).
TOL = {"mean": 0.015, "std": 0.01, "change": 0.012, "bright": 0.012, "lr_asym": 0.025, "tb_asym": 0.02,
       "orient": 0.05, "hue_shift": 0.005, "chroma": 0.03, "erased": 0.01}


def test_every_augment_key_is_in_the_parity_test() -> None:
    cpu_only = {key for key, _ in CPU_ONLY_CASES} | WITHIN_CROP
    assert {key for case in KEY_CASES for key in case} | LOOP_KEYS | cpu_only == set(AugmentCfg.model_fields)
    assert all(len(case) == 1 and getattr(AugmentCfg(), k) != v for case in KEY_CASES for k, v in case.items())
    assert PILLS["hue"] > 0


def _hue(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hue angle in radians, chroma) of each picture's mean colour [N, 3, H, W] -> [N], [N]."""
    r, g, b = x.mean(dim=(2, 3)).unbind(1)
    a, c = r - (g + b) / 2, math.sqrt(3) / 2 * (g - b)
    return torch.atan2(c, a), torch.hypot(a, c)


def policy_stats(out: torch.Tensor, source: torch.Tensor, pre: Preprocessor) -> dict[str, float]:
    """Statistics of normalised policy outputs [N, 3, H, W] against their sources [N, 3, H, W] in [0, 1], each one
    moved by some key: brightness and spread (policy, color_jitter), per-picture brightness change (color_jitter),
    left-right and top-bottom asymmetry (hflip, vflip), stripe orientation (rotate), rotation of the mean colour's
    hue (hue), chroma (color_jitter), erased pixels (random_erasing, the hard policy)."""
    erased = (out == 0).all(dim=1).float().mean().item()  # erased pixels are exactly 0 after normalising
    x = out * torch.tensor(pre.std).view(1, 3, 1, 1) + torch.tensor(pre.mean).view(1, 3, 1, 1)
    (hue, chroma), (hue0, chroma0) = _hue(x), _hue(source)
    turn = torch.remainder(hue - hue0 + math.pi, 2 * math.pi) - math.pi
    grey = x.mean(1)
    gx, gy = (grey.diff(dim=2) ** 2).sum((1, 2)), (grey.diff(dim=1) ** 2).sum((1, 2))
    return {"mean": x.mean().item(), "std": x.std().item(), "change": (x - source).abs().mean().item(),
            "bright": (x.mean((1, 2, 3)) - source.mean((1, 2, 3))).std().item(),
            "lr_asym": (x[..., :16] - x[..., 16:].flip(-1)).mean().item(),
            "tb_asym": (x[..., :16, :] - x[..., 16:, :].flip(-2)).mean().item(),
            "orient": ((gx - gy) / (gx + gy)).mean().item(), "hue_shift": (turn.abs() / (2 * math.pi)).mean().item(),
            "chroma": (chroma / chroma0).mean().item(), "erased": erased}


class KeyParity:
    """One key's CPU and device outputs on the same N pictures at the training size, seed 0 for both; the device
    policy gets batches of 64, as the loop does (Kornia draws one colour-step order per batch)."""

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels[:, 4:36, 4:36]
        self.pre = Preprocessor(size=HW)
        self.source = torch.from_numpy(self.pixels).permute(0, 3, 1, 2).float() / 255
        self.batch = torch.stack([to_uint8_tensor(x) for x in self.pixels])

    def cpu(self, aug: AugmentCfg) -> dict[str, float]:
        torch.manual_seed(0)
        transform = TrainTransform(aug, self.pre)
        return policy_stats(torch.stack([transform(x) for x in self.pixels]), self.source, self.pre)

    def device(self, aug: AugmentCfg, device: str = "cpu") -> dict[str, float]:
        torch.manual_seed(0)
        augment = DeviceAugment(aug, self.pre).to(device)
        out = torch.cat([augment(b.to(device)).cpu() for b in self.batch.split(64)])
        return policy_stats(out, self.source, self.pre)


@pytest.fixture(scope="module")
def parity(pixels: np.ndarray) -> KeyParity:
    return KeyParity(pixels)


@pytest.fixture(scope="module")
def default_cpu(parity: KeyParity) -> dict[str, float]:
    return parity.cpu(AugmentCfg())


def assert_key_parity(keys: str, cpu: dict[str, float], dev: dict[str, float], default: dict[str, float]) -> None:
    # the statistics can see the key: on the CPU it moves at least one of them well past the tolerance
    moved = {s: round(cpu[s] - default[s], 4) for s in TOL if abs(cpu[s] - default[s]) > 2 * TOL[s]}
    assert moved, f"no statistic sees augment {keys}"
    off = {s: (round(cpu[s], 4), round(dev[s], 4)) for s in TOL if abs(cpu[s] - dev[s]) > TOL[s]}
    assert not off, f"augment {keys}: device policy differs from the CPU policy (cpu, device): {off}; moved {moved}"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_augment_key_draws_the_same_on_the_device(parity: KeyParity, default_cpu: dict[str, float],
                                                         case: dict) -> None:
    aug = AugmentCfg(**case)
    assert_key_parity(str(case), parity.cpu(aug), parity.device(aug), default_cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_on_cuda_every_augment_key_draws_the_same(parity: KeyParity, default_cpu: dict[str, float],
                                                  case: dict) -> None:
    aug = AugmentCfg(**case)
    assert_key_parity(str(case), parity.cpu(aug), parity.device(aug, "cuda"), default_cpu)


@pytest.mark.parametrize(("key", "case"), CPU_ONLY_CASES, ids=[key for key, _ in CPU_ONLY_CASES])
def test_a_key_without_a_device_twin_is_named(key: str, case: dict) -> None:
    assert device_supports(AugmentCfg(**case)) == f"augment.{key}={case[key]}"


@pytest.mark.parametrize("case", [{}, *KEY_CASES, {"crop": "none"}, {"erasing_mode": "pixel"}],
                         ids=["defaults", *CASE_IDS[:len(KEY_CASES)], "crop=none,light", "erasing_mode-unused"])
def test_every_key_with_a_twin_runs_on_the_device(case: dict) -> None:
    assert device_supports(AugmentCfg(**case)) is None


@pytest.mark.parametrize("setting", ["auto", "cuda"])
def test_a_key_without_a_twin_sends_the_policy_to_the_cpu_with_one_data_line(setting: str, caplog) -> None:
    from vistrain.engine.run_setup import _augment_device

    gpu = torch.device("cuda")  # the decision only, nothing runs there
    with caplog.at_level("INFO"):
        assert _augment_device(AugmentCfg(device=setting, policy="light"), gpu) == "cuda"
        assert _augment_device(AugmentCfg(device=setting, auto="trivial"), gpu) == "cpu"
    lines = [r.getMessage() for r in caplog.records if "[DATA]" in r.getMessage()]
    assert len(lines) == 1 and "augment.auto=trivial" in lines[0] and "cpu" in lines[0], lines


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
    from vistrain.engine.training import run_train
    from vistrain.errors import UserError

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
    from vistrain.engine.training import run_train

    root = write_csv_dataset(tmp_path / "data", per_class=8).root
    raw = tiny_config(root, augment={"policy": "hard"}, train={"device": "cuda", "epochs": 2},
                      output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None})
    run = run_train(validate(raw)).run_dir
    assert yaml.safe_load((run / "config.yaml").read_text())["augment"]["device"] == "cuda"
    assert all(r["img_per_s"] > 0 for r in read_metrics(run))
