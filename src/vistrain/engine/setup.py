"""What differs between tasks when a fold is set up: the model, the loaders, the task object.

``SETUPS[cfg.task](cfg, data, fold, device)`` returns a ``FoldSetup``; the Trainer's folds and epochs
(``engine/trainer.py``) and the loop (``engine/loop.py``) are shared by every task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from vistrain.config.schema import Config
from vistrain.data.aug_splits import SplitViews, collate_splits
from vistrain.data.cache import RunCache
from vistrain.data.dataset import ImageDataset, worker_init
from vistrain.data.preprocess import Preprocessor
from vistrain.data.samplers import SAMPLERS, EpochBatches, RepeatedAugment, domain_ratio_sampler
from vistrain.data.transforms import TrainTransform, to_uint8_tensor
from vistrain.engine import device as dev
from vistrain.engine.distributed import SINGLE, DistInfo, EvalShard, RankShare
from vistrain.engine.tasks import ClassificationTask, EmbeddingTask, RetrievalEval
from vistrain.errors import UserError
from vistrain.models.build import build_model
from vistrain.models.init import init_weights
from vistrain.models.losses import LOSSES

if TYPE_CHECKING:
    from vistrain.data.prepare import Prepared


JSD_ALPHA = 12  # augment.splits: weight of the Jensen-Shannon term (timm's and the AugMix paper's)


@dataclass
class FoldSetup:
    model: nn.Module
    preprocessor: Preprocessor  # the deterministic preprocessing: what inference must reproduce
    train_loader: DataLoader
    valid_loader: DataLoader
    task: Any  # ClassificationTask | EmbeddingTask
    params: nn.Module | list[dict[str, Any]]  # what the optimiser gets (a module: timm's decay filtering)
    n_valid: int
    keep_valid_outputs: bool  # classification: the best epoch's logits become the OOF logits
    weights: str = "random init"  # where the starting weights came from, for the [MODEL] line


def _model_and_config(cfg: Config, classes: list, device: torch.device, fold: int
                      ) -> tuple[nn.Module, Preprocessor, str]:
    """The fold's model with its starting weights, the run's preprocessing, and where the weights came from."""
    model = build_model(cfg.task, cfg.model, len(classes), pretrained=True)
    pre = Preprocessor.from_config(cfg)
    weights = init_weights(model, cfg.model, fold, classes, pre)  # a source of other classes or pixels is said
    model.to(device)
    if cfg.train.channels_last is True:  # "auto" is resolved for the machine before any fold starts
        model.to(memory_format=torch.channels_last)
    return model, pre, weights


def _loaders(cfg: Config, train_paths: np.ndarray, train_labels: np.ndarray, valid_paths: np.ndarray,
             valid_labels: np.ndarray, pre: Preprocessor, device: torch.device, info: DistInfo,
             train_domains: np.ndarray | None = None, cache: RunCache | None = None) -> tuple[DataLoader, DataLoader]:
    """Both decode with ``pre.load`` (file -> deterministic uint8 pixels), or read the very same pixels from
    ``cache``; training augments those pixels (``TrainTransform``), validation only normalises them, as inference
    does. ``train_domains``: each training
    item's domain; with ``data.sources`` ratios the epoch follows them."""
    t = cfg.train
    decode = cache.images.decode if cache else pre.load
    # augment.device: cuda: the loader yields uint8 pixels and the loop augments whole batches on the GPU
    augment = to_uint8_tensor if cfg.augment.device == "cuda" else TrainTransform(cfg.augment, pre)
    collate = None
    if cfg.augment.splits:  # the clean view and K - 1 augmented ones, in timm's batch layout
        augment, collate = SplitViews(pre.normalize, augment, cfg.augment.splits), collate_splits
    train_ds = ImageDataset(train_paths, train_labels.tolist(), augment, decode)
    valid_ds = ImageDataset(valid_paths, valid_labels.tolist(), pre.normalize, decode)
    workers = dev.auto_workers(t.num_workers, device)
    common = {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0,
              "worker_init_fn": worker_init if workers else None}
    if workers and device.type == "cuda":
        common["prefetch_factor"] = 4  # batches queued per worker: a slow batch does not stall the device
    # Each loader draws its workers' base seed from a generator of its own, never from torch's global one: that
    # stream (dropout) must be where the last checkpoint left it when a resumed run trains, whichever loader
    # started its workers first.
    train_loader = DataLoader(train_ds, batch_sampler=train_batches(cfg, train_labels, train_domains, info),
                              collate_fn=collate, generator=torch.Generator(), **common)
    eval_batch = cfg.eval.batch_size or t.batch_size * 2
    # several processes: each rank evaluates its own whole batches; the loop gathers them on rank 0 in order
    shard = EvalShard(len(valid_ds), eval_batch, info.rank, info.world) if info.enabled else None
    valid_loader = DataLoader(valid_ds, batch_size=eval_batch, sampler=shard, shuffle=False,
                              generator=torch.Generator(), **common)
    return train_loader, valid_loader


