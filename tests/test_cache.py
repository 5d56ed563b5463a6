"""The decode-once cache (data.cache): one decode per image for a whole K-fold run and a whole study, disk caches
that are rebuilt when a file changes and never read when a build was cut short, the same metrics as decoding
every epoch, and loader workers that read the memory map without holding the data set."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import read_metrics, tiny_config, write_csv_dataset
from PIL import Image

from vistrain.config.loader import validate
from vistrain.data import cache as cache_mod
from vistrain.data import images, preprocess
from vistrain.data.cache import find_cache, open_cache
from vistrain.data.preprocess import Preprocessor


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fresh_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without the memory caches of earlier tests in this process."""
    monkeypatch.setattr(cache_mod, "_MEMORY", {})


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv_dataset(tmp_path_factory.mktemp("cache") / "data", per_class=10, size=40).root  # 30 images


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every full decode of an image file, whichever path makes it (cache build, dataset, bad-image check)."""
    seen: list[str] = []
    real = images.load_rgb

    def counted(path: Any, *args: Any, **kwargs: Any) -> Image.Image:
        seen.append(str(path))
        return real(path, *args, **kwargs)
    for module in (images, preprocess):
        monkeypatch.setattr(module, "load_rgb", counted)
    return seen


def cfg_of(root: Path, tmp_path: Path, **sections: dict[str, Any]) -> Any:
    raw = tiny_config(root, output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None})
    raw["train"]["epochs"] = 1
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return validate(raw)


def dataset_paths(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "train").glob("*.png"))


# ------------------------------------------------------------------------------------------ runs

def test_five_fold_run_decodes_each_image_once(data_root: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from vistrain.engine.training import run_train

    seen = count_decodes(monkeypatch)
    cfg = cfg_of(data_root, tmp_path, data={"folds": 5, "valid_fold": "all", "cache": "memory"},
                 model={"name": "test_resnet"}, train={"epochs": 2})
    result = run_train(cfg)
    assert sorted(seen) == dataset_paths(data_root)  # 30 decodes for 5 folds x 2 epochs x (train + valid)
    log = (result.run_dir / "train.log").read_text()
    assert log.count("[DATA] cache memory built: 30 images at 32x32") == 1, log


def test_four_trial_study_builds_the_cache_once(data_root: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("optuna")
    from vistrain.tuning.run import run_tune

    seen = count_decodes(monkeypatch)
    space = {"train.lr": {"type": "categorical", "choices": [1e-3, 2e-3, 3e-3, 4e-3]}}
    cfg = cfg_of(data_root, tmp_path, model={"name": "test_resnet"},
                 tune={"epochs": 1, "pruner": "none", "space": space})
    result = run_tune(cfg, n_trials=4)
    assert sorted(seen) == dataset_paths(data_root)
    logs = [p.read_text() for p in sorted((result.tune_dir / "trials").glob("*/*/train.log"))]
    assert len(logs) == 4
    assert sum("[DATA] cache memory built: 30 images" in t for t in logs) == 1
    assert sum("[DATA] cache memory reused: 30 images at 32x32" in t for t in logs) == 3


def test_same_seed_same_metrics_with_and_without_the_cache(data_root: Path, tmp_path: Path) -> None:
    from vistrain.engine.training import run_train

    rows = {}
    for mode in ("off", "memory", "disk"):
        cfg = cfg_of(data_root, tmp_path / mode, data={"cache": mode}, augment={"policy": "light"},
                     train={"epochs": 2})
        run_dir = run_train(cfg).run_dir
        rows[mode] = read_metrics(run_dir)
        resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert resolved["augment"]["device"] == "cpu" and resolved["train"]["channels_last"] is False  # auto on CPU
        assert all(r["img_per_s"] > 0 and 0 <= r["data_wait_frac"] < 1 for r in rows[mode]), rows[mode]
    keys = ["train_loss", "valid_loss", "accuracy", "macro_f1"]
    for mode in ("memory", "disk"):
        for a, b in zip(rows["off"], rows[mode]):
            assert [b[k] for k in keys] == pytest.approx([a[k] for k in keys], rel=1e-5, abs=1e-6), mode


def test_unreadable_files_found_while_caching_are_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vistrain.engine.training import run_train

    root = write_csv_dataset(tmp_path / "data", per_class=6, size=40).root
    (root / "train" / "img_0_000.png").write_bytes(b"not a png")
    seen = count_decodes(monkeypatch)
    result = run_train(cfg_of(root, tmp_path, data={"cache": "disk"}))
    bad = (result.run_dir / "bad_images.csv").read_text()
    assert "img_0_000" in bad and "UnidentifiedImageError" in bad
    assert len(seen) == 18  # the cache build was the bad-image check: no second pass


@pytest.mark.parametrize("policy", ["none", "light", "hard"])
def test_cache_on_or_off_trains_on_identical_tensors(policy: str, data_root: Path, tmp_path: Path) -> None:
    """data.cache is a speed switch, not a training setting: with the same seed the first epoch's training batches
    (augmentation included) and the validation batches are the very tensors that decoding every epoch gives."""
    from vistrain.data.prepare import prepare_data
    from vistrain.engine.setup import classification_setup

    batches = {}
    for mode in ("off", "memory", "disk"):
        cfg = cfg_of(data_root, tmp_path, data={"cache": mode, "cache_dir": str(tmp_path / "cache")},
                     augment={"policy": policy}, model={"name": "test_resnet"}, train={"batch_size": 4})
        fold = classification_setup(cfg, prepare_data(cfg), 0, torch.device("cpu"))
        fold.train_loader.batch_sampler.set_epoch(cfg.project.seed, 0)
        batches[mode] = [*fold.train_loader, *fold.valid_loader]
    assert len(batches["off"]) == 3 + 2  # 15 training images: 3 batches of 4 (the rest dropped); 15 validate in 8s
    for mode in ("memory", "disk"):
        for (x_off, y_off, i_off), (x, y, i) in zip(batches["off"], batches[mode], strict=True):
            assert torch.equal(i, i_off) and torch.equal(y, y_off)
            assert torch.equal(x, x_off), f"data.cache={mode} changes the pixels of policy {policy}"


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_a_changed_max_image_pixels_is_not_served_from_the_cache(mode: str, tmp_path: Path) -> None:
    """data.max_image_pixels decides which images are readable: after lowering it an image over the new limit is
    unreadable (not read from the cache built under the old limit), after raising it the image the old limit refused
    trains (not left out with the old reason)."""
    from vistrain.data.prepare import prepare_data

    root = write_csv_dataset(tmp_path / "data", per_class=6, size=40).root  # 1,600 pixels each
    big = root / "train" / "img_0_000.png"
    Image.new("RGB", (80, 60), (200, 30, 30)).save(big)  # 4,800 pixels
    for limit, refused in ((10_000, False), (3_000, True), (10_000, False)):
        data = prepare_data(cfg_of(root, tmp_path, data={"cache": mode, "cache_dir": str(tmp_path / "cache"),
                                                         "max_image_pixels": limit}))
        reasons = dict(zip(data.bad["path"], data.bad["reason"]))
        assert (str(big) in reasons) == refused, (limit, reasons)
        if refused:
            assert f"over data.max_image_pixels={limit:,}" in reasons[str(big)]
        assert len(data.items) == 18 - refused


# ------------------------------------------------------------------------------------------ disk caches

@pytest.fixture
def small_set(tmp_path: Path) -> list[str]:
    return dataset_paths(write_csv_dataset(tmp_path / "d", per_class=3, size=40).root)


def build(paths: list[str], root: Path, size: int = 32) -> Any:
    return open_cache(paths, Preprocessor(size=(size, size)), "disk", root)


def test_disk_cache_is_reused_and_rebuilt_when_a_file_changes(small_set: list[str], tmp_path: Path) -> None:
    root = tmp_path / "cache"
    first = build(small_set, root)
    assert first.lines[0].startswith("cache disk built: 9 images")
    assert build(small_set, root).lines[0].startswith("cache disk reused: 9 images at 32x32")
    st = os.stat(small_set[4])
    os.utime(small_set[4], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = build(small_set, root)
    assert again.lines[0].startswith("cache disk built: 9 images"), again.lines
    assert sorted(p.suffix for p in root.iterdir()) == [".json", ".u8"]  # the stale one is gone
    expected = Preprocessor(size=(32, 32)).load(small_set[4])
    assert np.array_equal(again.images.decode(small_set[4]), expected)


def test_a_killed_build_leaves_nothing_a_later_run_reads(small_set: list[str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cache"
    real = cache_mod._decode_one
    calls = []

    def dies(path: str) -> Any:
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt  # Ctrl-C half way through
        return real(path)
    monkeypatch.setattr(cache_mod, "_decode_one", dies)
    with pytest.raises(KeyboardInterrupt):
        build(small_set, root)
    assert not list(root.glob("*.json"))  # no index: nothing to read
    monkeypatch.setattr(cache_mod, "_decode_one", real)
    # a SIGKILL leaves its temporary file behind (a pid that no longer runs): ignored, then cleaned up
    key_file = root / ".deadbeef.999999999.tmp"
    key_file.write_bytes(b"\0" * 100)
    cache = build(small_set, root)
    assert cache.lines[0].startswith("cache disk built")
    assert np.array_equal(cache.images.decode(small_set[0]), Preprocessor(size=(32, 32)).load(small_set[0]))


def test_a_truncated_data_file_is_rebuilt_not_read(small_set: list[str], tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "cache"
    cache = build(small_set, root)
    data = cache.images.data_path
    data.write_bytes(data.read_bytes()[:1000])
    again = build(small_set, root)
    assert again.lines[0].startswith("cache disk built"), again.lines
    assert data.stat().st_size == 9 * 32 * 32 * 3


def test_parallel_build_equals_the_serial_one(small_set: list[str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    broken = Path(small_set[0]).parent / "broken.png"
    broken.write_bytes(b"\x89PNG broken")
    paths = [*small_set, str(broken)]
    pre = Preprocessor(size=(32, 32), clahe=True)
    serial = open_cache(paths, pre, "memory", tmp_path)
    monkeypatch.setattr(cache_mod, "_MEMORY", {})
    monkeypatch.setattr(cache_mod, "PARALLEL_FROM", 0)
    parallel = open_cache(paths, pre, "disk", tmp_path / "c", processes=2)
    assert "2 process(es)" in parallel.lines[0]
    assert serial.errors.keys() == parallel.errors.keys() == {str(broken)}
    for p in small_set:
        assert np.array_equal(serial.images.decode(p), parallel.images.decode(p))
        assert np.array_equal(serial.images.decode(p), pre.load(p))


def test_another_machine_builds_the_same_disk_cache_on_its_own_disk(small_set: list[str], tmp_path: Path) -> None:
    """Under torchrun rank 0 builds the cache and sends the CacheSet to every rank; on another machine whose
    data.cache_dir is a local disk the files are not there, so that machine builds the same cache there (same key:
    same files in the same order, the unreadable one included, the same pixel limit) instead of failing to map rank 0's
    file."""
    broken = Path(small_set[0]).parent / "broken.png"
    broken.write_bytes(b"\x89PNG broken")
    paths = [small_set[0], str(broken), *small_set[1:]]  # an unreadable file between readable ones
    local = tmp_path / "local-disk"
    # as another rank receives it; built under rank 0's data.max_image_pixels (this process's limit is the default)
    sent = pickle.loads(pickle.dumps(open_cache(paths, Preprocessor(size=(32, 32)), "disk", local, max_pixels=10**4)))
    rank0 = tmp_path / "rank0-local-disk"
    local.rename(rank0)  # this machine's local disk: empty
    here = cache_mod.on_this_machine(sent)
    assert here.lines[0].startswith("cache disk built: 9 images (1 unreadable)"), here.lines
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in rank0.iterdir())
    for data in rank0.glob("*.u8"):
        assert (local / data.name).read_bytes() == data.read_bytes()
    assert cache_mod.on_this_machine(here) is here  # complete on this disk: opened as it is


def test_evaluate_and_predict_find_the_training_cache(small_set: list[str], tmp_path: Path) -> None:
    root = tmp_path / "cache"
    build(small_set, root)
    pre = Preprocessor(size=(32, 32))
    found = find_cache(small_set[2:5], pre, root)
    assert found is not None and found.size == (32, 32)
    assert find_cache(small_set[2:5], Preprocessor(size=(32, 32), crop="center_square"), root) is None
    os.utime(small_set[3], ns=(1, 1))
    assert find_cache(small_set[2:5], pre, root) is None  # a changed file is decoded, not read stale


@pytest.mark.parametrize("module", ["PIL", "cv2", "numpy"])
def test_a_decode_library_upgrade_rebuilds_the_disk_cache(module: str, small_set: list[str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow decodes, OpenCV resizes (and CLAHE), NumPy holds the pixels: another version may give other pixels,
    so a cache built with the old one is never read again (and is deleted: nothing would read it)."""
    import importlib

    root = tmp_path / "cache"
    build(small_set, root)
    monkeypatch.setattr(importlib.import_module(module), "__version__", "0.0.0-upgraded")
    again = build(small_set, root)
    assert again.lines[0].startswith("cache disk built: 9 images"), again.lines
    assert sorted(p.suffix for p in root.iterdir()) == [".json", ".u8"]
    assert find_cache(small_set, Preprocessor(size=(32, 32)), root) is not None  # the new one, found


