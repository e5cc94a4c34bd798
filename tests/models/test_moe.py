"""SparseMoeBlock vs transformers' Mixtral / Qwen2-MoE blocks and a dense reference; capacity; edge cases."""

import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, MixtralConfig, Qwen2MoeConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from mmfactory.losses.moe_aux import load_balancing_loss
from mmfactory.models.components.moe import SparseMoeBlock

HIDDEN, FFN = 16, 24
HEADS = {"num_attention_heads": 2, "num_key_value_heads": 2}  # unused by the blocks; configs validate them


def gated_mlp(hidden: int = HIDDEN, ffn: int = FFN) -> LlamaMLP:
    return LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=ffn, hidden_act="silu", **HEADS))


def random_block(num_experts: int, top_k: int, seed: int = 0, **kwargs) -> SparseMoeBlock:
    torch.manual_seed(seed)
    block = SparseMoeBlock([gated_mlp() for _ in range(num_experts)], HIDDEN, top_k, **kwargs)
    with torch.no_grad():
        block.router.weight.normal_(std=0.5)  # decisive routing, no near-ties in top-k
    return block


def experts_from_fused(gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> list[LlamaMLP]:
    """transformers 5.x stores experts fused: gate_up_proj [E, 2F, H] = [gate; up], down_proj [E, H, F]."""
    experts = []
    for gate_up, down in zip(gate_up_proj, down_proj, strict=True):
        mlp = gated_mlp(gate_up.shape[1], gate_up.shape[0] // 2)
        gate, up = gate_up.detach().chunk(2, dim=0)
        mlp.gate_proj.weight.data.copy_(gate)
        mlp.up_proj.weight.data.copy_(up)
        mlp.down_proj.weight.data.copy_(down.detach())
        experts.append(mlp)
    return experts


def fused_grads(block: SparseMoeBlock) -> tuple[torch.Tensor, torch.Tensor]:
    gate_up = torch.stack(
        [torch.cat([e.gate_proj.weight.grad, e.up_proj.weight.grad]) for e in block.experts]
    )
    return gate_up, torch.stack([e.down_proj.weight.grad for e in block.experts])


def dense_reference(block: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the top-k gates scattered into a dense [N, E] matrix."""
    flat = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(block.router(flat).float(), dim=-1)
    gates, chosen = probs.topk(block.top_k, dim=-1)
    if block.normalize_topk:
        gates = gates / gates.sum(-1, keepdim=True)
    gate_matrix = torch.zeros_like(probs).scatter(1, chosen, gates)
    out = sum(gate_matrix[:, e, None] * expert(flat) for e, expert in enumerate(block.experts))
    return out.view(x.shape)


def capacity_reference(
    block: SparseMoeBlock, x: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """DeepSpeed's top-2 gating written as loops: assignments kept in DeepSpeed's order (all first choices by
    position, then the second ones) up to each expert's capacity; then, as ``top2gating`` does, each token's
    kept softmax probabilities are divided by their sum (clamped at float eps). Without
    ``capacity_renormalize``: the top-k-normalised gates of the kept assignments, unchanged."""
    flat, mask = x.reshape(-1, x.shape[-1]), mask.reshape(-1)
    probs = torch.softmax(block.router(flat).float(), dim=-1)
    top_probs, chosen = probs.topk(block.top_k, dim=-1)
    num_routed = int(mask.sum()) * block.top_k
    capacity = max(math.ceil(block.capacity_factor * num_routed / block.num_experts), block.min_capacity)
    used, dropped = [0] * block.num_experts, 0
    kept = torch.zeros_like(top_probs, dtype=torch.bool)
    for choice in range(block.top_k):
        for token in range(flat.shape[0]):
            expert = int(chosen[token, choice])
            if not mask[token]:
                continue
            if used[expert] == capacity:
                dropped += 1
                continue
            used[expert] += 1
            kept[token, choice] = True
    if block.capacity_renormalize:
        denom = (top_probs * kept).sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).eps)
        gates = top_probs * kept / denom
    else:
        gates = top_probs / top_probs.sum(-1, keepdim=True) * kept
    out = torch.zeros_like(flat)
    for token in range(flat.shape[0]):
        for choice in range(block.top_k):
            if kept[token, choice]:
                expert = int(chosen[token, choice])
                out[token] += gates[token, choice] * block.experts[expert](flat[token : token + 1])[0]
    return out.view(x.shape), dropped


def assert_grads_close(ours: list[torch.Tensor], theirs: list[torch.Tensor], atol: float = 1e-5) -> None:
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, reference, atol=atol, rtol=1e-4)


@pytest.mark.parametrize(("num_experts", "top_k"), [(4, 2), (4, 1), (3, 3)])
def test_matches_mixtral_block_and_its_aux_loss(num_experts, top_k):
    config = MixtralConfig(
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        experts_implementation="eager",
        **HEADS,
    )
    torch.manual_seed(0)
    theirs = MixtralSparseMoeBlock(config)
    for parameter in theirs.parameters():
        nn.init.normal_(parameter, std=0.3)
    ours = SparseMoeBlock(
        experts_from_fused(theirs.experts.gate_up_proj, theirs.experts.down_proj), HIDDEN, top_k
    )
    ours.router.weight.data.copy_(theirs.gate.weight)

    x = torch.randn(2, 9, HIDDEN)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=1e-4)
    weights = torch.randn_like(out_ours)
    (out_ours * weights).sum().backward()
    (out_theirs * weights).sum().backward()
    assert_grads_close(
        [x_ours.grad, ours.router.weight.grad, *fused_grads(ours)],
        [
            x_theirs.grad,
            theirs.gate.weight.grad,
            theirs.experts.gate_up_proj.grad,
            theirs.experts.down_proj.grad,
        ],
    )

    their_logits = theirs.gate(x.reshape(-1, HIDDEN))[0]
    torch.testing.assert_close(ours.router_logits, their_logits)
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, 5:] = 0
    for mask in (None, attention_mask):
        torch.testing.assert_close(
            load_balancing_loss(ours.router_logits, top_k, mask),
            load_balancing_loss_func((their_logits,), num_experts, top_k, mask),
        )


def test_matches_qwen2_moe_block_plus_its_shared_expert():
    config = Qwen2MoeConfig(
        hidden_size=HIDDEN,
        moe_intermediate_size=FFN,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        experts_implementation="eager",
        **HEADS,
    )
    torch.manual_seed(0)
    theirs = Qwen2MoeSparseMoeBlock(config)
    for parameter in theirs.parameters():
        nn.init.normal_(parameter, std=0.3)
    experts = experts_from_fused(theirs.experts.gate_up_proj, theirs.experts.down_proj)
    ours = SparseMoeBlock(experts, HIDDEN, top_k=2, normalize_topk=False)
    ours.router.weight.data.copy_(theirs.gate.weight)

    def ours_with_shared_expert(x):  # Qwen2-MoE adds sigmoid(w . x) * shared_expert(x) to the routed sum
        return ours(x) + torch.sigmoid(theirs.shared_expert_gate(x)) * theirs.shared_expert(x)

    x = torch.randn(3, 5, HIDDEN)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours = ours_with_shared_expert(x_ours)
    out_theirs = theirs(x_theirs)
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=1e-4)
    out_ours.square().sum().backward()
    our_grads = [x_ours.grad, ours.router.weight.grad, *fused_grads(ours)]
    theirs.zero_grad()
    out_theirs.square().sum().backward()
    assert_grads_close(
        our_grads,
        [
            x_theirs.grad,
            theirs.gate.weight.grad,
            theirs.experts.gate_up_proj.grad,
            theirs.experts.down_proj.grad,
        ],
    )


@pytest.mark.parametrize(("num_experts", "top_k"), [(1, 1), (4, 1), (4, 2), (4, 4)])
@pytest.mark.parametrize("num_tokens", [1, 13])
@pytest.mark.parametrize("normalize_topk", [True, False])
def test_forward_and_gradients_match_dense_reference(num_experts, top_k, num_tokens, normalize_topk):
    block = random_block(num_experts, top_k, normalize_topk=normalize_topk)
    x = torch.randn(1, num_tokens, HIDDEN)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = block(x_ours)
    grad_out = torch.randn_like(out)
    our_grads = torch.autograd.grad(out, [x_ours, *block.parameters()], grad_out)
    expected = dense_reference(block, x_ref)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    reference_grads = torch.autograd.grad(expected, [x_ref, *block.parameters()], grad_out, allow_unused=True)
    for mine, reference in zip(our_grads, reference_grads, strict=True):  # unused expert: zeros vs None
        torch.testing.assert_close(
            mine, torch.zeros_like(mine) if reference is None else reference, atol=1e-5, rtol=1e-4
        )


def test_one_expert_top1_is_the_expert_itself():
    block = random_block(num_experts=1, top_k=1)
    x = torch.randn(2, 3, HIDDEN)
    torch.testing.assert_close(block(x), block.experts[0](x))


def test_padding_tokens_are_not_routed_and_real_tokens_unchanged():
    block = random_block(4, 2)
    x = torch.randn(2, 6, HIDDEN)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = block(x, padding_mask=mask)
    assert torch.equal(block.padding_mask, mask.reshape(-1))
    assert torch.all(out[~mask] == 0)
    torch.testing.assert_close(out[mask], block(x)[mask])


def test_all_padding_gives_zeros_and_zero_gradients_for_every_parameter():
    block = random_block(4, 2)
    x = torch.randn(2, 3, HIDDEN, requires_grad=True)
    out = block(x, padding_mask=torch.zeros(2, 3))
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.all(x.grad == 0)
    for name, parameter in block.named_parameters():  # every expert ran (on zero rows): DDP/FSDP-safe
        assert parameter.grad is not None, name
        assert torch.all(parameter.grad == 0), name


def test_padding_mask_of_the_wrong_size_is_rejected():
    with pytest.raises(ValueError, match="padding_mask has 5 entries for 6 tokens"):
        random_block(4, 2)(torch.randn(2, 3, HIDDEN), padding_mask=torch.ones(5))


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("with_padding", [False, True])
def test_capacity_drops_match_deepspeed_order_reference(with_padding, renormalize):
    block = random_block(4, 2, capacity_factor=0.5, min_capacity=1)
    block.capacity_renormalize = renormalize
    x = torch.randn(2, 12, HIDDEN, requires_grad=True)
    mask = torch.ones(2, 12, dtype=torch.bool)
    if with_padding:
        mask[0, 8:] = False
    out = block(x, padding_mask=mask)
    expected, dropped = capacity_reference(block, x, mask)
    assert block.dropped_assignments == dropped > 0
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    (grad_ours,) = torch.autograd.grad(out.square().sum(), x)
    (grad_ref,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(grad_ours, grad_ref, atol=1e-5, rtol=1e-4)


def test_capacity_keeps_earlier_tokens_when_all_choose_one_expert():
    block = random_block(4, 1, capacity_factor=1.0, min_capacity=1)
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[2, 0] = 10.0  # every token (feature 0 = 1) picks expert 2
    x = torch.randn(1, 8, HIDDEN)
    x[..., 0] = 1.0
    out = block(x)  # capacity = ceil(1.0 * 8 / 4) = 2
    assert block.dropped_assignments == 6
    torch.testing.assert_close(out[0, :2], block.experts[2](x[0, :2]))
    assert torch.all(out[0, 2:] == 0)


def test_generous_capacity_equals_dropless():
    x = torch.randn(2, 7, HIDDEN)
    dropless = random_block(4, 2)(x)
    block = random_block(4, 2, capacity_factor=2.0)
    torch.testing.assert_close(block(x), dropless)
    assert block.dropped_assignments == 0


def test_router_jitter_only_in_training_and_only_on_the_router_input():
    x = torch.randn(2, 5, HIDDEN)
    block = random_block(4, 2, router_jitter=0.5).eval()
    block(x)
    torch.testing.assert_close(block.router_logits, block.router(x.reshape(-1, HIDDEN)))
    block.train()
    block(x)
    assert not torch.allclose(block.router_logits, block.router(x.reshape(-1, HIDDEN)))
    single = random_block(1, 1, router_jitter=0.5).train()  # gate is always 1: output = expert(clean x)
    torch.testing.assert_close(single(x), single.experts[0](x))


def test_invalid_settings_are_rejected():
    experts = [gated_mlp() for _ in range(2)]
    with pytest.raises(ValueError, match="top_k"):
        SparseMoeBlock(experts, HIDDEN, top_k=3)
    with pytest.raises(ValueError, match="capacity_factor"):
        SparseMoeBlock(experts, HIDDEN, top_k=1, capacity_factor=0.0)


def test_bfloat16_block_keeps_its_dtype_and_tracks_float32():
    block = random_block(4, 2)
    x = torch.randn(2, 5, HIDDEN)
    expected = block(x)
    out = block.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and block.router_logits.dtype == torch.float32  # the router in fp32
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


def test_router_runs_in_float32_under_bf16_autocast_and_a_bf16_model():
    block = random_block(4, 2)
    x = torch.randn(2, 5, HIDDEN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block(x)
    assert block.router_logits.dtype == torch.float32
    torch.testing.assert_close(
        block.router_logits, x.reshape(-1, HIDDEN) @ block.router.weight.T, rtol=0, atol=0
    )
    block.experts.to(torch.bfloat16)  # a model cast to bf16, its router kept in fp32 (as upcycle leaves it)
    block(x.bfloat16())
    assert block.router_logits.dtype == torch.float32
    low = random_block(4, 2)
    low.router_fp32 = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low(x)
    assert low.router_logits.dtype == torch.bfloat16
