import math

import pytest
import torch

from mmfactory.losses.reward import bradley_terry_loss


def naive_bradley_terry(chosen, rejected, margins):
    terms = [torch.log(1 + torch.exp(-(chosen[i] - rejected[i] - margins[i]))) for i in range(len(chosen))]
    return sum(terms) / len(terms)


def test_hand_computed():
    # -log sigmoid(1) = log(1 + e^-1);  with margin 0.5: log(1 + e^-0.5)
    chosen, rejected = torch.tensor([1.0]), torch.tensor([0.0])
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(0.3132617, abs=1e-6)
    assert bradley_terry_loss(chosen, rejected, margin=0.5).item() == pytest.approx(0.4740770, abs=1e-6)
    # Equal rewards: log 2.
    assert bradley_terry_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("margin", ["none", "scalar", "per_pair"])
def test_matches_naive_forward_and_grad(margin):
    g = torch.Generator().manual_seed(0)
    chosen = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    margins = {
        "none": torch.zeros(6, dtype=torch.float64),
        "scalar": torch.full((6,), 0.7, dtype=torch.float64),
        "per_pair": torch.rand(6, generator=g, dtype=torch.float64),
    }[margin]
    arg = {"none": 0.0, "scalar": 0.7, "per_pair": margins}[margin]
    got = bradley_terry_loss(chosen, rejected, margin=arg)
    want = naive_bradley_terry(chosen, rejected, margins)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got, (chosen, rejected))
    want_grads = torch.autograd.grad(want, (chosen, rejected))
    for g_, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g_, w)
    torch.testing.assert_close(grads[0], -grads[1])  # only the difference matters


def test_large_reward_gaps_stay_finite():
    loss = bradley_terry_loss(torch.tensor([-200.0, 200.0]), torch.tensor([200.0, -200.0]))
    assert loss.item() == pytest.approx(200.0, rel=1e-4)  # mean(400, ~0)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\[P\]"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(4))


def test_soft_targets_match_naive_cross_entropy_and_a_tie_is_best_at_equal_rewards():
    g = torch.Generator().manual_seed(1)
    chosen = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.0, 0.5, 0.5, 1.0, 0.5], dtype=torch.float64)
    got = bradley_terry_loss(chosen, rejected, margin=0.2, target=target)
    d = chosen - rejected - 0.2
    p = 1 / (1 + torch.exp(-d))
    want = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    torch.testing.assert_close(got, want)
    for a, b in zip(
        torch.autograd.grad(got, (chosen, rejected)),
        torch.autograd.grad(want, (chosen, rejected)),
        strict=True,
    ):
        torch.testing.assert_close(a, b)
    ones = torch.ones(5, dtype=torch.float64)
    torch.testing.assert_close(
        bradley_terry_loss(chosen, rejected, target=ones), bradley_terry_loss(chosen, rejected)
    )
    gaps = torch.linspace(-2, 2, 41)
    tie = [bradley_terry_loss(gap[None], torch.zeros(1), target=torch.full((1,), 0.5)).item() for gap in gaps]
    assert tie.index(min(tie)) == 20  # the minimum is at a zero gap
