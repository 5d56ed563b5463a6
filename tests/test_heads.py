"""vistrain.models.heads: ArcFace / CosFace logits against hand-computed angles, fp16/bf16 safety, margin schedule."""

from __future__ import annotations

import math

import pytest
import torch

from vistrain.models.heads import HEADS, ArcFaceHead, CosFaceHead, LinearHead, margin_at_epoch

# Class weights at these angles (radians) in the plane; the feature points along angle 0.
ANGLES = (0.3, 1.2, 3.0)


def planar_head(cls: type, s: float, m: float) -> torch.nn.Module:
    """A 2-d head whose class j has a weight at ANGLES[j] (with varied norms: the heads must normalise)."""
    head = cls(2, len(ANGLES), s=s, m=m)
    with torch.no_grad():
        for j, a in enumerate(ANGLES):
            head.weight[j] = (j + 1.5) * torch.tensor([math.cos(a), math.sin(a)])
    return head


FEAT = torch.tensor([[3.0, 0.0]])  # angle 0, norm 3


@pytest.mark.parametrize("target", [0, 1, 2])
def test_arcface_logits_match_hand_computation(target: int) -> None:
    s, m = 10.0, 0.5
    head = planar_head(ArcFaceHead, s, m)
    logits = head(FEAT, torch.tensor([target]))[0]
    expected = [s * math.cos(a) for a in ANGLES]
    theta = ANGLES[target]
    if theta + m < math.pi:
        expected[target] = s * math.cos(theta + m)
    else:  # θ + m > π: the non-easy-margin substitute, cos θ − sin(π − m)·m
        expected[target] = s * (math.cos(theta) - math.sin(math.pi - m) * m)
    assert logits.tolist() == pytest.approx(expected, abs=1e-4)


def test_arcface_without_labels_or_margin_is_scaled_cosine() -> None:
    head = planar_head(ArcFaceHead, 10.0, 0.5)
    plain = [10.0 * math.cos(a) for a in ANGLES]
    assert head(FEAT)[0].tolist() == pytest.approx(plain, abs=1e-4)
    head.set_margin(0.0)
    assert head(FEAT, torch.tensor([1]))[0].tolist() == pytest.approx(plain, abs=1e-4)
    head.set_margin(0.3)
    assert head.m == 0.3 and head.cos_m == pytest.approx(math.cos(0.3)) and head.sin_m == pytest.approx(math.sin(0.3))
    assert head(FEAT, torch.tensor([1]))[0, 1].item() == pytest.approx(10.0 * math.cos(1.5), abs=1e-4)


@pytest.mark.parametrize("target", [0, 2])
def test_cosface_logits_match_hand_computation(target: int) -> None:
    s, m = 30.0, 0.35
    head = planar_head(CosFaceHead, s, m)
    logits = head(FEAT, torch.tensor([target]))[0]
    expected = [s * (math.cos(a) - (m if j == target else 0.0)) for j, a in enumerate(ANGLES)]
    assert logits.tolist() == pytest.approx(expected, abs=1e-4)
    assert head(FEAT)[0].tolist() == pytest.approx([s * math.cos(a) for a in ANGLES], abs=1e-4)


def test_arcface_target_logit_is_monotonic_in_angle() -> None:
    head = ArcFaceHead(2, 1, s=1.0, m=0.5)
    with torch.no_grad():
        head.weight[0] = torch.tensor([1.0, 0.0])
    theta = torch.linspace(0, math.pi, 721)
    feats = torch.stack([theta.cos(), theta.sin()], dim=1)
    logit = head(feats, torch.zeros(len(theta), dtype=torch.long))[:, 0]
    assert torch.all(logit[1:] <= logit[:-1] + 1e-6)


def test_linear_head_is_bias_free_and_ignores_labels() -> None:
    head = LinearHead(4, 3)
    assert [n for n, _ in head.named_parameters()] == ["weight"]
    x = torch.randn(5, 4)
    torch.testing.assert_close(head(x, torch.zeros(5, dtype=torch.long)), x @ head.weight.t())
    head.set_margin(0.5)  # a no-op, same API as the margin heads


def test_heads_table() -> None:
    assert HEADS == {"linear": LinearHead, "arcface": ArcFaceHead, "cosface": CosFaceHead}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", [ArcFaceHead, CosFaceHead])
def test_margin_heads_finite_under_low_precision_autocast(cls: type, dtype: torch.dtype) -> None:
    """cos θ = +1, -1 and θ + m > π, with half-precision inputs under autocast: finite logits and gradients."""
    head = cls(2, 3, s=64.0, m=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [math.cos(2.9), math.sin(2.9)]]))
    feat = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1e-4], [-1.0, 0.0]]).to(dtype).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 1])  # cos = 1, cos = -1, θ + m > π, cos = 1 again
    with torch.autocast(device_type="cpu", dtype=dtype):
        logits = head(feat, labels)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, labels).backward()
    assert torch.isfinite(feat.grad).all() and torch.isfinite(head.weight.grad).all()


def test_margin_schedule_warmup_then_ramp() -> None:
    got = [margin_at_epoch(e, warmup_epochs=2, m_warmup=0.0, m_finetune=0.5, ramp_epochs=3) for e in range(7)]
    assert got == pytest.approx([0.0, 0.0, 0.5 / 3, 1.0 / 3, 0.5, 0.5, 0.5])


def test_margin_schedule_step_and_decreasing() -> None:
    assert [margin_at_epoch(e, 2, 0.1, 0.5) for e in range(4)] == pytest.approx([0.1, 0.1, 0.5, 0.5])
    assert [margin_at_epoch(e, 0, 0.5, 0.2, ramp_epochs=2) for e in range(3)] == pytest.approx([0.35, 0.2, 0.2])
    with pytest.raises(ValueError):
        margin_at_epoch(-1, 2, 0.0, 0.5)
