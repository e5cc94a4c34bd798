"""Tiny MARS parts built from configs: a Qwen2 or Llama LM, a VQ tokenizer, a text-to-image model."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mmfactory.models.components.vq import VQImageTokenizer, VQTokenizerConfig
from mmfactory.models.t2i import T2ILayout, TextToImageLM

VOCAB, CODES = 50, 16


def tiny_lm(model_type: str = "qwen2", seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=model_type == "qwen2",
    )
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_t2i(model_type: str = "qwen2", experts: str = "semvie", seed: int = 0) -> TextToImageLM:
    lm = tiny_lm(model_type, seed)
    model = TextToImageLM(lm, T2ILayout(VOCAB, CODES, experts))
    with torch.no_grad():  # experts start as copies; move them so that routing is visible in outputs
        for name, p in model.named_parameters():
            if ".image." in name:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_vq(quantizer: str = "vq") -> VQImageTokenizer:
    torch.manual_seed(0)
    config = VQTokenizerConfig(
        hidden_sizes=[8, 16], embed_dim=4, codebook_size=CODES, quantizer=quantizer, fsq_levels=[4, 4]
    )
    return VQImageTokenizer(config)


@pytest.fixture(params=["qwen2", "llama"])
def model_type(request):
    return request.param
