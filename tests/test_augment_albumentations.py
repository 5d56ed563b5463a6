"""augment.albumentations: a pipeline file saved with ``albumentations.save``, applied by the training transform to
the preprocessed uint8 pixels after the policy's operations and before the normalisation; its draws follow the
item's seed; a mistake in the file is one line naming the key and the file; the run keeps a copy and the file's
content is part of the config hash."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import run_cli, run_dirs, tiny_config, write_csv_dataset, write_yaml

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI for a newer version on import
A = pytest.importorskip("albumentations")

from vistrain.config.loader import validate  # noqa: E402
from vistrain.config.schema import AugmentCfg  # noqa: E402
from vistrain.data.preprocess import Preprocessor  # noqa: E402
from vistrain.data.transforms import TrainTransform  # noqa: E402
from vistrain.errors import UserError  # noqa: E402

PRE = Preprocessor(size=(24, 40), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
ONE_LEVEL = 1.01 / 255 / min(PRE.std)  # one 8-bit level after the normalisation


def pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (24, 40, 3), dtype=np.uint8)


def saved(path: Path, *transforms: object) -> Path:
    """``transforms`` as a Compose written by albumentations.save (the format from the suffix)."""
    A.save(A.Compose(list(transforms)), str(path), data_format="yaml" if path.suffix in (".yaml", ".yml") else "json")
    return path


def transform(path: Path, **aug: object) -> TrainTransform:
    return TrainTransform(AugmentCfg(policy="none", albumentations=path, **aug), PRE)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_saved_pipeline_changes_the_pixels_before_the_normalisation(tmp_path: Path, suffix: str) -> None:
    x = pixels()
    grey = np.repeat(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)  # ITU-R 601 weights, as ToGray's
    out = transform(saved(tmp_path / f"p{suffix}", A.ToGray(p=1)))(x)
    assert out.shape == (3, 24, 40) and out.dtype == torch.float32
    assert torch.allclose(out, PRE.normalize(grey), atol=ONE_LEVEL, rtol=0)
    assert not torch.allclose(out, PRE.normalize(x), atol=10 * ONE_LEVEL, rtol=0)


def test_the_pipeline_runs_after_the_policy(tmp_path: Path) -> None:
    path = saved(tmp_path / "shift.yaml", A.Affine(translate_px={"x": 7, "y": 0}, border_mode=cv2.BORDER_CONSTANT,
                                                   p=1))
    tf = TrainTransform(AugmentCfg(policy="light", hflip=1.0, rotate=0.0, color_jitter=0.0, albumentations=path), PRE)
    tf.augment.transforms = tf.augment.transforms[:1]  # the certain flip; the policy's affine always moves the image
    x = pixels(1)
    shift = A.load(str(path), data_format="yaml")
    flip_then_shift = shift(image=np.ascontiguousarray(x[:, ::-1]))["image"]
    shift_then_flip = np.ascontiguousarray(shift(image=x)["image"][:, ::-1])
    out = tf(x)
    assert torch.equal(out, PRE.normalize(flip_then_shift))
    assert not torch.equal(out, PRE.normalize(shift_then_flip))


def test_its_random_draws_follow_the_item_seed(tmp_path: Path) -> None:
    """The dataset seeds torch's generator per item (``dataset.item_rng``); the pipeline's draws must follow it, so a
    resumed epoch and any number of loader workers give the same images."""
    tf = transform(saved(tmp_path / "p.yaml", A.RandomBrightnessContrast(p=1), A.HorizontalFlip(p=0.5)))
    x = pixels(2)
    torch.manual_seed(3)
    first, second = tf(x), tf(x)
    torch.manual_seed(3)
    again = tf(x)
    assert not torch.equal(first, second)
    assert torch.equal(first, again)


def test_without_the_key_the_transform_is_todays(tmp_path: Path) -> None:
    aug = AugmentCfg(policy="light")
    assert aug.albumentations is None
    x = pixels(4)
    torch.manual_seed(5)
    before = TrainTransform(aug, PRE)(x)
    torch.manual_seed(5)
    assert torch.equal(TrainTransform(AugmentCfg(policy="light", albumentations=None), PRE)(x), before)


def _mistakes(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = saved(tmp_path / "good.yaml", A.ToGray(p=1))
    typo = tmp_path / "typo.yaml"
    typo.write_text(good.read_text().replace("ToGray", "ToGrey"))
    bad_arg = tmp_path / "bad_arg.json"
    saved(bad_arg, A.Blur(blur_limit=3, p=1))
    bad_arg.write_text(bad_arg.read_text().replace('"blur_limit"', '"blur_limits"'))
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "broken.yaml").write_text("transform: [unclosed\n")
    (tmp_path / "plain.yaml").write_text("lr: 0.1\n")
    (tmp_path / "notes.txt").write_text("ToGray\n")
    return {
        "missing": (tmp_path / "absent.yaml", "file not found"),
        "folder": (tmp_path / "folder.yaml", "cannot read"),
        "suffix": (tmp_path / "notes.txt", "expected a .yaml, .yml or .json file"),
        "syntax": (tmp_path / "broken.yaml", "not valid YAML"),
        "not a pipeline": (tmp_path / "plain.yaml", "not an albumentations pipeline"),
        "unknown transform": (typo, "unknown transform 'ToGrey' (did you mean 'ToGray'?)"),
        "bad argument": (bad_arg, "transform Blur:"),
        "floats out": (saved(tmp_path / "norm.yaml", A.Normalize(p=1)), "must return uint8 [H, W, 3] pixels"),
    }


@pytest.mark.parametrize("case", ["missing", "folder", "suffix", "syntax", "not a pipeline", "unknown transform",
                                  "bad argument", "floats out"])
def test_a_bad_file_is_one_line_naming_the_key_and_the_file(tmp_path: Path, case: str) -> None:
    from vistrain.data.albu import load_pipeline

    path, words = _mistakes(tmp_path)[case]
    with pytest.raises(UserError) as err:
        load_pipeline(path, (24, 40))
    message = str(err.value)
    assert message.startswith(f"augment.albumentations: {path}: ") and "\n" not in message, message
    assert words in message, message


def test_train_refuses_a_missing_file_before_the_run_directory(tmp_path: Path) -> None:
    root = write_csv_dataset(tmp_path / "data", per_class=4).root
    config = write_yaml(tmp_path / "c.yaml", tiny_config(root, augment={"albumentations": "nowhere.yaml"},
                                                         output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None}))
    result = run_cli("train", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if "augment.albumentations" in ln]
    assert lines and f"{tmp_path / 'nowhere.yaml'}: file not found" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert run_dirs(tmp_path / "exp") == []


def test_the_pipeline_file_is_part_of_the_config_hash(tmp_path: Path) -> None:
    from vistrain.tracking.rundir import config_hash

    root = write_csv_dataset(tmp_path / "data", per_class=2).root
    path = saved(tmp_path / "p.yaml", A.ToGray(p=1))
    cfg = validate(tiny_config(root, augment={"albumentations": str(path)}))
    first = config_hash(cfg)
    assert config_hash(validate(tiny_config(root, augment={"albumentations": str(path)}))) == first
    saved(path, A.ToGray(p=1), A.HorizontalFlip(p=0.5))  # same path, other pipeline: another config for --resume
    assert config_hash(cfg) != first
    assert config_hash(validate(tiny_config(root))) != first


def test_loader_workers_give_the_images_one_process_gives(tmp_path: Path) -> None:
    """Each image's draws follow its own seed, not the process that makes it: 0 or 2 workers, the same batches."""
    from torch.utils.data import DataLoader

    from vistrain.data.dataset import ImageDataset, worker_init
    from vistrain.data.samplers import SeededIndex

    images = [pixels(seed) for seed in range(6)]
    tf = transform(saved(tmp_path / "p.yaml", A.RandomBrightnessContrast(p=1), A.HorizontalFlip(p=0.5),
                         A.CoarseDropout(p=0.5)))
    ds = ImageDataset([str(i) for i in range(6)], [0] * 6, tf, lambda path: images[int(path)])
    batches = [[SeededIndex(i, 1000 + 7 * i) for i in range(j, j + 3)] for j in (0, 3)]

    def run(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(ds, batch_sampler=batches, num_workers=workers,
                            worker_init_fn=worker_init if workers else None)
        return [x for x, _, _ in loader]

    alone, shared = run(0), run(2)
    assert all(torch.equal(a, b) for a, b in zip(alone, shared, strict=True))
    assert not torch.equal(alone[0][0], PRE.normalize(images[0]))  # the pipeline drew something
