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
# batches inside ClassificationTask, after either policy (mixup / cutmix), pick the path itself (device) or the images
# of an epoch (repeats: the sampler); crop, scale, ratio, pad and the erasing keys have their own parity tests below
# (DEVICE_KEYS), and what no batched op runs forces the CPU policy (CPU_ONLY_KEYS, device_supports). A new augment
# key must land in one of these, or this file fails.
LOOP_KEYS = {"device", "mixup_alpha", "cutmix_alpha", "mix_prob", "mix_switch_prob", "repeats"}
DEVICE_KEYS = {"crop", "scale", "ratio", "pad", "erasing_mode", "erasing_count", "erasing_area"}
CPU_ONLY_KEYS = {"auto", "albumentations", "splits"}
KEY_CASES = [{"policy": "none"}, {"policy": "hard"}, {"hflip": 1.0}, {"vflip": 0.5}, {"rotate": 45.0},
             {"color_jitter": 0.5}, {"hue": 0.1}, {"random_erasing": 0.5}]
PILLS = {k: v for k, v in yaml.safe_load(bundled_config("pill_efficientnetv2s.yaml").read_text())["augment"].items()
         if k not in LOOP_KEYS}
# the crops within a whole policy: the affine only rotates beside them, on both sides
CROP_CASES = [{"crop": "pad_crop", "rotate": 10.0}, {"crop": "rrc", "scale": [0.5, 1.0], "rotate": 0.0}]
CASES = [*KEY_CASES, {"color_jitter": 0.0, "hue": 0.1}, *CROP_CASES, PILLS]
CASE_IDS = [*(",".join(f"{k}={v}" for k, v in case.items()) for case in CASES[:-1]), "pills"]
# Per statistic: CPU and device may differ by this much at N images on one seed (about 4x the spread between seeds
# measured for either policy; the CPU policy also runs about 0.005 darker: PIL truncates to 8 bits after each
# colour step, Kornia stays in float).
TOL = {"mean": 0.015, "std": 0.01, "change": 0.012, "bright": 0.012, "lr_asym": 0.025, "tb_asym": 0.02,
       "orient": 0.05, "hue_shift": 0.005, "chroma": 0.03, "erased": 0.01}


def test_every_augment_key_is_in_the_parity_test() -> None:
    assert {key for case in KEY_CASES for key in case} | LOOP_KEYS | DEVICE_KEYS | CPU_ONLY_KEYS == set(
        AugmentCfg.model_fields)
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


# ------------------------------------------------------------------ issue 22: crop scale / ratio, pad_crop, erasing
# Their CPU semantics are the libraries the keys name: torchvision's RandomResizedCrop(scale=, ratio=), the re-ID
# strong baseline's Pad(pad) + RandomCrop(size) (torchvision's RandomCrop(size, padding=pad)), timm's RandomErasing
# (mode, max_count) on the normalised tensor. The device policy is checked against those directly, on CPU tensors
# and, marked gpu, on CUDA.

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                    reason="needs CUDA")])]
CROPS = 1024


def coordinates(n: int, size: int, base: int, step: int) -> np.ndarray:
    """n copies of uint8 [size, size, 3] whose red channel is base + step * x and green base + step * y: where a crop
    took its pixels from reads off them."""
    ramp = base + step * np.arange(size)
    img = np.stack([np.broadcast_to(ramp[None, :], (size, size)), np.broadcast_to(ramp[:, None], (size, size)),
                    np.full((size, size), 128)], axis=-1).astype(np.uint8)
    return np.broadcast_to(img, (n, size, size, 3)).copy()


def device_crop(aug: AugmentCfg, device: str) -> torch.nn.Module:
    """The crop of the device policy: the op ``augment.crop`` puts first, before the policy's own."""
    ops = device_ops(aug, HW)
    assert len(ops) == len(device_ops(AugmentCfg(), HW)) + 1
    return ops[0].to(device)


def crop_geometry(out: torch.Tensor, size: int, base: int, step: int) -> dict[str, torch.Tensor]:
    """Per crop [N, 3, 32, 32] (0-255) of ``coordinates`` pictures: its share of the picture's area, log aspect
    ratio (width / height) and the centre's offset from the picture's, from the ramps' slopes inside the output
    (a linear ramp stays linear through any resampling filter, away from the borders)."""
    r, g = out[:, 0].double(), out[:, 1].double()
    width = (r[:, 8:24, 24].mean(1) - r[:, 8:24, 8].mean(1)) / 16 * HW[1] / step
    height = (g[:, 24, 8:24].mean(1) - g[:, 8, 8:24].mean(1)) / 16 * HW[0] / step
    cx = (r[:, 8:24, 15:17].mean((1, 2)) - base) / step + 0.5 - size / 2
    cy = (g[:, 15:17, 8:24].mean((1, 2)) - base) / step + 0.5 - size / 2
    return {"area": width * height / size**2, "log_aspect": torch.log(width / height),
            "offset": torch.hypot(cx, cy) / size}


