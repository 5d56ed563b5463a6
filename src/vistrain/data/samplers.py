"""Samplers named by ``sampler.name``: random (shuffle) or weighted (classes drawn equally often); the
domain-ratio sampler (``DomainRatioSampler``, chosen by the run when ``data.sources`` gives ratios, combined with
``weighted`` class balance when that is the name); and the P×K batch sampler of metric learning
(``PKBatchSampler``), a batch sampler. The last two need more than the labels, so they are built by
``domain_ratio_sampler`` and ``pk_sampler`` (which ``SAMPLERS`` holds as "pk" all the same: ``sampler.name`` takes
the registry's names). A training loader takes any of them through ``EpochBatches``: the epoch's batches as a
function of (seed, fold, epoch), each item with the seed of its augmentation, and the batches a mid-epoch checkpoint
has trained left out."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import RandomSampler, Sampler, WeightedRandomSampler

from vistrain.errors import UserError
from vistrain.registry import SAMPLERS


@SAMPLERS.register("random")
def random_sampler(labels: Sequence[int], generator: torch.Generator) -> Sampler:
    return RandomSampler(range(len(labels)), generator=generator)


@SAMPLERS.register("weighted")
def weighted_sampler(labels: Sequence[int], generator: torch.Generator) -> Sampler:
    """Each item weighted by 1 / its class count, so every class is drawn equally often in expectation."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples=len(labels),
                                 replacement=True, generator=generator)


def _largest_remainder(total: int, shares: np.ndarray) -> np.ndarray:
    """Whole counts summing to ``total`` in the proportions ``shares`` (the largest fractions round up)."""
    exact = total * shares / shares.sum()
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]] += 1
    return counts


def balanced_cell_shares(cells: np.ndarray, ratios: np.ndarray, iterations: int = 500) -> np.ndarray:
    """Shares [D, C] of the epoch per (domain, class) cell: each domain's row sums to its ratio and the classes
    get equal column sums as far as the cells that hold images allow (iterative proportional fitting on the
    cells with images, ``cells`` [D, C] = image counts). The rows are fitted last, so the domain ratios hold
    exactly even where equal classes are out of reach (a class found in one domain only)."""
    share = (cells > 0).astype(np.float64)
    present = share.sum(axis=0) > 0
    target = present / present.sum()
    for _ in range(iterations):
        share *= (ratios / share.sum(axis=1))[:, None]
        cols = share.sum(axis=0)
        share *= np.divide(target, cols, out=np.zeros_like(cols), where=cols > 0)[None, :]
    return share * (ratios / share.sum(axis=1))[:, None]