def test_the_key_follows_every_pixel_setting_of_the_preprocessing(small_set: list[str], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything the preprocessing's description (preprocess.json) says about the pixels keys the cache, a decode
    rule added to it later included; the normalisation, applied after the cache, does not."""
    root = tmp_path / "cache"
    build(small_set, root)
    other_norm = Preprocessor(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert open_cache(small_set, other_norm, "disk", root).lines[0].startswith("cache disk reused")
    described = Preprocessor.to_dict
    monkeypatch.setattr(Preprocessor, "to_dict", lambda self: {**described(self), "decode": {"jpeg": "reduced"}})
    assert build(small_set, root).lines[0].startswith("cache disk built"), "a new decode rule, the old pixels"


# ------------------------------------------------------------------------------------------ worker memory

def _rss_anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


class _RssProbe(torch.utils.data.Dataset):
    """Reads every cached image in a loader worker; returns the worker's private resident memory (KiB)."""

    def __init__(self, decode: Any, paths: list[str]):
        self.decode, self.paths = decode, paths

    def __len__(self) -> int:
        return 1

    def __getitem__(self, _: int) -> torch.Tensor:
        before = peak = _rss_anon_kib()
        for _ in range(3):
            for p in self.paths:
                pixels = self.decode(p)
                peak = max(peak, _rss_anon_kib())
                del pixels
        return torch.tensor([before, peak])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_a_loader_worker_does_not_hold_the_disk_cache(tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(300):  # 300 rows of 256x256x3: a 56 MiB cache file, read three times by the worker
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(paths[-1])
    pre = Preprocessor(size=(256, 256))
    cache = open_cache(paths, pre, "disk", tmp_path / "cache", processes=1)
    assert cache.images.nbytes > 50 * 2**20
    loader = torch.utils.data.DataLoader(_RssProbe(cache.images.decode, paths), num_workers=1, batch_size=None)
    before, peak = next(iter(loader)).tolist()
    assert (peak - before) * 1024 < 8 * 2**20, f"worker private memory grew {peak - before} KiB"
    assert len(pickle.dumps(cache.images)) < 2**20  # what a spawned worker receives: the file's name, not pixels
    meta = json.loads(next((tmp_path / "cache").glob("*.json")).read_text())
    assert meta["size"] == [256, 256]


def test_no_files_build_no_disk_cache(tmp_path: Path) -> None:
    cache = open_cache([], Preprocessor(size=(32, 32)), "disk", tmp_path / "cache")
    assert cache.errors == {} and cache.images.rows == {} and not (tmp_path / "cache").exists()
