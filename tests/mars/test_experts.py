"""SemVIE: the text path is bit-identical to the frozen LM on text-only input (with and without a KV cache),
image tokens take the experts, experts get gradients and the LM's weights none."""

import torch
from transformers import DynamicCache

from mmfactory.models.components.experts import EXPERT_MODULES, TokenTypeRouted, add_visual_experts
from tests.mars.conftest import CODES, VOCAB, tiny_lm, tiny_t2i


def test_every_layer_gets_every_expert_and_the_lm_is_frozen(model_type):
    lm = tiny_lm(model_type)
    add_visual_experts(lm)
    routed = [n for n, m in lm.named_modules() if isinstance(m, TokenTypeRouted)]
    assert len(routed) == 2 * len(EXPERT_MODULES) + 1  # two layers and the final norm
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all(".image." in n for n in trainable)


def test_text_only_outputs_equal_the_frozen_lm_bit_for_bit(model_type):
    reference = tiny_lm(model_type)
    model = tiny_t2i(model_type)
    ids = torch.randint(0, VOCAB, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    expected = reference(input_ids=ids, attention_mask=mask).logits
    hidden, _ = model(ids, mask)
    assert torch.equal(model.lm.get_output_embeddings()(hidden), expected)


def test_text_only_decoding_with_a_kv_cache_equals_the_frozen_lm(model_type):
    reference, model = tiny_lm(model_type), tiny_t2i(model_type)
    ids = torch.randint(0, VOCAB, (2, 10))
    ref_cache, cache = DynamicCache(config=reference.config), DynamicCache(config=model.lm.config)
    ref_out = reference(input_ids=ids[:, :6], cache=ref_cache, use_cache=True).logits
    hidden, cache = model(ids[:, :6], cache=cache, use_cache=True)
    assert torch.equal(model.lm.get_output_embeddings()(hidden), ref_out)
    for t in range(6, 10):
        ref_out = reference(input_ids=ids[:, t : t + 1], cache=ref_cache, use_cache=True).logits
        hidden, cache = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        assert torch.equal(model.lm.get_output_embeddings()(hidden), ref_out)


def test_image_tokens_take_the_experts_and_text_tokens_before_them_do_not_change(model_type):
    reference, model = tiny_lm(model_type), tiny_t2i(model_type)
    ids = torch.cat([torch.randint(0, VOCAB, (2, 5)), VOCAB + torch.randint(0, CODES, (2, 4))], 1)
    hidden, _ = model(ids)
    frozen_path = reference.model(inputs_embeds=model.embed(ids)).last_hidden_state
    assert torch.allclose(hidden[:, :5], frozen_path[:, :5], atol=1e-6)  # causal: image tokens come after
    assert (hidden[:, 5:] - frozen_path[:, 5:]).abs().min() > 1e-4  # every image token took its expert


def test_routed_module_equals_a_per_token_loop():
    lm = tiny_lm()
    routing = add_visual_experts(lm, ["mlp"], final_norm=False)
    mlp = lm.model.layers[0].mlp
    with torch.no_grad():
        for p in mlp.image.parameters():
            p.add_(0.1)
    x = torch.randn(2, 7, 32)
    image = torch.rand(2, 7) < 0.5
    with routing.tokens(image):
        out = mlp(x)
    for b in range(2):
        for t in range(7):
            module = mlp.image if image[b, t] else mlp.text
            assert torch.allclose(out[b, t], module(x[b, t][None])[0], atol=1e-6)


def test_experts_get_gradients_and_frozen_text_weights_none():
    model = tiny_t2i().train()
    ids = torch.cat([torch.randint(0, VOCAB, (2, 5)), VOCAB + torch.randint(0, CODES, (2, 6))], 1)
    hidden, _ = model(ids)
    model.loss(hidden, ids)["loss"].backward()
    for name, p in model.named_parameters():
        if ".image." in name or name.startswith("new_"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