@pytest.mark.parametrize("device", DEVICES)
def test_rrc_crops_with_the_scale_and_ratio_of_torchvision(device: str) -> None:
    from torchvision.transforms import v2 as T

    size, base, step = 64, 30, 3
    aug = AugmentCfg(crop="rrc", scale=[0.25, 0.5], ratio=[0.5, 2.0])
    source = coordinates(CROPS, size, base, step)
    torch.manual_seed(0)
    cpu = cpu_apply(T.RandomResizedCrop(HW, scale=(0.25, 0.5), ratio=(0.5, 2.0), antialias=True), source) * 255
    torch.manual_seed(0)
    dev = device_crop(aug, device)(torch.from_numpy(source).permute(0, 3, 1, 2).float().to(device) / 255).cpu() * 255
    a, b = crop_geometry(cpu, size, base, step), crop_geometry(dev, size, base, step)
    for crops in (a, b):  # the keys' ranges, not the defaults (0.08-1, 3/4-4/3)
        assert 0.24 < crops["area"].quantile(0.02) and crops["area"].quantile(0.98) < 0.52, crops["area"]
        assert crops["log_aspect"].abs().quantile(0.9) > 0.45 and crops["log_aspect"].abs().max() < 0.76
    for stat, tol in {"area": 0.012, "log_aspect": 0.05, "offset": 0.01}.items():
        assert b[stat].mean().item() == pytest.approx(a[stat].mean().item(), abs=tol), stat
        assert b[stat].std().item() == pytest.approx(a[stat].std().item(), abs=tol), stat


@pytest.mark.parametrize("device", DEVICES)
def test_pad_crop_shifts_uniformly_within_the_padding_as_the_strong_baseline(device: str) -> None:
    from torchvision.transforms import v2 as T

    pad, base, step = 4, 100, 4
    source = coordinates(CROPS, HW[0], base, step)
    torch.manual_seed(0)
    cpu = cpu_apply(T.Compose([T.Pad(pad), T.RandomCrop(HW)]), source) * 255
    torch.manual_seed(0)
    aug = AugmentCfg(crop="pad_crop", pad=pad)
    dev = device_crop(aug, device)(torch.from_numpy(source).permute(0, 3, 1, 2).float().to(device) / 255).cpu() * 255
    expected = CROPS / (2 * pad + 1)
    for out in (cpu, dev):
        # the picture's centre pixel came from (16 + dx, 16 + dy): every shift in [-pad, pad] about equally often
        shifts = ((out[:, :2, 16, 16] - base) / step - 16).round().long()
        assert set(shifts.flatten().tolist()) == set(range(-pad, pad + 1))
        for axis in range(2):
            counts = torch.bincount(shifts[:, axis] + pad, minlength=2 * pad + 1).double()
            chi2 = ((counts - expected) ** 2 / expected).sum().item()
            assert chi2 < 26.1, (axis, counts)  # chi-squared, 8 degrees of freedom, p = 0.001
        # the padding is black (Pad's fill 0), |dx| columns and |dy| rows of it
        black = (out == 0).all(dim=1).float().mean((1, 2))
        dx, dy = shifts[:, 0].abs().double(), shifts[:, 1].abs().double()
        assert torch.allclose(black.double(), (dx * 32 + dy * 32 - dx * dy) / 32**2, atol=1e-6)


def erasing_stats(out: torch.Tensor, clean: torch.Tensor) -> dict[str, float]:
    """Random erasing's draws, from normalised outputs [N, 3, H, W] and the same pictures unerased: the share of
    pictures erased, the erased share of those, how much of the erased pixels' bounding box they fill (1 for one
    rectangle), the fill's mean and spread and its change between neighbouring erased pixels (0 inside a
    rectangle of one colour, about 1.13 for noise per pixel), and the colours per erased picture (rand mode: about
    one per rectangle)."""
    erased = (out != clean).any(dim=1)  # [N, H, W]
    share = erased.float().mean((1, 2))
    hit = share > 0
    rows, cols = erased.any(2), erased.any(1)
    box = rows.sum(1) * cols.sum(1)
    fill = out.permute(0, 2, 3, 1)[erased]
    both = erased[..., 1:] & erased[..., :-1]
    step = (out[..., 1:] - out[..., :-1]).abs().mean(1)[both]
    colours = [len(torch.unique(out[i].permute(1, 2, 0)[erased[i]], dim=0)) for i in torch.nonzero(hit)[:, 0]]
    return {"erased": hit.float().mean().item(), "share": share[hit].mean().item(),
            "box_fill": (erased.sum((1, 2))[hit] / box[hit]).mean().item(), "fill_mean": fill.mean().item(),
            "fill_std": fill.std().item(), "fill_step": step.mean().item(),
            "colours": min(float(np.mean(colours)), 10.0)}


