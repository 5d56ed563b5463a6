"""vistrain.models.losses metric-learning terms: values against brute force, gradients, the center update rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vistrain.models.losses import (
    EMBEDDING_LOSSES,
    LOSSES,
    CenterTerm,
    CETerm,
    TripletTerm,
    check_term_params,
)


def brute_force_triplet(feat: torch.Tensor, labels: list[int], margin: float | None) -> float:
    """Batch-hard triplet by plain loops: hardest positive (not itself), hardest negative, valid anchors only."""
    rows = feat.tolist()
    dist = [[math.dist(a, b) for b in rows] for a in rows]
    losses = []
    for i, yi in enumerate(labels):
        pos = [dist[i][j] for j, yj in enumerate(labels) if yj == yi and j != i]
        neg = [dist[i][j] for j, yj in enumerate(labels) if yj != yi]
        if not pos or not neg:
            continue
        diff = max(pos) - min(neg)
        losses.append(math.log1p(math.exp(diff)) if margin is None else max(0.0, diff + margin))
    return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize("margin", [0.3, 2.0, None])
def test_triplet_matches_brute_force(margin: float | None) -> None:
    torch.manual_seed(0)
    feat = torch.randn(9, 5, dtype=torch.float64)
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 3]  # label 3 has no positive: anchor 8 is left out
    term = TripletTerm(4, 5, margin=margin)
    got = term({"feat": feat}, torch.tensor(labels))
    assert got.item() == pytest.approx(brute_force_triplet(feat, labels, margin), rel=1e-9, abs=1e-12)


def test_triplet_gradcheck_float64() -> None:
    torch.manual_seed(1)
    feat = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for margin in (None, 10.0):  # soft margin; a margin large enough that every hinge is active (smooth)
        term = TripletTerm(4, 4, margin=margin)
        assert torch.autograd.gradcheck(lambda f, t=term: t({"feat": f}, labels), (feat,))


def test_triplet_no_valid_anchor_is_a_zero_in_the_graph() -> None:
    term = TripletTerm(3, 4)
    for labels in (torch.zeros(4, dtype=torch.long), torch.arange(4)):  # no negatives / no positives
        feat = torch.randn(4, 4, requires_grad=True)
        loss = term({"feat": feat}, labels)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.equal(feat.grad, torch.zeros_like(feat))


def test_triplet_identical_features_have_finite_gradient() -> None:
    feat = torch.ones(4, 3, requires_grad=True)  # every distance 0: sqrt at the clamp
    TripletTerm(2, 3)({"feat": feat}, torch.tensor([0, 0, 1, 1])).backward()
    assert torch.isfinite(feat.grad).all()


def test_triplet_in_float32_under_bf16_autocast() -> None:
    torch.manual_seed(2)
    feat = torch.randn(8, 16)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    term = TripletTerm(4, 16, margin=None)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        low = term({"feat": feat}, labels)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(term({"feat": feat}, labels).item(), rel=1e-5)


def test_triplet_rejects_unknown_mining() -> None:
    with pytest.raises(ValueError, match="mining must be one of batch_hard"):
        TripletTerm(2, 2, mining="semi_hard")


def test_ce_term_matches_cross_entropy() -> None:
    torch.manual_seed(3)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    torch.testing.assert_close(CETerm(4, 8)({"logits": logits}, labels), F.cross_entropy(logits, labels))
    torch.testing.assert_close(CETerm(4, 8, label_smoothing=0.1)({"logits": logits}, labels),
                               F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_classification_loss_table_unchanged() -> None:
    crit = LOSSES["ce"](None, 0.1)
    logits, labels = torch.randn(3, 2), torch.tensor([0, 1, 1])
    torch.testing.assert_close(crit(logits, labels), F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_center_loss_value_and_update_rule() -> None:
    feat = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0], [5.0, 5.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 0])
    term = CenterTerm(3, 2, lr=0.5)
    start = torch.tensor([[1.0, 1.0], [2.0, 2.0], [7.0, -1.0]])
    term.centers.copy_(start)
    loss = term({"feat": feat}, labels)
    expected = 0.5 * sum(float(((f - start[y]) ** 2).sum()) for f, y in zip(feat.detach(), labels)) / 4
    assert loss.item() == pytest.approx(expected)
    # Δc_j = Σ (c_j − f_i) / (1 + n_j); class 2 is absent and stays put.
    mean0, mean1 = feat.detach()[[0, 1, 3]].mean(0), feat.detach()[2]
    want0 = start[0] - 0.5 * 3 * (start[0] - mean0) / 4
    want1 = start[1] - 0.5 * 1 * (start[1] - mean1) / 2
    torch.testing.assert_close(term.centers, torch.stack([want0, want1, start[2]]))
    # Towards the class mean by the factor lr·n / (1 + n).
    assert (term.centers[0] - mean0).norm() == pytest.approx((1 - 0.5 * 3 / 4) * (start[0] - mean0).norm())
    loss.backward()
    torch.testing.assert_close(feat.grad, (feat.detach() - start[labels]) / 4)  # d/df of the mean of ½‖f − c‖²
    assert not term.centers.requires_grad and term.centers.grad is None
    assert list(dict(term.named_parameters())) == [] and "centers" in term.state_dict()


def test_center_loss_eval_does_not_move_centers_and_runs_in_float32() -> None:
    term = CenterTerm(2, 3).eval()
    feat = torch.randn(4, 3).to(torch.bfloat16)
    loss = term({"feat": feat}, torch.tensor([0, 1, 0, 1]))
    assert loss.dtype == torch.float32
    assert torch.equal(term.centers, torch.zeros(2, 3))
    term.train()
    term({"feat": feat}, torch.tensor([0, 1, 0, 1]))
    assert not torch.equal(term.centers, torch.zeros(2, 3))


def test_center_loss_converges_to_class_means() -> None:
    term = CenterTerm(2, 2, lr=0.5)
    feat = torch.tensor([[1.0, 1.0], [3.0, 1.0], [-2.0, 0.0], [-2.0, 4.0]])
    labels = torch.tensor([0, 0, 1, 1])
    for _ in range(60):
        term({"feat": feat}, labels)
    torch.testing.assert_close(term.centers, torch.tensor([[2.0, 1.0], [-2.0, 2.0]]))


def _dist_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        term = CenterTerm(3, 2, lr=1.0)
        # Rank 0 sees class 0 twice, rank 1 sees classes 0 and 2 (three items: unequal batch sizes).
        feats = [torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([[5.0, 0.0], [0.0, 6.0], [0.0, 2.0]])]
        labels = [torch.tensor([0, 0]), torch.tensor([0, 2, 2])]
        term({"feat": feats[rank]}, labels[rank])
        torch.save(term.centers, f"{result_file}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.dist
def test_center_update_is_the_same_on_every_rank(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "centers")), nprocs=2)
    c0, c1 = (torch.load(tmp_path / f"centers.{r}") for r in range(2))
    torch.testing.assert_close(c0, c1)
    # All five features: class 0 has n = 3, mean (3, 0); class 2 has n = 2, mean (0, 4); lr = 1.
    torch.testing.assert_close(c0, torch.tensor([[3 * 3.0 / 4, 0.0], [0.0, 0.0], [0.0, 2 * 4.0 / 3]]))


def test_loss_table_and_param_check() -> None:
    assert EMBEDDING_LOSSES == {"ce": CETerm, "triplet": TripletTerm, "center": CenterTerm}
    assert check_term_params("triplet", {"margin": None, "mining": "batch_hard"}) == []
    assert check_term_params("center", {}) == []
    [problem] = check_term_params("tripplet", {})
    assert problem.startswith("name: unknown loss term 'tripplet'") and "did you mean 'triplet'" in problem
    [problem] = check_term_params("triplet", {"marign": 0.2})
    assert problem.startswith("marign: ") and "valid: margin, mining" in problem and "did you mean 'margin'" in problem
    [problem] = check_term_params("triplet", {"mining": "hard"})
    assert problem.startswith("mining: ") and "batch_hard" in problem and "got 'hard'" in problem
    [problem] = check_term_params("ce", {"smoothing": 0.1})
    assert "valid: label_smoothing" in problem
    for name, cls in EMBEDDING_LOSSES.items():  # every term builds from (num_classes, feat_dim) alone
        assert isinstance(cls(5, 8), torch.nn.Module), name
