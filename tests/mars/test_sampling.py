"""Sampling: CFG mixing, top-k / top-p against naive versions, image steps draw codes only, and the KV-cache
and batched-CFG paths give the same codes as the slow paths."""

import pytest
import torch

from mmfactory.mars.sampling import SamplingConfig, cfg_mix, filter_logits, generate_mixed, sample_images
from tests.mars.conftest import CODES, VOCAB, tiny_t2i


def test_cfg_mix_is_the_guidance_formula():
    cond, uncond = torch.randn(3, 7), torch.randn(3, 7)
    assert torch.allclose(cfg_mix(cond, uncond, 1.0), cond)
    assert torch.allclose(cfg_mix(cond, uncond, 0.0), uncond)
    assert torch.allclose(cfg_mix(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))


def test_top_k_and_top_p_keep_what_the_naive_rules_keep():
    logits = torch.randn(4, 20)
    kept = filter_logits(logits, top_k=5).isfinite()
    for row, mask in zip(logits, kept, strict=True):
        assert set(mask.nonzero().flatten().tolist()) == set(row.topk(5).indices.tolist())
    kept = filter_logits(logits, top_p=0.6).isfinite()
    for row, mask in zip(logits, kept, strict=True):
        probs, order = row.softmax(-1).sort(descending=True)
        n = next(i + 1 for i in range(len(probs)) if probs[: i + 1].sum() > 0.6)
        assert set(mask.nonzero().flatten().tolist()) == set(order[:n].tolist())


def _prompts():
    return [[1, 2, 3], [4, 5, 6, 7, 8]], [1, 2]


def test_image_sampling_draws_only_codes():
    model = tiny_t2i()
    with torch.no_grad():  # make text tokens far more likely than any code: masking must still hold
        model.lm.get_output_embeddings().weight.mul_(50)
    prompts, uncond = _prompts()
    codes = sample_images(
        model, prompts, uncond, 9, SamplingConfig(cfg_scale=2.0), torch.Generator().manual_seed(0)
    )
    assert codes.shape == (2, 9) and codes.min() >= 0 and codes.max() < CODES


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_cache_and_batched_cfg_give_the_codes_of_the_slow_paths(scale):
    model = tiny_t2i()
    prompts, uncond = _prompts()
    results = []
    for use_cache, batched in [(True, True), (False, True), (True, False), (False, False)]:
        cfg = SamplingConfig(cfg_scale=scale, temperature=0.0, use_cache=use_cache, batched_cfg=batched)
        results.append(sample_images(model, prompts, uncond, 12, cfg))
    for other in results[1:]:
        assert torch.equal(results[0], other)


def test_guidance_changes_what_is_drawn():
    model = tiny_t2i()
    prompts, uncond = _prompts()
    greedy = [
        sample_images(model, prompts, uncond, 12, SamplingConfig(cfg_scale=s, temperature=0.0))
        for s in (1, 6)
    ]
    assert not torch.equal(*greedy)


def test_mixed_replies_hold_exactly_n_codes_per_image_then_text():
    model = tiny_t2i()
    # the text head's choice at each step: <img> (index V), 4 code steps and the forced </img> (ignored),
    # two words, the stop id
    script = iter([VOCAB, 5, 5, 5, 5, 5, 7, 9, 0])
    choice: dict[int, int] = {}

    def scripted_text_logits(hidden):
        logits = torch.zeros(hidden.shape[0], VOCAB + 1)
        step = len(choice)
        choice[step] = next(script, 0)
        logits[:, choice[step]] = 1.0
        return logits

    model.text_logits = scripted_text_logits  # the text steps follow the script; codes are the model's
    prompts, _ = _prompts()
    cfg = SamplingConfig(cfg_scale=1.0, temperature=1.0, top_k=3)
    replies = generate_mixed(model, prompts, 4, stop_ids={0}, max_new_tokens=20, cfg=cfg)
    for segments in replies:
        assert [kind for kind, _ in segments] == ["image", "text"]
        assert len(segments[0][1]) == 4 and all(0 <= t < CODES for t in segments[0][1])
        assert segments[1][1] == [7, 9]
