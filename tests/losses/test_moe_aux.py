"""Router aux losses against transformers' load_balancing_loss_func and naive loops, forward and gradient."""

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from mmfactory.losses.moe_aux import load_balancing_loss, moe_aux_losses, router_z_loss
from mmfactory.models.components.moe import SparseMoeBlock


def naive_load_balancing(logits: torch.Tensor, top_k: int, mask: torch.Tensor) -> torch.Tensor:
    num_experts = logits.shape[-1]
    real = [n for n in range(logits.shape[0]) if mask[n]]
    probs = torch.softmax(logits, dim=-1)
    loss = 0.0
    for e in range(num_experts):
        routed = sum(1.0 for n in real if e in probs[n].topk(top_k).indices.tolist()) / len(real)
        mean_prob = sum(probs[n, e] for n in real) / len(real)
        loss = loss + routed * mean_prob
    return num_experts * loss


def naive_z_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    real = [n for n in range(logits.shape[0]) if mask[n]]
    return sum(torch.log(torch.exp(logits[n]).sum()) ** 2 for n in real) / len(real)


def padding_mask(batch: int = 3, length: int = 8) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    return mask


@pytest.mark.parametrize(("num_experts", "top_k"), [(4, 2), (4, 1), (8, 2), (4, 4), (1, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_matches_transformers_forward_and_gradient(num_experts, top_k, masked):
    torch.manual_seed(0)
    logits = (2 * torch.randn(24, num_experts)).requires_grad_()
    mask = padding_mask() if masked else None
    ours = load_balancing_loss(logits, top_k, mask)
    theirs = load_balancing_loss_func((logits,), num_experts, top_k, mask)
    torch.testing.assert_close(ours, theirs)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    (grad_theirs,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(grad_ours, grad_theirs)


def test_load_balancing_matches_naive_loop_forward_and_gradient():
    torch.manual_seed(1)
    logits = torch.randn(24, 4, dtype=torch.float64, requires_grad=True)
    mask = padding_mask().reshape(-1)
    ours = load_balancing_loss(logits, 2, mask)
    expected = naive_load_balancing(logits, 2, mask)
    torch.testing.assert_close(ours, expected)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    (grad_ref,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad_ours, grad_ref)
    assert grad_ours[mask.bool().logical_not()].abs().max() == 0


def test_load_balancing_hand_computed_value():
    # Top-1, two tokens each certain of a different expert: f = P = (1/2, 1/2) -> 2 * (1/4 + 1/4) = 1.
    logits = torch.tensor([[30.0, 0.0], [0.0, 30.0]])
    torch.testing.assert_close(load_balancing_loss(logits, top_k=1), torch.tensor(1.0))
    # Both tokens certain of expert 0: f = (1, 0), P = (1, 0) -> 2 (the collapsed worst case).
    torch.testing.assert_close(load_balancing_loss(logits[:1].repeat(2, 1), top_k=1), torch.tensor(2.0))


@pytest.mark.parametrize("masked", [False, True])
def test_router_z_loss_matches_naive_forward_and_gradient(masked):
    torch.manual_seed(2)
    logits = (3 * torch.randn(24, 4, dtype=torch.float64)).requires_grad_()
    mask = padding_mask().reshape(-1) if masked else torch.ones(24)
    ours = router_z_loss(logits, mask if masked else None)
    expected = naive_z_loss(logits, mask)
    torch.testing.assert_close(ours, expected)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    (grad_ref,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad_ours, grad_ref)


def test_router_z_loss_of_zero_logits_is_log_e_squared():
    torch.testing.assert_close(router_z_loss(torch.zeros(5, 4)), torch.tensor(math.log(4) ** 2))


@pytest.mark.parametrize("loss", [lambda x, m: load_balancing_loss(x, 2, m), router_z_loss])
def test_all_padding_gives_zero_loss_and_zero_gradient(loss):
    logits = torch.randn(6, 4, requires_grad=True)
    value = loss(logits, torch.zeros(2, 3))
    assert value.item() == 0.0
    (grad,) = torch.autograd.grad(value, logits)
    assert torch.all(grad == 0)


def test_half_precision_logits_give_float32_losses():
    logits = torch.randn(6, 4, dtype=torch.bfloat16)
    assert load_balancing_loss(logits, 2).dtype == torch.float32
    assert router_z_loss(logits).dtype == torch.float32


def test_mask_of_the_wrong_size_is_rejected():
    with pytest.raises(ValueError, match="padding mask has 5 entries"):
        load_balancing_loss(torch.randn(6, 4), 2, torch.ones(5))


def test_model_helper_uses_each_blocks_own_padding_mask_and_needs_a_forward():
    torch.manual_seed(3)
    block = SparseMoeBlock([torch.nn.Linear(8, 8) for _ in range(4)], hidden_size=8, top_k=2)
    model = torch.nn.Sequential(block)
    with pytest.raises(RuntimeError, match="forward pass first"):
        moe_aux_losses(model)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    block(torch.randn(2, 5, 8), padding_mask=mask)
    losses = moe_aux_losses(model)
    torch.testing.assert_close(losses["load_balancing"], load_balancing_loss(block.router_logits, 2, mask))
    torch.testing.assert_close(losses["router_z"], router_z_loss(block.router_logits, mask))
