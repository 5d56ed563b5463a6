"""Task objects: what the shared loop asks of a task (its loss, its eval outputs, its metrics)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vistrain.engine.distributed import unwrap
from vistrain.metrics.classification import epoch_metrics, macro_f1, per_domain_metrics


class ClassificationTask:
    """Logits [B, C] from the model; CE (optionally on mixup/cutmix soft targets) for training.

    ``valid_domains`` [N_valid]: the domain of each validation item in loader order (``None``: the data has no
    domain column); the metrics then add ``top1@<d>``, ``top5@<d>`` and ``macro_f1@<d>`` per domain.
    """

    def __init__(self, criterion: nn.Module, mixup: object | None = None, valid_domains: np.ndarray | None = None,
                 mix_seed: tuple[int, ...] = (0,)):
        self.criterion = criterion
        self.mixup = mixup  # timm.data.Mixup: images, labels [B] -> mixed images, soft targets [B, C]
        self.valid_domains = valid_domains
        self.mix_seed = mix_seed  # (project.seed, fold): with the count below, the seed of each batch's mixing
        self.mixed = 0  # batches mixed so far in the fold: the task's state in the last checkpoint

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"mixed": self.mixed}

    def load_state_dict(self, state: dict) -> None:
        self.mixed = state.get("mixed", 0)  # a checkpoint of vistrain before this kept none

    def training_loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.mixup is not None and len(images) > 1:
            images, targets = self.mix_batch(images, targets, self.mixed)
            self.mixed += 1
        return self.criterion(model(images), targets), {}

    def mix_batch(self, images: torch.Tensor, targets: torch.Tensor, mixed: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch the model is given after ``mixed`` batches of the fold were mixed: mixup / cutmix (soft targets
        [B, C]) when configured, else the batch as it is (``vistrain augment`` draws it)."""
        if self.mixup is None or len(images) < 2:
            return images, targets
        if len(images) % 2:  # timm mixes pairs: an odd last batch gives up one image
            images, targets = images[:-1], targets[:-1]
        # timm's Mixup draws (mixup or cutmix, lambda, the box) from NumPy's global generator: seeded for each
        # batch from (seed, fold, batches mixed so far), so a resumed fold mixes its next batch as the
        # uninterrupted one would, whatever else used that generator in between.
        np.random.seed(np.random.SeedSequence((*self.mix_seed, mixed)).generate_state(1)[0])
        return self.mixup(images, targets)

    def eval_outputs(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model(images)

    def eval_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Plain NLL on the validation set: comparable across label smoothing and class weight settings.
        return F.cross_entropy(outputs, targets)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        row = epoch_metrics(outputs, targets)
        if self.valid_domains is not None:
            row.update(per_domain_metrics(outputs, targets, self.valid_domains))
        return row


@dataclass
class RetrievalEval:
    """Who is query and who is gallery in the validation loader's output, and how to score them.

    The validation loader yields the ``n_query`` query items first, then the gallery items. ``leave_one_out``
    (retrieval with ``data.split_classes``): there is no separate gallery; each item queries all the others.
    """

    n_query: int
    labels: np.ndarray  # [Nq + Ng] identity / class codes (equal code = a match)
    cameras: np.ndarray | None  # [Nq + Ng] for re-id (same person + same camera is not a match); None: retrieval
    feat_norm: bool = True
    flip: bool = False
    knn_k: int = 5
    max_rank: int = 50
    memory_budget_mb: int = 1024
    rerank: bool = False
    device: str | None = None  # "cuda": rank on the GPU (the exact full ranking, chunked); None: NumPy on the CPU
    recall_ks: tuple[int, ...] = (1, 5)  # retrieval: report (knn_)recall@K for each K (eval.recall_ks)
    leave_one_out: bool = False  # data.split_classes: recall@K of each item against the others, on unseen classes


class EmbeddingTask:
    """A metric-learning model: weighted loss terms on its training outputs, embeddings at evaluation.

    ``terms`` are (name, weight, module) with ``module(out, labels) -> scalar``; each is logged as
    ``loss_<name>``. Re-id runs report mAP, rank1/5/10 and mINP; retrieval runs knn_recall@K (K in
    ``evaluation.recall_ks``), kNN accuracy and kNN macro F1, or with ``data.split_classes`` recall@K alone.
    """

    def __init__(self, terms: list[tuple[str, float, nn.Module]], evaluation: RetrievalEval,
                 margin_at: Callable[[int], float] | None = None, freeze_epochs: int = 0):
        self.terms = terms
        self.eval = evaluation
        self.margin_at = margin_at
        self.freeze_epochs = freeze_epochs

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        model = unwrap(model)
        if self.margin_at is not None:
            model.set_margin(self.margin_at(epoch))
        model.freeze_backbone(epoch < self.freeze_epochs)
        for _, _, module in self.terms:
            module.train()

    def training_loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(images, targets)
        parts = {f"loss_{name}": weight * module(out, targets) for name, weight, module in self.terms}
        total = torch.stack(list(parts.values())).sum()
        return total, {k: v.detach() for k, v in parts.items()}  # tensors: the loop reads them when it logs

    def mix_batch(self, images: torch.Tensor, targets: torch.Tensor, mixed: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        return images, targets  # metric learning mixes no images

    def eval_outputs(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        feats = model(images).float()
        if self.eval.flip:
            feats = (feats + model(torch.flip(images, dims=[-1])).float()) / 2
        return F.normalize(feats, dim=1) if self.eval.feat_norm else feats

    def eval_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        return None  # query identities are not training classes: there is no validation loss

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        return embedding_metrics(outputs.numpy(), self.eval)

    def state_dict(self) -> dict:
        return {name: module.state_dict() for name, _, module in self.terms}

    def load_state_dict(self, state: dict) -> None:
        for name, _, module in self.terms:
            if name in state:
                module.load_state_dict(state[name])


def _reranked_retrieval(q: np.ndarray, g: np.ndarray, gl: np.ndarray, ks: tuple[int, ...], knn_k: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """The neighbours recall@K scores [Q, max(ks, knn_k)] and the kNN vote, from k-reciprocal re-ranked distances
    (as re-id's ``eval.rerank``), in the cosine geometry of the plain retrieval protocol: squared euclidean distance
    of the unit vectors, which re-ranks as cosine distance does. Needs the pooled [Q + G]^2 matrices on the CPU
    (``k_reciprocal_rerank``'s memory note)."""
    from vistrain.metrics import retrieval

    unit = [x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) for x in (q, g)]
    idx = retrieval.nearest_by_distance(retrieval.rerank_features(*unit, metric="euclidean"), max(*ks, knn_k))
    return idx, retrieval.knn_vote(idx[:, :knn_k], gl)


def embedding_metrics(feats: np.ndarray, ev: RetrievalEval, counts: bool = False) -> dict[str, float | int]:
    """``embedding_evaluation``'s figures (the training loop's and ``evaluate``'s)."""
    return embedding_evaluation(feats, ev, counts)[0]


def embedding_evaluation(feats: np.ndarray, ev: RetrievalEval, counts: bool = False
                         ) -> tuple[dict[str, float | int], dict[str, Any]]:
    """Re-id (cameras known) or retrieval + kNN-classification metrics for query-first features [Nq + Ng, D].

    ``counts``: also ``num_valid_queries`` and ``num_skipped`` (re-id queries without a match on another camera;
    leave-one-out: items alone in their class).
    Retrieval with ``ev.leave_one_out`` (``data.split_classes``: the classes are unseen in training): ``recall@K``
    for each K in ``ev.recall_ks``, each item against all the others (``leave_one_out_recall``). Otherwise the
    queries rank the gallery of training images of the same classes, a kNN classifier's view, hence the names:
    ``knn_recall@K``; ``knn_acc`` and ``knn_macro_f1`` of the majority vote of
    the ``ev.knn_k`` nearest gallery items (the whole gallery when it is smaller); with ``ev.rerank`` all rank by
    the k-reciprocal re-ranked distances, as re-id does. ``knn_macro_f1`` averages the
    per-class F1 over every class of the evaluation, i.e. the classes among query **or** gallery labels; a class no
    query holds and the vote never predicts scores 0, as a class of a classifier's run does in ``macro_f1``.

    Also returns the per-query outcomes behind the figures, for the bootstrap intervals: re-id ``ap``, ``inp``,
    ``first_match_rank`` (1-based, 0 when skipped) and ``pid``; retrieval ``first_hit`` (0-based position of the
    first same-class neighbour, ``depth`` when none), ``depth``, ``label`` and ``pred`` (class indices);
    leave-one-out none (empty: no intervals).
    """
    from vistrain.metrics import retrieval

    q, g = feats[: ev.n_query], feats[ev.n_query:]
    ql, gl = ev.labels[: ev.n_query], ev.labels[ev.n_query:]
    if ev.cameras is not None:
        res = retrieval.reid_evaluate(q, g, ql, gl, ev.cameras[: ev.n_query], ev.cameras[ev.n_query:],
                                      max_rank=ev.max_rank, memory_budget_mb=ev.memory_budget_mb, rerank=ev.rerank,
                                      device=ev.device, per_query=True)
        out: dict[str, float | int] = {k: float(res[k]) for k in ("mAP", "rank1", "rank5", "rank10", "mINP")}
        if counts:
            out.update(num_valid_queries=int(res["num_valid_queries"]), num_skipped=int(res["num_skipped"]))
        return out, {"ap": res["ap"], "inp": res["inp"], "first_match_rank": res["first_match_rank"], "pid": ql}
    if ev.leave_one_out:
        recall, n_counted = retrieval.leave_one_out_recall(feats, ev.labels, ev.recall_ks,
                                                           memory_budget_mb=ev.memory_budget_mb, device=ev.device)
        out = dict(recall)
        if counts:
            out.update(num_valid_queries=n_counted, num_skipped=len(feats) - n_counted)
        return out, {}  # no per-query outcomes: no bootstrap intervals for this protocol yet
    k = min(ev.knn_k, len(g))
    if ev.rerank:
        idx, pred = _reranked_retrieval(q, g, gl, ev.recall_ks, k)
    else:
        idx = retrieval.recall_neighbours(q, ql, g, gl, ks=ev.recall_ks, device=ev.device)
        pred = retrieval.knn_classify(q, g, gl, k=k, device=ev.device)
    out = {f"knn_{key}": float(v) for key, v in retrieval.recall_from_neighbours(idx, ql, gl, ev.recall_ks).items()}
    out["knn_acc"] = float((pred == ql).mean())
    classes = np.union1d(ql, gl)  # sorted: searchsorted maps each label to its index among the classes
    y, p = np.searchsorted(classes, ql), np.searchsorted(classes, pred)
    out["knn_macro_f1"] = macro_f1(y, p, n_classes=len(classes))
    return out, {"first_hit": retrieval.first_hit_positions(idx, ql, gl), "depth": idx.shape[1],
                 "label": y, "pred": p, "n_classes": len(classes)}
