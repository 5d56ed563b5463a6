"""Losses named in the config: a classifier's (``train.loss``, ``LOSSES``) and an embedding model's terms
(``loss.terms``, ``EMBEDDING_LOSSES``). A new loss is one function or class registered with the decorator, its name
declared in ``vistrain/registry.py`` (where the config takes its names from)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vistrain.errors import did_you_mean
from vistrain.registry import EMBEDDING_LOSSES, LOSSES


@LOSSES.register("ce")
def cross_entropy(
    class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0
) -> nn.Module:
    """Cross-entropy on logits [B, C]; targets are class indices [B] or soft targets [B, C] (mixup)."""
    return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)


# ------------------------------------------------------------------------------------------ metric learning
#
# Loss terms for embedding models. Each reads what it needs from the model's training output dict
# ({"feat": pre-BN [B, D], "bn_feat": [B, D], "logits": [B, C]}) and is built as
# ``cls(num_classes, feat_dim, **yaml_params)``; the caller weights and sums the terms.


@EMBEDDING_LOSSES.register("ce")
class CETerm(nn.Module):
    """Cross-entropy on out["logits"] [B, C] (a margin head's logits included), optionally label-smoothed."""

    def __init__(self, num_classes: int, feat_dim: int, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, out: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out["logits"].float(), labels, label_smoothing=self.label_smoothing)


def pairwise_distances(feat: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [B, B] between the rows of feat [B, D].

    ‖a‖² + ‖b‖² − 2a·b can come out slightly negative and sqrt has an infinite slope at 0, hence the clamp.
    """
    sq = feat.pow(2).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * feat @ feat.t()
    return d2.clamp(min=1e-12).sqrt()


@EMBEDDING_LOSSES.register("triplet")
class TripletTerm(nn.Module):
    """Batch-hard triplet loss (Hermans et al. 2017) on out["feat"] [B, D] with Euclidean distances.

    For each anchor: the farthest positive (same label, not itself) and the closest negative;
    loss = relu(d_ap − d_an + margin), or softplus(d_ap − d_an) ("soft margin") when ``margin`` is None.
    Anchors without a positive or a negative in the batch are left out of the mean; with none valid the
    loss is a zero that still belongs to the graph (so backward and DDP see every parameter). Distances are
    computed in float32 even under autocast: the expanded-square form loses everything in fp16.
    """

    MINING = ("batch_hard",)

    def __init__(self, num_classes: int, feat_dim: int, margin: float | None = 0.3, mining: str = "batch_hard"):
        super().__init__()
        if mining not in self.MINING:
            raise ValueError(f"mining must be one of {', '.join(self.MINING)}; got '{mining}'")
        if margin is not None and margin < 0:
            raise ValueError(f"margin must be >= 0 or null (soft margin); got {margin}")
        self.margin = None if margin is None else float(margin)
        self.mining = mining

    def forward(self, out: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        feat = out["feat"]
        with torch.autocast(device_type=feat.device.type, enabled=False):
            feat = feat.float() if feat.dtype in (torch.float16, torch.bfloat16) else feat
            dist = pairwise_distances(feat)
            same = labels[:, None] == labels[None, :]
            eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
            pos, neg = same & ~eye, ~same
            has_pos, has_neg = pos.any(dim=1), neg.any(dim=1)
            # dist >= 0, so zeroing the non-positives leaves the hardest positive as the row maximum.
            d_ap = (dist * pos).amax(dim=1)
            d_an = torch.where(neg, dist, torch.full_like(dist, float("inf"))).amin(dim=1)
            valid = has_pos & has_neg
            d_an = torch.where(valid, d_an, torch.zeros_like(d_an))  # no inf left in the graph
            diff = d_ap - d_an
            losses = F.softplus(diff) if self.margin is None else F.relu(diff + self.margin)
            # A sum over an empty selection is a zero with a grad_fn: the "no valid anchor" case for free.
            return losses[valid].sum() / valid.sum().clamp(min=1)


@EMBEDDING_LOSSES.register("center")
class CenterTerm(nn.Module):
    """Center loss (Wen et al. 2016) on out["feat"] [B, D]: mean over the batch of ½‖f_i − c_{y_i}‖², in float32.

    The centers [C, D] are a buffer (saved in ``state_dict``, no gradient). In training mode each call also
    moves them with the paper's rule on the detached features, after the loss is taken:
    Δc_j = Σ_{i: y_i = j} (c_j − f_i) / (1 + n_j),  c_j ← c_j − lr·Δc_j.
    A rule instead of a second optimiser over learnable centers (as the strong baseline does): it has its own
    step size ``lr``, independent of the term's weight in the total loss, and never passes through the
    AMP grad scaler, gradient clipping or the lr schedule of the main optimiser. Under torch.distributed
    every rank applies the update from the features of all ranks, so the centers stay identical across ranks.
    ``eval()`` gives the loss without moving the centers. They start at 0.
    """

    def __init__(self, num_classes: int, feat_dim: int, lr: float = 0.5):
        super().__init__()
        if lr < 0:
            raise ValueError(f"lr must be >= 0; got {lr}")
        self.lr = float(lr)
        self.register_buffer("centers", torch.zeros(num_classes, feat_dim))

    def forward(self, out: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        feat = out["feat"]
        with torch.autocast(device_type=feat.device.type, enabled=False):
            feat = feat.float()
            centers = self.centers.float()
            loss = 0.5 * (feat - centers[labels]).pow(2).sum(dim=1).mean()
            if self.training:
                self._update(feat.detach(), labels)
        return loss

    @torch.no_grad()
    def _update(self, feat: torch.Tensor, labels: torch.Tensor) -> None:
        feat, labels = _gather_all_ranks(feat, labels)
        num_classes = self.centers.shape[0]
        counts = torch.bincount(labels, minlength=num_classes).to(feat.dtype)[:, None]  # n_j [C, 1]
        sums = torch.zeros_like(self.centers, dtype=feat.dtype).index_add_(0, labels, feat)  # Σ f_i [C, D]
        centers = self.centers.to(feat.dtype)
        delta = (counts * centers - sums) / (1.0 + counts)  # classes absent from the batch: 0
        self.centers.sub_((self.lr * delta).to(self.centers.dtype))


def _gather_all_ranks(feat: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate feat [B, D] and labels [B] over all torch.distributed ranks (batches may differ in size)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return feat, labels
    world = torch.distributed.get_world_size()
    if world == 1:
        return feat, labels
    size = torch.tensor([feat.shape[0]], device=feat.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    n = [int(s.item()) for s in sizes]
    pad = max(n) - feat.shape[0]
    feat_p = F.pad(feat, (0, 0, 0, pad))
    labels_p = F.pad(labels, (0, pad))
    feats = [torch.empty_like(feat_p) for _ in range(world)]
    labs = [torch.empty_like(labels_p) for _ in range(world)]
    torch.distributed.all_gather(feats, feat_p)
    torch.distributed.all_gather(labs, labels_p)
    return (torch.cat([f[:k] for f, k in zip(feats, n)]), torch.cat([lb[:k] for lb, k in zip(labs, n)]))


def term_param_names(cls: type[nn.Module]) -> list[str]:
    """The YAML parameters a loss term accepts: its ``__init__`` keywords minus num_classes and feat_dim."""
    skip = {"self", "num_classes", "feat_dim"}
    return [n for n in inspect.signature(cls.__init__).parameters if n not in skip]


def check_term_params(name: str, params: dict[str, Any]) -> list[str]:
    """Problems with one loss term of the config (empty when fine), one line each, for load-time validation.

    Checks the term name, the parameter names and, when both are fine, the values (by building the term on
    a 2-class, 2-d dummy; e.g. an unknown ``mining``). Each line starts with the key inside the term that is at
    fault (``name``, a parameter, or the parameters given when the term rejects their values together); the
    caller prefixes the term's own path (``loss.terms[1].``).
    """
    if name not in EMBEDDING_LOSSES:
        valid = ", ".join(sorted(EMBEDDING_LOSSES))
        return [f"name: unknown loss term '{name}'; valid: {valid}{did_you_mean(name, EMBEDDING_LOSSES)}"]
    cls = EMBEDDING_LOSSES[name]
    accepted = term_param_names(cls)
    problems = [
        f"{key}: not a parameter of the {name} term; valid: {', '.join(accepted) or '(none)'}"
        f"{did_you_mean(key, accepted)}"
        for key in params if key not in accepted
    ]
    if not problems:
        try:
            cls(2, 2, **params)
        except (TypeError, ValueError) as err:
            problems.append(f"{', '.join(params) or 'name'}: {err}")
    return problems
