"""vistrain.data.samplers.PKBatchSampler: P labels × K items per batch, exact length, determinism, DDP splits."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from vistrain.data.samplers import SAMPLERS, PKBatchSampler, pk_sampler
from vistrain.errors import UserError


def make_labels(counts: dict[int, int]) -> list[int]:
    """Labels with ``counts[label]`` items each, interleaved (not sorted) to make index bookkeeping matter."""
    items = [lab for lab, n in counts.items() for _ in range(n)]
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(123)).tolist()
    return [items[i] for i in perm]


def draw(labels: list[int], p: int | None, k: int, seed: int = 0, rank: int = 0, world: int = 1
         ) -> tuple[PKBatchSampler, list[list[int]]]:
    sampler = pk_sampler(labels, torch.Generator().manual_seed(seed), p, k, rank=rank, world_size=world)
    return sampler, list(sampler)


def check_batches(labels: list[int], batches: list[list[int]], p: int, k: int) -> None:
    """Every batch: p distinct labels, k items each; a label with >= k items gives k distinct items."""
    sizes = Counter(labels)
    for batch in batches:
        assert len(batch) == p * k
        per_label = Counter(labels[i] for i in batch)
        assert len(per_label) == p and set(per_label.values()) == {k}
        for lab in per_label:
            mine = [i for i in batch if labels[i] == lab]
            if sizes[lab] >= k:
                assert len(set(mine)) == k
            else:  # all of its items, topped up with repeats
                assert set(mine) == {i for i, y in enumerate(labels) if y == lab}


SMALL = {0: 6, 1: 6, 2: 7, 3: 2, 4: 9, 5: 3, 6: 1, 7: 12}  # labels 3 and 6 have fewer than k = 3 items


def test_batches_have_p_labels_of_k_items() -> None:
    labels = make_labels(SMALL)
    sampler, batches = draw(labels, p=4, k=3)
    assert len(batches) == len(sampler) > 0
    check_batches(labels, batches, 4, 3)


def test_no_item_repeats_within_an_epoch_for_labels_with_k_items() -> None:
    labels = make_labels(SMALL)
    _, batches = draw(labels, p=4, k=3, seed=5)
    used = Counter(i for b in batches for i in b if SMALL[labels[i]] >= 3)
    assert max(used.values()) == 1


def test_balanced_data_uses_every_chunk() -> None:
    labels = make_labels(dict.fromkeys(range(10), 6))  # 2 chunks of k = 3 per label: 20 chunks, 5 batches of 4
    sampler, batches = draw(labels, p=4, k=3)
    assert len(sampler) == 5
    assert Counter(labels[i] for b in batches for i in b) == dict.fromkeys(range(10), 6)
    assert sorted(i for b in batches for i in b) == list(range(60))


def test_dominant_label_is_capped_at_once_per_batch() -> None:
    labels = make_labels({0: 300, 1: 4, 2: 4, 3: 4, 4: 4})  # 75 chunks of label 0, 1 for each other label
    sampler, batches = draw(labels, p=2, k=4)
    # N batches need 2N chunks with at most N from label 0: Σ min(chunks, N) = N + 4 >= 2N gives N = 4.
    assert len(sampler) == 4
    check_batches(labels, batches, 2, 4)
    assert all(0 in {labels[i] for i in b} for b in batches)


def test_same_seed_same_batches_and_reseeding_through_a_dataloader() -> None:
    labels = make_labels(SMALL)
    assert draw(labels, 3, 2, seed=1)[1] == draw(labels, 3, 2, seed=1)[1]
    assert draw(labels, 3, 2, seed=1)[1] != draw(labels, 3, 2, seed=2)[1]
    gen = torch.Generator()
    loader = DataLoader(list(range(len(labels))), batch_sampler=pk_sampler(labels, gen, 3, 2), generator=gen)
    epochs = []
    for seed in (7, 8, 7):  # the loop reseeds the loader's generator every epoch
        gen.manual_seed(seed)
        epochs.append([b.tolist() for b in loader])
    assert epochs[0] == epochs[2] != epochs[1]


def test_p_none_puts_every_label_in_every_batch() -> None:
    labels = make_labels({0: 8, 1: 9, 2: 4, 3: 13})
    sampler, batches = draw(labels, p=None, k=2)
    assert sampler.p == 4 and len(batches) == len(sampler) == 2  # the smallest label has 4 // 2 chunks
    check_batches(labels, batches, 4, 2)


def test_ranks_get_disjoint_batches_of_equal_count() -> None:
    labels = make_labels(dict.fromkeys(range(12), 5))  # 24 chunks of k = 2, p = 3: 8 batches; 3 ranks get 2 each
    _, full = draw(labels, p=3, k=2, seed=4)
    per_rank = [draw(labels, p=3, k=2, seed=4, rank=r, world=3) for r in range(3)]
    assert len(full) == 8
    assert [len(s) for s, _ in per_rank] == [2, 2, 2] and [len(b) for _, b in per_rank] == [2, 2, 2]
    for r, (_, batches) in enumerate(per_rank):
        assert batches == full[r:6:3]
    flat = [i for _, batches in per_rank for b in batches for i in b]
    assert len(flat) == len(set(flat))  # k <= every label's size: no index repeats across ranks


def test_errors() -> None:
    with pytest.raises(UserError) as err:
        pk_sampler(make_labels(dict.fromkeys(range(7), 4)), torch.Generator(), p=16, k=4)
    assert str(err.value) == ("sampler.p: 16 identities per batch but the training data has only 7; "
                              "lower sampler.p or set it to null")
    with pytest.raises(UserError, match="sampler.k"):
        pk_sampler([0, 1], torch.Generator(), p=2, k=0)
    with pytest.raises(UserError, match="processes"):
        pk_sampler([0, 1, 2, 3], torch.Generator(), p=2, k=1, world_size=4)  # 2 batches for 4 ranks


def test_existing_samplers_still_there() -> None:
    assert set(SAMPLERS) >= {"random", "weighted"}
    assert len(SAMPLERS["random"]([0, 1, 1], torch.Generator())) == 3


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 12), min_size=2, max_size=12), k=st.integers(1, 4), data=st.data())
def test_invariants_hold_for_any_label_distribution(counts: list[int], k: int, data: st.DataObject) -> None:
    p = data.draw(st.one_of(st.none(), st.integers(1, len(counts))))
    labels = make_labels(dict(enumerate(counts)))
    sampler, batches = draw(labels, p=p, k=k, seed=data.draw(st.integers(0, 1000)))
    p_eff = len(counts) if p is None else p
    assert len(batches) == len(sampler) >= 1
    check_batches(labels, batches, p_eff, k)
    # A label appears at most as often as it has chunks.
    appearances = Counter(lab for b in batches for lab in {labels[i] for i in b})
    assert all(appearances[lab] <= max(1, n // k) for lab, n in enumerate(counts))