def train_batches(cfg: Config, labels: np.ndarray, domains: np.ndarray | None = None, info: DistInfo = SINGLE
                  ) -> EpochBatches:
    """The training loader's batch sampler (``sampler``, ``augment.repeats``, ``data.sources`` ratios) for this
    rank: ``EpochBatches`` over the sampler that draws each epoch from a generator it reseeds."""
    t, s, repeats = cfg.train, cfg.sampler, cfg.augment.repeats
    ratios = cfg.data.domain_ratios()
    order = torch.Generator()  # the epoch's draw: EpochBatches reseeds it every epoch
    if s.name == "pk":
        from vistrain.data.samplers import pk_sampler

        pk = pk_sampler(labels.tolist(), order, p=s.p, k=s.k, rank=info.rank, world_size=info.world)
        return EpochBatches(pk, order, rank=info.rank)
    if repeats > 1:  # timm's sampler deals the repeated epoch to the ranks itself
        sampler = RepeatedAugment(len(labels), order, repeats, info.rank, info.world)
    elif ratios and domains is not None:  # weighted: classes balanced too, within the domain shares
        sampler = domain_ratio_sampler(labels.tolist(), order, domains, ratios, balance_classes=s.name == "weighted")
    else:
        sampler = SAMPLERS.lookup(s.name)(labels.tolist(), order)
    if info.enabled and repeats <= 1:  # every rank draws the same order (same seed) and keeps its own share
        sampler = RankShare(sampler, info.rank, info.world)
    return EpochBatches(sampler, order, t.batch_size, drop_last=len(sampler) > t.batch_size,  # no 1-image BN
                        rank=info.rank)


def _domains(data: Prepared, idx: np.ndarray) -> np.ndarray | None:
    """The domain of each item of ``idx`` in that order ("" where a csv leaves it empty); None without domains."""
    return data.items["domain"].fillna("").astype(str).to_numpy()[idx] if "domain" in data.items.columns else None


def classification_setup(cfg: Config, data: Prepared, fold: int, device: torch.device,
                         info: DistInfo = SINGLE) -> FoldSetup:
    t, a, n_classes = cfg.train, cfg.augment, len(data.classes)
    paths = data.items["path"].to_numpy()
    train_idx, valid_idx = data.fold_indices(fold)
    model, pre, start = _model_and_config(cfg, data.classes, device, fold)
    y_train = data.targets[train_idx]
    train_loader, valid_loader = _loaders(cfg, paths[train_idx], y_train, paths[valid_idx], data.targets[valid_idx],
                                          pre, device, info, _domains(data, train_idx), data.cache)
    weights = None
    if t.class_weights == "balanced":
        counts = np.bincount(y_train, minlength=n_classes).astype(np.float64)
        w = np.where(counts > 0, len(y_train) / (n_classes * np.maximum(counts, 1)), 0.0)
        weights = torch.tensor(w, dtype=torch.float32, device=device)
    elif t.class_weights == "from_class_map" and data.class_map is not None:  # the config requires the map
        weights = torch.tensor(data.class_map.weights(), dtype=torch.float32, device=device)
    mixup = None
    if a.mixup_alpha > 0 or a.cutmix_alpha > 0:
        if t.batch_size % 2:
            raise UserError(f"train.batch_size: mixup/cutmix needs an even batch size; got {t.batch_size}")
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha, prob=a.mix_prob,
                      switch_prob=a.mix_switch_prob, label_smoothing=t.label_smoothing, num_classes=n_classes)
    if a.splits:  # the config allows neither class weights nor mixing with the splits
        from timm.loss import JsdCrossEntropy

        criterion = JsdCrossEntropy(num_splits=a.splits, alpha=JSD_ALPHA, smoothing=t.label_smoothing)
    else:  # with mixup the smoothing is already inside the soft targets
        criterion = LOSSES.lookup(t.loss)(weights, 0.0 if mixup else t.label_smoothing)
    task = ClassificationTask(criterion, mixup, _domains(data, valid_idx), mix_seed=(cfg.project.seed, fold))
    return FoldSetup(model, pre, train_loader, valid_loader, task, model, len(valid_idx), True, start)


