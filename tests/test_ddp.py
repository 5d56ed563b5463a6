"""Correct on several processes (DDP, 2 gloo processes on the CPU, timm's train.py as the reference): gradients are
all-reduced once per optimiser update (``no_sync`` on accumulation steps), a short last accumulation group is
divided by its own size, the logged loss and rates are the whole job's, validation is sharded over the ranks and
equals a single process exactly, BatchNorm statistics agree before evaluation, a NaN on one rank stops every rank
at the same step, and the automatic batch size is a global one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from conftest import cli_env, describe, only_run_dir, tiny_config, write_csv_dataset, write_yaml
from torch import nn

from vistrain.config.loader import validate
from vistrain.engine import distributed
from vistrain.engine.device import pick_precision
from vistrain.engine.hooks import FoldRun
from vistrain.engine.loop import LoopOptions, TrainState, evaluate, train_one_epoch
from vistrain.engine.run_setup import Machine, resolve_auto
from vistrain.errors import ConfigError, UserError

CPU = torch.device("cpu")
FP32 = pick_precision("fp32", CPU)
WORLD = 2


class Scheduler:
    def step_update(self, num_updates: int) -> None: ...
    def step(self, epoch: int, metric: Any = None) -> None: ...


class CeTask:
    """Cross-entropy of the model's outputs; a constant validation metric (what is compared is the state)."""

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None: ...

    def training_loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = nn.functional.cross_entropy(model(images), targets)
        return loss, {"loss_ce": loss.detach()}

    def eval_outputs(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model(images)

    def eval_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        return None

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        return {"macro_f1": 0.5}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def make_state(model: nn.Module, lr: float) -> TrainState:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return TrainState(model, optimizer, Scheduler(), torch.amp.GradScaler("cpu", enabled=False), seed=0)


def rank_batches(rank: int, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor, None]]:
    """Each rank's own batches, of a size of its own (4 on rank 0, 2 on rank 1): a plain mean of the two ranks'
    means is not the sample-weighted mean."""
    g = torch.Generator().manual_seed(100 + rank)
    size = 4 if rank == 0 else 2
    return [(torch.randn(size, 4, generator=g), torch.randint(0, 3, (size,), generator=g), None) for _ in range(n)]


# ------------------------------------------------------------------------------------- what each rank does

