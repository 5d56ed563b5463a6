"""``augment.repeats`` (issue 22 item 3): timm's repeated augmentation. The training loader's epoch is the order
of timm's own ``RepeatAugSampler`` (its epoch seed: the fold's seed + the epoch, which vistrain reseeds every epoch
with), on one process and under DDP; every copy of an image gets its own augmentation; a run stopped in the middle
of an epoch resumes bit for bit; the samplers it cannot be combined with are refused in one line."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import only_run_dir, tiny_config, write_csv_dataset, write_yaml
from timm.data.distributed_sampler import RepeatAugSampler

from vistrain.config import load_config
from vistrain.config.loader import validate
from vistrain.engine.distributed import DistInfo
from vistrain.errors import ConfigError, Preempted


def repeat_config(repeats: int, batch_size: int, **sampler: Any) -> Any:
    raw = tiny_config(Path("/unused"), augment={"policy": "none", "repeats": repeats},
                      train={"batch_size": batch_size})
    if sampler:
        raw["sampler"] = sampler
    return validate(raw)


def train_batches(*args: Any) -> Any:
    from vistrain.engine.setup import train_batches as batches  # the training loader's batch sampler

    return batches(*args)


def timm_order(n: int, world: int, rank: int, repeats: int, epoch: int) -> list[int]:
    sampler = RepeatAugSampler(range(n), num_replicas=world, rank=rank, shuffle=True, num_repeats=repeats)
    sampler.set_epoch(epoch)
    return list(sampler)


# (images, processes, repeats, epoch, batch): small data, several ranks, and n >= 256 where timm rounds the epoch
# to a multiple of 256 per rank.
CASES = [(10, 1, 3, 0, 4), (37, 2, 3, 5, 4), (25, 3, 4, 2, 2), (600, 4, 3, 1, 8), (300, 1, 2, 3, 16)]


@pytest.mark.parametrize(("n", "world", "repeats", "epoch", "batch"), CASES)
def test_each_ranks_epoch_is_timms_repeat_aug_sampler_order(n: int, world: int, repeats: int, epoch: int,
                                                            batch: int) -> None:
    cfg, seed = repeat_config(repeats, batch), 7000
    for rank in range(world):
        batches = train_batches(cfg, np.zeros(n, dtype=np.int64), None, DistInfo(rank=rank, world=world))
        batches.set_epoch(seed, epoch)
        got = [item for b in batches for item in b]
        want = timm_order(n, world, rank, repeats, seed + epoch)
        if len(want) > batch:  # the training loader drops a short last batch (no 1-image BatchNorm)
            want = want[: len(want) // batch * batch]
        assert [item.index for item in got] == want, f"rank {rank}"
        assert len({item.seed for item in got}) == len(got), "each copy of an image is augmented with its own seed"
        assert len(batches) == len(want) // batch if len(want) > batch else 1


def test_the_copies_of_an_image_go_to_different_ranks_and_each_is_shown_repeats_times() -> None:
    """n = 12, 3 repeats, 3 ranks: timm deals the 36 copies round-robin and keeps n / world = 4 per rank, so the
    epoch shows 4 images, each once on every rank."""
    n, world, repeats = 12, 3, 3
    cfg = repeat_config(repeats, 2)
    shares = []
    for rank in range(world):
        batches = train_batches(cfg, np.zeros(n, dtype=np.int64), None, DistInfo(rank=rank, world=world))
        batches.set_epoch(1, 0)
        shares.append([item.index for b in batches for item in b])
    assert [len(s) for s in shares] == [4, 4, 4]  # timm: ceil(12 / 3) per rank
    assert shares[0] == shares[1] == shares[2], "the 3 copies of an image are on the 3 ranks at the same position"
    counts = np.bincount(np.concatenate(shares), minlength=n)
    assert sorted(set(counts.tolist())) == [0, 3], "an image of the epoch is shown exactly 3 times, over the ranks"


def test_repeats_0_and_1_leave_the_epoch_as_it_was() -> None:
    labels = np.zeros(20, dtype=np.int64)
    epochs = []
    for repeats in (0, 1):
        batches = train_batches(repeat_config(repeats, 4), labels)
        batches.set_epoch(5, 2)
        epochs.append([item for b in batches for item in b])
    want = torch.randperm(20, generator=torch.Generator().manual_seed(7)).tolist()
    assert [item.index for item in epochs[0]] == want  # RandomSampler with the generator seeded seed + epoch
    assert epochs[0] == epochs[1]


RATIOS = {"sources": [{"name": name, "ratio": 0.5, "train_csv": f"/x/{name}.csv", "image_dir_train": f"/x/{name}"}
                      for name in ("a", "b")]}


@pytest.mark.parametrize(("section", "values", "words"), [
    ("sampler", {"name": "pk"}, ["augment.repeats: 3", "sampler.name: pk", "sampler.name: random"]),
    ("sampler", {"name": "weighted"}, ["augment.repeats: 3", "sampler.name: weighted", "sampler.name: random"]),
    ("data", RATIOS, ["augment.repeats: 3", "data.sources"]),
], ids=["pk", "weighted", "domain-ratios"])
def test_repeats_with_a_sampler_that_has_no_shuffled_epoch_is_refused(section: str, values: dict,
                                                                      words: list[str]) -> None:
    raw = tiny_config(Path("/x"), augment={"repeats": 3})
    if section == "data":
        raw["data"] = {"folds": 2, "valid_fold": 0, **values}
    else:
        raw[section] = values
    with pytest.raises(ConfigError) as err:
        validate(raw)
    text = str(err.value)
    assert "\n" not in text and all(w in text for w in words), text


def test_a_triplet_embedding_run_which_takes_pk_batches_refuses_repeats() -> None:
    raw = tiny_config(Path("/x"), augment={"repeats": 2})
    raw["task"] = "embedding"
    raw["data"] = {"source": "csv", "train_csv": "/x/t.csv", "image_dir_train": "/x/t"}
    with pytest.raises(ConfigError, match="sampler.name: pk"):
        validate(raw)


# ------------------------------------------------------------------------------------------ resume


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv_dataset(tmp_path_factory.mktemp("repeats") / "data", per_class=6, size=32).root


def config(data: Path, root: Path) -> Path:
    raw = tiny_config(data, augment={"policy": "hard", "repeats": 3},
                      train={"batch_size": 2, "epochs": 2, "num_threads": 1, "amp": "fp32"},
                      model={"drop_rate": 0.2}, tracking={"tensorboard": False})
    raw["output"] = {"exp_dir": str(root / "exp"), "logs_dir": None}
    return write_yaml(root / "cfg.yaml", raw)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "ckpt" / "last_fold0.pth", weights_only=True)["model"]


def test_a_run_with_repeats_stopped_mid_epoch_resumes_bit_equal(data: Path, tmp_path: Path) -> None:
    from vistrain.engine.hooks import Hook
    from vistrain.engine.training import run_train

    class Stop(Hook):
        name = "stop_at"

        def after_step(self, fold: Any, step: Any) -> None:
            if fold.state.epoch == 1 and step.index == 2:
                signal.raise_signal(signal.SIGUSR1)

    class Epochs(Hook):  # runs after EpochOrder has set the loader to the epoch
        name = "epochs"
        seen: list[tuple[int, int, list[int]]] = []

        def before_epoch(self, fold: Any) -> None:
            batches = fold.train_loader.batch_sampler
            self.seen.append((fold.state.seed, fold.state.epoch, [i.index for b in batches for i in b]))

    whole = run_train(load_config(config(data, tmp_path / "whole")), hooks=[Epochs()])
    assert [e for _, e, _ in Epochs.seen] == [0, 1]
    for seed, epoch, order in Epochs.seen:  # 9 training images, batches of 2: the last, short one dropped
        assert order == timm_order(9, 1, 0, 3, seed + epoch)[:8], "the run trains timm's repeated epoch"
    cfg = load_config(config(data, tmp_path / "stopped"), overrides=["train.requeue_exit_code=0"])
    with pytest.raises(Preempted):
        run_train(cfg, hooks=[Stop()])
    run = only_run_dir(tmp_path / "stopped" / "exp")
    last = torch.load(run / "ckpt" / "last_fold0.pth", weights_only=True)
    assert last["epoch"] == 1 and 0 < last["step"] < 4, "stopped in the middle of epoch 2 (4 batches)"
    run_train(cfg, resume=True)
    assert json.loads((run / "run.json").read_text())["status"] == "success"
    a, b = weights(whole.run_dir), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (whole.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in want]