def embedding_setup(cfg: Config, data: Prepared, fold: int, device: torch.device,
                    info: DistInfo = SINGLE) -> FoldSetup:
    """Train on ``split == train``; validate queries (re-id: query, retrieval: val) against a gallery
    (re-id: the gallery folder, retrieval: the training images; data.split_classes: none, each val image against
    the other val images, whose classes training never saw), queries first."""
    from vistrain.models.heads import margin_at_epoch
    from vistrain.models.losses import EMBEDDING_LOSSES

    m, t, e = cfg.model, cfg.train, cfg.eval
    split = data.items["split"].to_numpy()
    reid = "query" in set(split)
    q_idx = np.flatnonzero(split == ("query" if reid else "val"))
    leave_one_out = cfg.data.split_classes and not reid
    g_idx = np.flatnonzero(split == ("gallery" if reid else "none" if leave_one_out else "train"))
    train_idx = np.flatnonzero(split == "train")
    if len(q_idx) == 0:
        raise UserError("data.val_ratio: the split left no validation queries; raise data.val_ratio or add images")
    model, pre, start = _model_and_config(cfg, data.classes, device, fold)
    paths = data.items["path"].to_numpy()
    v_idx = np.concatenate([q_idx, g_idx])
    train_loader, valid_loader = _loaders(cfg, paths[train_idx], data.targets[train_idx], paths[v_idx],
                                          data.eval_codes[v_idx], pre, device, info, _domains(data, train_idx),
                                          data.cache)
    feat_dim = model.num_features
    terms = []
    for term in cfg.loss.terms:
        module = EMBEDDING_LOSSES[term.name](len(data.classes), feat_dim, **(term.model_extra or {}))
        terms.append((term.name, term.weight, module.to(device)))
    cams = data.items["camera"].to_numpy()[v_idx].astype(np.int64) if reid else None
    evaluation = RetrievalEval(len(q_idx), data.eval_codes[v_idx], cams, e.feat_norm, e.flip_feats, e.knn_k,
                               e.max_rank, e.memory_budget_mb, e.rerank, "cuda" if device.type == "cuda" else None,
                               recall_ks=tuple(e.recall_ks), leave_one_out=leave_one_out)
    warm = t.freeze_backbone_epochs or int(np.ceil(t.warmup_epochs))
    margin: Callable[[int], float] | None = None
    if m.head != "linear":
        def margin(epoch: int) -> float:
            return margin_at_epoch(epoch, warm, m.arcface_m_warmup, m.arcface_m_finetune, m.margin_ramp_epochs)
    task = EmbeddingTask(terms, evaluation, margin, t.freeze_backbone_epochs)
    params = model.param_groups(t.lr, t.backbone_lr_mult, t.weight_decay)
    return FoldSetup(model, pre, train_loader, valid_loader, task, params, len(v_idx), False, start)


def batch_transform(cfg: Config, pre: Preprocessor, device: torch.device) -> nn.Module | None:
    """The loop's transform of each training batch on the device (``LoopOptions.batch_transform``): with
    augment.device: cuda the policy on whole uint8 batches (``data.device_augment``), else None."""
    if cfg.augment.device != "cuda":
        return None
    from vistrain.data.device_augment import DeviceAugment

    return DeviceAugment(cfg.augment, pre).to(device)


def fold_seed(seed: int, fold: int) -> int:
    """The seed of fold ``fold``'s epochs (``TrainState.seed``): its batches and every item's augmentation."""
    return seed * 1000 + fold * 100_000


SETUPS: dict[str, Callable[[Config, Any, int, torch.device, DistInfo], FoldSetup]] = {
    "classification": classification_setup,
    "embedding": embedding_setup,
}