# about 3x the differences measured between timm and the device on seeds 0 and 1 (a rand rectangle's colour weighs its
# area: the fill's mean varies most)
ERASING_TOL = {"erased": 0.07, "share": 0.015, "box_fill": 0.03, "fill_mean": 0.1, "fill_std": 0.06,
               "fill_step": 0.05, "colours": 0.25}
ERASING_CASES = [("const", 1), ("const", 3), ("rand", 1), ("rand", 3), ("pixel", 2)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("mode", "count"), ERASING_CASES, ids=[f"{m}-{c}" for m, c in ERASING_CASES])
def test_random_erasing_modes_and_counts_draw_what_timm_draws(pixels: np.ndarray, mode: str, count: int,
                                                              device: str) -> None:
    import random

    from timm.data.random_erasing import RandomErasing

    pre = Preprocessor(size=HW)
    source = pixels[:, 4:36, 4:36]
    clean = torch.stack([pre.normalize(x) for x in source])
    random.seed(0)
    torch.manual_seed(0)
    timm_erase = RandomErasing(probability=0.5, mode=mode, max_count=count, device="cpu")
    cpu = torch.stack([timm_erase(x.clone()) for x in clean])
    aug = AugmentCfg(policy="none", random_erasing=0.5, erasing_mode=mode, erasing_count=count)
    torch.manual_seed(0)
    augment = DeviceAugment(aug, pre).to(device)
    dev = torch.cat([augment(b.to(device)).cpu() for b in torch.stack([to_uint8_tensor(x) for x in source]).split(64)])
    a, b = erasing_stats(cpu, clean), erasing_stats(dev, clean)
    off = {s: (round(a[s], 4), round(b[s], 4)) for s in ERASING_TOL if abs(a[s] - b[s]) > ERASING_TOL[s]}
    assert not off, f"erasing_mode={mode} erasing_count={count}: device differs from timm (timm, device): {off}"


# What no batched op runs forces the CPU policy: timm's auto-augment policies (Kornia's RandAugment draws its
# operations once per batch, at probability 1, with other formulas), AugMix and its splits, an Albumentations file.
CPU_ONLY = [({"auto": "rand-m9-mstd0.5-inc1"}, "augment.auto: rand-m9-mstd0.5-inc1"),
            ({"auto": "augmix-m5-w4-d2"}, "augment.auto: augmix-m5-w4-d2"),
            ({"auto": "original"}, "augment.auto: original"),
            ({"albumentations": "pipeline.yaml"}, "augment.albumentations: pipeline.yaml"),
            ({"splits": 3}, "augment.splits: 3")]


@pytest.mark.parametrize(("case", "named"), CPU_ONLY, ids=[named.removeprefix("augment.") for _, named in CPU_ONLY])
def test_what_has_no_batched_twin_is_named_and_refused_on_the_device(case: dict, named: str) -> None:

    reason = device_supports(AugmentCfg(**case))
    assert reason is not None and reason.startswith(named + " ")
    with pytest.raises(ValueError, match=f"^{named} "):
        DeviceAugment(AugmentCfg(**case), Preprocessor(size=HW))


def test_every_other_key_runs_on_the_device() -> None:

    cases = [*CASES, {"crop": "rrc", "scale": [0.2, 0.9], "ratio": [0.5, 2.0]}, {"crop": "pad_crop", "pad": 4},
             {"crop": "none", "policy": "hard"}, {"erasing_mode": "pixel", "erasing_count": 3, "random_erasing": 0.5},
             {"repeats": 3}]
    assert [device_supports(AugmentCfg(**case)) for case in cases] == [None] * len(cases)


@pytest.mark.parametrize("setting", ["auto", "cuda"])
def test_a_gpu_run_with_a_cpu_only_key_augments_on_the_cpu_and_says_why(setting: str, caplog) -> None:
    from vistrain.config.loader import load_config
    from vistrain.engine.device import PRECISIONS
    from vistrain.engine.run_setup import Machine, resolve_auto

    cuda = Machine(torch.device("cuda"), PRECISIONS["bf16"])  # resolve_auto only reads the device's type
    base = ["train.batch_size=8", "train.num_workers=0", f"augment.device={setting}"]
    assert resolve_auto(load_config(None, overrides=base), cuda, 2, cached=True).augment.device == "cuda"
    caplog.clear()
    with caplog.at_level("INFO"):
        cfg = resolve_auto(load_config(None, overrides=[*base, "augment.auto=rand-m9-mstd0.5-inc1"]), cuda, 2,
                           cached=True)
    assert cfg.augment.device == "cpu"
    lines = [r.getMessage() for r in caplog.records if "augment" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("[DATA] augment.device: cpu, not cuda: augment.auto: "
                                                   "rand-m9-mstd0.5-inc1 "), lines
