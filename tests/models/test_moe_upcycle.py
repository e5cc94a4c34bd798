"""Upcycling tiny Qwen2 / Llama decoders: dense equivalence, layer choice, save/load, counts, aux losses."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from mmfactory.losses.moe_aux import moe_aux_losses
from mmfactory.models.components.moe import (
    SparseMoeBlock,
    load_upcycled,
    moe_blocks,
    moe_param_counts,
    select_moe_layers,
    upcycle,
)

TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}
CONFIGS = {
    "qwen2": lambda: Qwen2Config(**TINY, tie_word_embeddings=True),
    "llama": lambda: LlamaConfig(**TINY),
}


def tiny_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    return input_ids, attention_mask


def perturb_experts(model: torch.nn.Module) -> None:
    """Make the experts (and routers) differ, as after training."""
    with torch.no_grad():
        for parameter in (p for block in moe_blocks(model) for p in block.parameters()):
            parameter.add_(0.2 * torch.randn_like(parameter))


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_upcycled_model_computes_the_dense_model(arch):
    model = tiny_model(arch)
    input_ids, attention_mask = batch()
    with torch.no_grad():
        dense_logits = model(input_ids, attention_mask=attention_mask).logits
    dense_mlp_state = {k: v.clone() for k, v in model.model.layers[0].mlp.state_dict().items()}

    assert upcycle(model) == [0, 2]
    layers = model.model.layers
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in layers] == [True, False, True, False]
    block = layers[0].mlp
    assert (block.num_experts, block.top_k, block.router.bias) == (4, 2, None)
    for expert in block.experts:
        for name, tensor in expert.state_dict().items():
            assert torch.equal(tensor, dense_mlp_state[name])
    assert block.experts[0].down_proj.weight is not block.experts[1].down_proj.weight  # copies, not shared
    with torch.no_grad():
        upcycled_logits = model(input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(upcycled_logits, dense_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        ("sparse", [0, 2, 4]),
        ("first_half", [0, 1]),
        ("second_half", [2, 3, 4]),
        ("dense", [0, 1, 2, 3, 4]),
        ([3, 1], [1, 3]),
    ],
)
def test_select_moe_layers(layers, expected):
    assert select_moe_layers(layers, 5) == expected


@pytest.mark.parametrize("layers", ["every_third", [], [0, 0], [4], [-1]])
def test_select_moe_layers_rejects_bad_selections(layers):
    with pytest.raises(ValueError):
        select_moe_layers(layers, 4)


def test_upcycling_twice_is_rejected():
    model = tiny_model("llama")
    upcycle(model, layers=[1])
    with pytest.raises(ValueError, match=r"already upcycled \(MoE layers \[1\]\)"):
        upcycle(model, layers=[0])


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_save_and_load_upcycled_gives_the_same_logits(arch, tmp_path):
    model = tiny_model(arch)
    upcycle(model, num_experts=3, top_k=1, layers="second_half", capacity_factor=1.5, normalize_topk=False)
    perturb_experts(model)
    input_ids, attention_mask = batch()
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
    model.save_pretrained(tmp_path)

    loaded, info = load_upcycled(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(loaded).__name__ == type(model).__name__
    assert loaded.config.moe_upcycling == model.config.moe_upcycling
    assert [type(layer.mlp) is SparseMoeBlock for layer in loaded.model.layers] == [False, False, True, True]
    block = loaded.model.layers[2].mlp
    assert (block.num_experts, block.top_k, block.capacity_factor, block.normalize_topk) == (3, 1, 1.5, False)
    with torch.no_grad():
        logits = loaded(input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_load_upcycled_rejects_a_dense_checkpoint(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="moe_upcycling"):
        load_upcycled(tmp_path)


def test_param_counts():
    model = tiny_model("llama")
    dense_total = sum(p.numel() for p in model.parameters())
    mlp = sum(p.numel() for p in model.model.layers[0].mlp.parameters())
    upcycle(model, num_experts=4, top_k=2, layers="sparse")
    router = TINY["hidden_size"] * 4
    counts = moe_param_counts(model)
    assert counts["total"] == dense_total + 2 * (3 * mlp + router)  # two MoE layers, three extra experts each
    assert counts["activated"] == dense_total + 2 * (1 * mlp + router)  # two of four experts run per token


def test_aux_losses_sum_the_layers_with_padding_masked():
    model = tiny_model("qwen2")
    upcycle(model)
    perturb_experts(model)
    input_ids, attention_mask = batch()
    model(input_ids, attention_mask=attention_mask)
    losses = moe_aux_losses(model, attention_mask)
    per_layer = [
        load_balancing_loss_func((b.router_logits,), 4, 2, attention_mask) for b in moe_blocks(model)
    ]
    torch.testing.assert_close(losses["load_balancing"], sum(per_layer))
    pooled = load_balancing_loss_func(tuple(b.router_logits for b in moe_blocks(model)), 4, 2, attention_mask)
    assert not torch.allclose(losses["load_balancing"], pooled)  # transformers pools the layers instead


def test_aux_losses_of_groups_add_up_as_separate_forwards():
    model = tiny_model("qwen2")
    upcycle(model)
    perturb_experts(model)
    input_ids, attention_mask = batch()
    separate = []
    for rows in (slice(0, 1), slice(1, 2)):
        model(input_ids[rows], attention_mask=attention_mask[rows])
        separate.append(moe_aux_losses(model, attention_mask[rows]))
    model(input_ids, attention_mask=attention_mask)
    grouped = moe_aux_losses(model, attention_mask, groups=2)
    for key in ("load_balancing", "router_z"):
        torch.testing.assert_close(grouped[key], separate[0][key] + separate[1][key])
    assert not torch.allclose(
        grouped["load_balancing"], moe_aux_losses(model, attention_mask)["load_balancing"]
    )


def test_aux_losses_of_a_model_without_moe_are_zero():
    assert all(v.item() == 0 for v in moe_aux_losses(tiny_model("llama")).values())


def test_aux_loss_reaches_the_routers_under_gradient_checkpointing():
    model = tiny_model("llama")
    upcycle(model, layers="dense")
    model.activation_checkpointing_enable()
    model.train()
    input_ids, attention_mask = batch()
    model(input_ids, attention_mask=attention_mask)
    moe_aux_losses(model, attention_mask)["load_balancing"].backward()  # the aux loss alone
    for block in moe_blocks(model):
        assert block.router.weight.grad.abs().sum() > 0
