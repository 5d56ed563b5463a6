"""Samplers named by ``sampler.name``: random (shuffle) or weighted (classes drawn equally often)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import RandomSampler, Sampler, WeightedRandomSampler


def random_sampler(labels: Sequence[int], generator: torch.Generator) -> Sampler:
    return RandomSampler(range(len(labels)), generator=generator)


def weighted_sampler(labels: Sequence[int], generator: torch.Generator) -> Sampler:
    """Each item weighted by 1 / its class count, so every class is drawn equally often in expectation."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples=len(labels),
                                 replacement=True, generator=generator)


SAMPLERS: dict[str, Callable[[Sequence[int], torch.Generator], Sampler]] = {
    "random": random_sampler,
    "weighted": weighted_sampler,
}