def _train_epoch(info: distributed.DistInfo, _: Path) -> dict[str, Any]:
    """One epoch at lr 0 (the weights stay the initial ones) with accumulation 2 over 4 batches; the gradient
    all-reduces are counted by a DDP communication hook."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    torch.manual_seed(0)
    ddp = distributed.wrap(nn.Linear(4, 3), info, CPU)
    calls: list[int] = []

    def counted(state, bucket):  # DDP checks a hook's annotations: none, or its own (not strings)
        calls.append(1)
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counted)
    opts = LoopOptions(CPU, FP32, grad_accum_steps=2, log_interval=0, dist=info)
    out = train_one_epoch(make_state(ddp, lr=0.0), CeTask(), rank_batches(info.rank), opts)
    return {"out": out, "allreduces": len(calls)}


def _bn_epoch(info: distributed.DistInfo, _: Path) -> dict[str, Any]:
    """One epoch of a model with BatchNorm on each rank's own data (lr 0), then the trainer's validation."""
    from vistrain.engine.trainer import run_epochs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    ddp = distributed.wrap(model, info, CPU)
    opts = LoopOptions(CPU, FP32, log_interval=0, dist=info)
    fold = FoldRun(fold=0, state=make_state(ddp, lr=0.0), task=CeTask(), train_loader=rank_batches(info.rank, 1),
                   valid_loader=[(torch.zeros(2, 4), torch.tensor([0, 1]), None)], opts=opts, epochs=1,
                   monitor="macro_f1", info=info)
    run_epochs(fold)
    return {"running_mean": model[1].running_mean.clone(), "running_var": model[1].running_var.clone()}


def _eval_setup(info: distributed.DistInfo, root: Path) -> dict[str, Any]:
    """The real classification setup's validation loader and the loop's ``evaluate``; every image the model sees
    is counted."""
    from vistrain.data.prepare import prepare_data
    from vistrain.engine.checkpoint import seed_everything
    from vistrain.engine.setup import classification_setup

    cfg = validate(json.loads((root / "cfg.json").read_text()))
    data = prepare_data(cfg)
    seed_everything(7)
    setup = classification_setup(cfg, data, 0, CPU, info)
    seen = [0]
    real = setup.task.eval_outputs

    def counted(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        seen[0] += images.shape[0]
        return real(model, images)

    setup.task.eval_outputs = counted
    loss, outputs, targets = evaluate(setup.model, setup.task, setup.valid_loader,
                                      LoopOptions(CPU, FP32, dist=info))
    metrics = setup.task.metrics(outputs, targets) if outputs is not None else None
    return {"seen": seen[0], "n_valid": setup.n_valid, "loss": loss, "outputs": outputs, "targets": targets,
            "metrics": metrics}


SCENARIOS = {"train_epoch": _train_epoch, "bn_epoch": _bn_epoch, "eval_setup": _eval_setup}


def _rank_main(rank: int, world: int, port: int, root: Path, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = distributed.init_distributed()
    try:
        for name in names:
            torch.save(SCENARIOS[name](info, root), root / f"{name}_rank{rank}.pt")
    finally:
        distributed.shutdown(info)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eval_config(root: Path) -> dict[str, Any]:
    """18 images in 2 folds (9 to validate: an odd number); evaluation batches of 2, so the last one is partial."""
    data = write_csv_dataset(root / "data", per_class=6)
    return tiny_config(data.root, data={"cache": "off"}, eval={"batch_size": 2})


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every scenario on 2 gloo processes (one start for all: starting processes is the slow part)."""
    root = tmp_path_factory.mktemp("ddp")
    (root / "cfg.json").write_text(json.dumps(eval_config(root)))
    ctx = mp.start_processes(_rank_main, args=(WORLD, free_port(), root, list(SCENARIOS)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2 processes did not finish within 240 s (a rank waits in a collective)")
    return {name: [torch.load(root / f"{name}_rank{r}.pt", weights_only=False) for r in range(WORLD)]
            for name in SCENARIOS}


# ---------------------------------------------------------------------------------------------- the tests

@pytest.mark.dist
def test_logged_train_loss_is_the_sample_weighted_mean_over_ranks(two_ranks: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)  # the weights every rank starts from (and keeps, at lr 0)
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(model(x), y, reduction="sum")
                  for r in range(WORLD) for x, y, _ in rank_batches(r)]
    images = sum(x.shape[0] for r in range(WORLD) for x, _, _ in rank_batches(r))
    expected = float(sum(losses)) / images  # 24 images: 16 on rank 0, 8 on rank 1
    for rank in two_ranks["train_epoch"]:
        assert rank["out"]["train_loss"] == pytest.approx(expected, rel=1e-6)
        assert rank["out"]["loss_ce"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.dist
def test_rates_are_the_whole_jobs(two_ranks: dict[str, Any]) -> None:
    """img_per_s is the sum over the ranks and data_wait_frac their mean: one value, the same on every rank."""
    first, second = (r["out"] for r in two_ranks["train_epoch"])
    assert first["img_per_s"] == second["img_per_s"] and first["data_wait_frac"] == second["data_wait_frac"]


@pytest.mark.dist
def test_accumulation_steps_do_not_all_reduce_gradients(two_ranks: dict[str, Any]) -> None:
    """4 batches with grad_accum_steps 2: the gradients cross the ranks at the 2 optimiser updates only."""
    for rank in two_ranks["train_epoch"]:
        assert rank["allreduces"] == 2


@pytest.mark.dist
def test_batchnorm_statistics_are_averaged_over_ranks_before_validation(two_ranks: dict[str, Any]) -> None:
    """train.sync_bn: false: timm's distribute_bn (reduce) before evaluation: every rank holds the mean of the ranks'
    running statistics, recomputed here from each rank's batch (momentum 0.1 from 0 and 1)."""
    torch.manual_seed(0)
    first = nn.Linear(4, 5)  # the layer before the BatchNorm, as every rank builds it
    means, variances = [], []
    with torch.no_grad():
        for r in range(WORLD):
            (x, _, _), = rank_batches(r, 1)
            h = first(x)
            means.append(0.1 * h.mean(0))
            variances.append(0.9 + 0.1 * h.var(0, unbiased=True))
    for rank in two_ranks["bn_epoch"]:
        torch.testing.assert_close(rank["running_mean"], (means[0] + means[1]) / 2)
        torch.testing.assert_close(rank["running_var"], (variances[0] + variances[1]) / 2)


@pytest.mark.dist
def test_sharded_validation_equals_a_single_process_exactly(two_ranks: dict[str, Any], tmp_path: Path) -> None:
    """Each rank evaluates its own whole batches (no padding duplicates, no image twice); rank 0 gathers them in
    order: outputs, loss and metrics are bit-equal to one process evaluating the same model."""
    ranks = two_ranks["eval_setup"]
    n = ranks[0]["n_valid"]
    assert n % 2 == 1 and [r["seen"] for r in ranks] == [4, n - 4], "2 whole batches of 2 on rank 0, the rest on 1"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: CPU kernels split over another number of threads round differently
    try:
        single = _eval_setup(distributed.SINGLE, _single_root(tmp_path))
    finally:
        torch.set_num_threads(threads)
    assert single["seen"] == n
    main = ranks[0]
    assert torch.equal(main["outputs"], single["outputs"]) and torch.equal(main["targets"], single["targets"])
    assert main["loss"] == single["loss"] and main["metrics"] == single["metrics"]
    assert ranks[1]["outputs"] is None, "only rank 0 gathers the outputs"


def _single_root(tmp_path: Path) -> Path:
    (tmp_path / "cfg.json").write_text(json.dumps(eval_config(tmp_path)))
    return tmp_path


# ------------------------------------------------------------------------------------ one process suffices

def test_a_short_last_accumulation_group_is_divided_by_its_own_size() -> None:
    """3 batches with grad_accum_steps 2: the first update averages batches 1-2, the second is batch 3 alone (timm:
    the last group's loss is divided by its own length, not by grad_accum_steps)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    batches = rank_batches(0, 3)
    train_one_epoch(make_state(model, lr=1.0), CeTask(), batches, LoopOptions(CPU, FP32, grad_accum_steps=2,
                                                                              log_interval=0))
    w, b = start["weight"].clone().requires_grad_(), start["bias"].clone().requires_grad_()
    for group in (batches[:2], batches[2:]):
        loss = sum(nn.functional.cross_entropy(x @ w.T + b, y) for x, y, _ in group) / len(group)
        gw, gb = torch.autograd.grad(loss, (w, b))
        w, b = (w - gw).detach().requires_grad_(), (b - gb).detach().requires_grad_()
    torch.testing.assert_close(model.weight, w.detach())
    torch.testing.assert_close(model.bias, b.detach())


def test_sync_bn_key() -> None:
    cfg = tiny_config(Path("/data"))
    assert validate({**cfg, "train": {**cfg["train"], "sync_bn": True}}).train.sync_bn is True
    assert validate(cfg).train.sync_bn is False
    with pytest.raises(ConfigError, match="train.sync_bn"):
        validate({**cfg, "train": {**cfg["train"], "sync_bn": "sometimes"}})


def test_sync_bn_converts_every_batchnorm_keeping_parameters_and_keys() -> None:
    """What the trainer does before the DDP wrap: timm's convert_sync_batchnorm (BatchNormAct2d too), same parameters
    (the optimiser's), same state_dict keys (checkpoints load into a plain model); one process has nothing to
    synchronise; a CPU cannot (torch's SyncBatchNorm runs on GPUs): exit 2 naming the key."""
    import timm

    model = timm.create_model("resnet10t", num_classes=3)
    params, keys = list(model.parameters()), list(model.state_dict())
    assert distributed.sync_batchnorm(model, distributed.SINGLE, CPU) is model
    converted = distributed.sync_batchnorm(model, distributed.DistInfo(0, 2, 0), torch.device("cuda"))
    bns = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)
    assert all(a is b for a, b in zip(converted.parameters(), params, strict=True))
    assert list(converted.state_dict()) == keys
    with pytest.raises(UserError, match=r"^train.sync_bn: true needs CUDA devices"):
        distributed.sync_batchnorm(model, distributed.DistInfo(0, 2, 0), CPU)


@pytest.mark.parametrize(("world", "batch", "accum"), [(1, 32, 2), (2, 32, 1), (4, 16, 1), (3, 22, 1)])
def test_automatic_batch_size_reaches_the_global_target(world: int, batch: int, accum: int) -> None:
    """train.batch_size: auto (32 on a CPU) with target_batch_size 64: batch x accumulation x processes >= 64, and
    no more processes than needed multiply it."""
    raw = tiny_config(Path("/data"))
    raw["train"].update(batch_size="auto", batch_size_cpu=32, target_batch_size=64)
    t = resolve_auto(validate(raw), Machine(CPU, FP32), 3, cached=False, world=world).train
    assert (t.batch_size, t.grad_accum_steps) == (batch, accum)
    assert t.batch_size * t.grad_accum_steps * world >= 64


# ------------------------------------------------------------------------------ a NaN on one rank (the CLI)

NAN_ON_RANK1 = """
import os, sys
from vistrain.engine.tasks import ClassificationTask
from vistrain.cli import main

real, calls = ClassificationTask.training_loss, []

def training_loss(self, model, images, targets):
    loss, parts = real(self, model, images, targets)
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:  # rank 1's second step only: rank 0's own loss stays finite
        loss = loss * float("nan")
    return loss, parts

ClassificationTask.training_loss = training_loss
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.dist
def test_a_nan_on_rank_1_only_stops_both_ranks_at_the_same_step(tmp_path: Path) -> None:
    data = write_csv_dataset(tmp_path / "data", per_class=8)  # fold 0 trains 12 images: 3 steps of 2 per rank
    cfg = tiny_config(data.root, data={"cache": "off"}, train={"batch_size": 2, "epochs": 1, "log_interval": 1},
                      output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None}, tracking={"tensorboard": False})
    config = write_yaml(tmp_path / "cfg.yaml", cfg)
    script = tmp_path / "nan_on_rank1.py"
    script.write_text(NAN_ON_RANK1)
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = {**cli_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD)}
        procs.append(subprocess.Popen([sys.executable, str(script), "train", "--config", str(config)], cwd=tmp_path,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    deadline = time.monotonic() + 60
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"rank {len(results)} still running after 60 s: it waits for a rank that stopped")
    message = "training loss is nan at fold 0 epoch 1 step 2;"
    for result in results:
        assert result.returncode == 1, describe(result)
        assert message in result.stderr, describe(result)
    assert sum(r.stdout.count("[DIVERGED]") + r.stderr.count("[DIVERGED]") for r in results) == 1
    run = only_run_dir(tmp_path / "exp")
    assert json.loads((run / "run.json").read_text())["status"] == "diverged"