class DomainRatioSampler(Sampler[int]):
    """An epoch of ``len(labels)`` draws in which each domain's share is its ratio (``data.sources[*].ratio``).

    Domain d gets round(N·ratio_d) of the N draws (largest remainders, so they sum to N). Within a domain the
    draws walk through fresh random permutations of its images: a domain asked for more draws than it has images
    shows every image, then repeats some; one asked for fewer shows a different subset each epoch. No image is
    dropped from the data, and the epoch is as long as an ordinary one. With ``balance_classes`` (``sampler.name:
    weighted``) a domain's draws are instead weighted per class (``balanced_cell_shares``) so the classes are
    drawn equally often overall, with replacement as the weighted sampler does. All randomness comes from
    ``generator``, which the loop reseeds every epoch; under DDP wrap it in ``RankShare`` like the others.
    """

    def __init__(self, labels: Sequence[int], domains: Sequence[str], ratios: dict[str, float],
                 generator: torch.Generator, balance_classes: bool = False):
        labels_np, domains_np = np.asarray(labels, dtype=np.int64), np.asarray(domains).astype(str)
        unknown = sorted(set(domains_np.tolist()) - set(ratios))
        if unknown:
            raise ValueError(f"DomainRatioSampler: domain(s) {unknown} have no ratio; ratios: {ratios}")
        self.names = [d for d in ratios if (domains_np == d).any()]  # a domain without images here sits out
        shares = np.array([ratios[d] for d in self.names], dtype=np.float64)
        self.ratios = shares / shares.sum()
        self.members = [np.flatnonzero(domains_np == d) for d in self.names]
        self.counts = _largest_remainder(len(labels_np), self.ratios)  # draws per domain and epoch
        self.generator = generator
        self.probs: list[np.ndarray] | None = None
        if balance_classes:
            _, codes = np.unique(labels_np, return_inverse=True)
            cells = np.zeros((len(self.names), codes.max() + 1))
            for d, idx in enumerate(self.members):
                np.add.at(cells[d], codes[idx], 1)
            share = balanced_cell_shares(cells, self.ratios)
            self.probs = []
            for d, idx in enumerate(self.members):
                w = share[d, codes[idx]] / cells[d, codes[idx]]
                self.probs.append(w / w.sum())

    def __len__(self) -> int:
        return int(self.counts.sum())

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=self.generator)))
        parts = []
        for d, (idx, n) in enumerate(zip(self.members, self.counts)):
            if self.probs is not None:
                parts.append(rng.choice(idx, size=n, replace=True, p=self.probs[d]))
            else:
                laps = [rng.permutation(idx) for _ in range(-(-n // len(idx)))]
                parts.append(np.concatenate(laps)[:n])
        order = np.concatenate(parts)
        return iter(order[rng.permutation(len(order))].tolist())


def domain_ratio_sampler(labels: Sequence[int], generator: torch.Generator, domains: Sequence[str],
                         ratios: dict[str, float], balance_classes: bool = False) -> DomainRatioSampler:
    """The sampler a run with ``data.sources`` ratios trains with (``balance_classes``: ``sampler.name: weighted``)."""
    return DomainRatioSampler(labels, domains, ratios, generator, balance_classes)


class PKBatchSampler(Sampler[list[int]]):
    """Batches of P labels × K items each (for triplet / batch-hard losses): lists of p·k dataset indices.

    Each epoch, every label's indices are shuffled and cut into chunks of k (the remainder, < k items, sits
    this epoch out); a label with fewer than k items gives one chunk: all its items plus draws with
    replacement up to k, so small labels still supply a positive pair. The chunks are then grouped p
    distinct labels at a time, as the strong baseline's RandomIdentitySampler does, so a label appears about
    as often as its images allow (n // k times). Unlike that sampler the number of batches is fixed in
    advance, so ``__len__`` is exact: N is the largest count for which the chunks can fill N batches with p
    distinct labels each (a label can be in a batch once, so one with more than N chunks gives only N); the
    surplus chunks are dropped at random. Labels are picked for each batch at random weighted by their
    chunks left, except that a label with as many chunks left as batches left must be picked (which is what
    guarantees every batch gets p distinct labels); then the batch order is shuffled.

    ``p=None`` puts every label in every batch (then N is the smallest label's chunk count). All randomness
    comes from ``generator``, which the loop reseeds every epoch: the same seed gives the same batches.
    Under DDP each rank draws the whole epoch (so all ranks must seed ``generator`` identically) and takes
    batches rank, rank + world_size, ...; the last N mod world_size batches are dropped so every rank gets
    the same number.
    """

    def __init__(self, labels: Sequence[int], p: int | None, k: int, generator: torch.Generator,
                 rank: int = 0, world_size: int = 1):
        labels_np = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels_np.size == 0:
            raise UserError("sampler: the training data is empty")
        if k < 1:
            raise UserError(f"sampler.k: must be at least 1; got {k}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"PKBatchSampler: need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
        uniq, inverse = np.unique(labels_np, return_inverse=True)
        if p is not None and p < 1:
            raise UserError(f"sampler.p: must be at least 1 or null; got {p}")
        if p is not None and p > len(uniq):
            raise UserError(f"sampler.p: {p} identities per batch but the training data has only {len(uniq)}; "
                            "lower sampler.p or set it to null")
        self.p = len(uniq) if p is None else int(p)
        self.k = int(k)
        self.generator = generator
        self.rank, self.world_size = rank, world_size
        self.inverse = inverse.reshape(-1)  # label number (0 .. L-1) of each dataset index
        self.sizes = np.bincount(self.inverse, minlength=len(uniq))  # items per label [L]
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])  # offsets in label-sorted order [L]
        self.chunks = np.maximum(1, self.sizes // self.k)  # chunks of k per label and epoch [L]
        self.num_batches = self._max_batches(self.chunks, self.p)  # per epoch, all ranks together
        if len(self) == 0:
            raise UserError(f"sampler: only {self.num_batches} P×K batch(es) per epoch for {world_size} processes; "
                            "lower sampler.p or sampler.k, or use fewer processes")

    @staticmethod
    def _max_batches(chunks: np.ndarray, p: int) -> int:
        """The largest N with Σ min(chunks, N) >= N·p: N batches of p distinct labels can then be filled.

        Σ min(chunks, N) − N·p is concave in N and 0 at N = 0, so the valid N form an interval [0, N*].
        """
        lo, hi = 1, int(chunks.sum()) // p  # N = 1 is always valid since p <= number of labels
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if int(np.minimum(chunks, mid).sum()) >= mid * p:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def __len__(self) -> int:
        return self.num_batches // self.world_size

    def _epoch_batches(self) -> list[list[int]]:
        """All N batches of the epoch, in random order."""
        # One draw from the torch generator seeds numpy, which is much faster at the many small draws below.
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=self.generator)))
        n_batches, p, k = self.num_batches, self.p, self.k
        n_labels = len(self.sizes)
        # Items grouped by label, shuffled within each label: label j's chunk c is
        # order[starts[j] + c·k : starts[j] + (c + 1)·k].
        order = np.lexsort((rng.random(len(self.inverse)), self.inverse))
        small: dict[int, np.ndarray] = {}  # labels with fewer than k items: their one, topped-up chunk
        for j in np.flatnonzero(self.sizes < k).tolist():
            items = order[self.starts[j]: self.starts[j] + self.sizes[j]]
            small[j] = rng.permutation(np.concatenate([items, rng.choice(items, k - len(items))]))
        # Quotas: at most N chunks per label; the surplus over N·p chunks is dropped uniformly at random.
        quota = np.minimum(self.chunks, n_batches)
        surplus = int(quota.sum()) - n_batches * p
        if surplus > 0:
            slots = np.repeat(np.arange(n_labels), quota)
            quota = quota - np.bincount(slots[rng.choice(len(slots), surplus, replace=False)], minlength=n_labels)
        used = np.zeros(n_labels, dtype=np.int64)
        batches: list[list[int]] = []
        for left in range(n_batches, 0, -1):
            # Invariant: Σ quota = left·p and max quota <= left, so the labels at quota == left (at most p)
            # must go in now, and at least p - len(forced) others have chunks left.
            tight = quota == left
            picked = np.flatnonzero(tight)
            rest = p - len(picked)
            if rest > 0:
                # Weighted draw without replacement (Efraimidis & Spirakis): the largest log(u) / w win.
                weights = np.where(tight, 0, quota)
                with np.errstate(divide="ignore"):
                    keys = np.log(rng.random(n_labels)) / weights  # weight 0 -> -inf, never drawn
                picked = np.concatenate([picked, np.argpartition(keys, n_labels - rest)[n_labels - rest:]])
            quota[picked] -= 1
            parts = []
            for j in picked.tolist():
                if j in small:
                    parts.append(small[j])
                else:
                    first = self.starts[j] + used[j] * k
                    parts.append(order[first: first + k])
            used[picked] += 1
            batches.append(np.concatenate(parts).tolist())
        return [batches[i] for i in rng.permutation(n_batches).tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._epoch_batches()
        yield from batches[self.rank: len(self) * self.world_size: self.world_size]


@SAMPLERS.register("pk")
def pk_sampler(labels: Sequence[int], generator: torch.Generator, p: int | None, k: int, rank: int = 0,
               world_size: int = 1) -> PKBatchSampler:
    """A ``PKBatchSampler``; pass it to ``DataLoader(batch_sampler=...)`` (with no batch_size or shuffle)."""
    return PKBatchSampler(labels, p, k, generator, rank=rank, world_size=world_size)


class RepeatedAugment(Sampler[int]):
    """``augment.repeats``: timm's ``RepeatAugSampler`` (DeiT's repeated augmentation) over ``n`` items: each item
    ``repeats`` times in a row of the shuffled order, that list dealt to the ranks (rank r takes positions
    r, r + world, ...: the copies of an image land on different ranks) and each rank's share cut to timm's epoch
    length (about n / world: a multiple of 256 when n >= 256), so an epoch shows ~1/repeats of the images, each
    ``repeats`` times. The shuffle is timm's own, seeded with ``generator``'s seed: ``EpochBatches`` seeds it with
    (fold seed + epoch) before each draw, timm's ``set_epoch`` value. No ``RankShare`` around it: it shares the
    epoch out itself. Every copy is its own position in the epoch, so ``EpochBatches`` gives each copy an
    augmentation seed of its own."""

    def __init__(self, n: int, generator: torch.Generator, repeats: int, rank: int = 0, world: int = 1):
        from timm.data.distributed_sampler import RepeatAugSampler

        self.sampler = RepeatAugSampler(range(n), num_replicas=world, rank=rank, shuffle=True, num_repeats=repeats)
        self.generator = generator

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[int]:
        self.sampler.set_epoch(self.generator.initial_seed())
        return iter(self.sampler)


class SeededIndex(NamedTuple):
    """A training item as ``EpochBatches`` hands it to the dataset: its index and the seed of its augmentation."""

    index: int
    seed: int  # 64-bit, from (seed, fold, epoch, rank, position in the epoch)


class EpochBatches(Sampler[list[SeededIndex]]):
    """A training loader's batch sampler: the batches of the epoch named by ``set_epoch``, a function of
    (seed, epoch) alone, with every item's augmentation seed, so that a resumed epoch (at its start or in its
    middle) trains the very batches of the uninterrupted one.

    ``source`` draws the epoch from ``generator``: a sampler of indices (random, weighted, domain ratios; under DDP
    a ``RankShare`` of one), grouped here into ``batch_size`` batches as a DataLoader would, or a batch sampler
    (P×K) when ``batch_size`` is None. ``generator`` is reseeded with ``seed + epoch`` before each draw. Each item
    gets its own seed from ``SeedSequence((seed, epoch, rank))`` by its position in the epoch; the dataset seeds
    the augmentation of that item with it (``dataset.ImageDataset``). The random draws of an image therefore
    depend neither on which DataLoader worker decodes it, nor on how many workers there are or whether they
    persist across epochs, nor on anything trained before: per-worker seeds could not give that for a resume in
    the middle of an epoch, where each worker's generator would have to be where the interrupted run left it.

    ``skip``: the first batches of the epoch, which a mid-epoch checkpoint has trained, are left out (and so never
    loaded); ``len()`` counts the batches still to come.
    """

    def __init__(self, source: Sampler, generator: torch.Generator, batch_size: int | None = None,
                 drop_last: bool = False, rank: int = 0):
        self.source, self.generator = source, generator
        self.batch_size, self.drop_last, self.rank = batch_size, drop_last, rank
        self.seed, self.epoch, self.skip = 0, 0, 0

    def set_epoch(self, seed: int, epoch: int, skip: int = 0) -> None:
        """Epoch ``epoch`` (0-based) of a fold whose seed is ``seed``; its first ``skip`` batches left out."""
        self.seed, self.epoch, self.skip = seed, epoch, skip

    def _full_len(self) -> int:
        if self.batch_size is None:
            return len(self.source)
        n = len(self.source)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        return max(self._full_len() - self.skip, 0)

    def _batches(self) -> list[list[int]]:
        self.generator.manual_seed(self.seed + self.epoch)
        if self.batch_size is None:
            return [list(batch) for batch in self.source]
        order, size = list(self.source), self.batch_size
        batches = [order[i: i + size] for i in range(0, len(order), size)]
        return batches[: self._full_len()]

    def __iter__(self) -> Iterator[list[SeededIndex]]:
        batches = self._batches()
        seeds = np.random.SeedSequence((self.seed, self.epoch, self.rank)).generate_state(
            sum(map(len, batches)), dtype=np.uint64).tolist()
        start = sum(map(len, batches[: self.skip]))
        for batch in batches[self.skip:]:
            yield [SeededIndex(int(i), seeds[start + j]) for j, i in enumerate(batch)]
            start += len(batch)
