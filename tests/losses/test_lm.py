import math

import pytest
import torch

from mmfactory.data.chat import IGNORE_INDEX
from mmfactory.losses.lm import causal_lm_loss, sample_mean_loss


def _naive(logits, labels):
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE_INDEX:
                continue
            total = total - torch.log_softmax(logits[b, t], -1)[target]
            count += 1
    return total / max(count, 1)


def test_hand_computed_value():
    # Position 0 predicts token 1 with uniform logits over 4 tokens: loss log(4).
    # Position 1 predicts token 2 with logits [0, 0, log 3, 0]: p = 3/6, loss log(2).
    # Mean = (log 4 + log 2) / 2.
    logits = torch.zeros(1, 3, 4)
    logits[0, 1, 2] = math.log(3)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2]])
    loss, count = causal_lm_loss(logits, labels)
    assert count.item() == 2
    assert loss.item() == pytest.approx((math.log(4) + math.log(2)) / 2, abs=1e-6)


def test_matches_naive_forward_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :4] = IGNORE_INDEX
    labels[2, 5:] = IGNORE_INDEX
    loss, _ = causal_lm_loss(logits, labels)
    ref = _naive(logits, labels)
    (g,) = torch.autograd.grad(loss, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(loss.double(), ref, atol=1e-6)
    assert torch.allclose(g, g_ref, atol=1e-6)
    assert g[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_all_masked_is_zero_with_zero_gradient():
    logits = torch.randn(2, 5, 6, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    loss, count = causal_lm_loss(logits, labels)
    loss.backward()
    assert loss.item() == 0 and count.item() == 0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_sample_mean_matches_naive_forward_and_gradient():
    torch.manual_seed(0)
    token_losses = torch.rand(9, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([0, 0, 0, 0, 0, 0, 2, 3, 3])  # row 1 has no targets: it does not count
    loss = sample_mean_loss(token_losses, rows, num_rows=4)
    ref = (token_losses[:6].mean() + token_losses[6] + token_losses[7:].mean()) / 3
    (g,) = torch.autograd.grad(loss, token_losses)
    (g_ref,) = torch.autograd.grad(ref, token_losses)
    assert torch.allclose(loss, ref) and torch.allclose(g, g_ref)
    assert g[6] > g[0]  # a one-token answer weighs as much as a six-token one


def test_sample_mean_without_targets_is_zero():
    token_losses = torch.zeros(0, requires_grad=True)
    loss = sample_mean_loss(token_losses, torch.zeros(0, dtype=torch.long), num_rows=3)
    loss.backward()
    assert loss.item() == 0 and token_losses.grad.shape == (0,)
