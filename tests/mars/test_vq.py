"""The VQ image tokenizer: encode -> decode shapes and determinism, the straight-through gradient path, code
usage statistics, save/load through AutoModel, and refused settings."""

import pytest
import torch
from transformers import AutoModel

from mmfactory.config import ConfigError
from mmfactory.models.components.vq import VQTokenizerConfig, check_vq_config, code_usage
from tests.mars.conftest import CODES, tiny_vq


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_encode_decode_shapes_and_determinism(quantizer):
    vq = tiny_vq(quantizer).train()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    vq(x)  # the first training batch initialises a k-means codebook
    vq.eval()
    codes = vq.encode(x)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < vq.codebook_size
    assert torch.equal(codes, vq.encode(x))
    assert vq.decode(codes).shape == (3, 3, 16, 16)
    assert vq.encode(torch.rand(1, 3, 32, 32)).shape == (1, 16, 16)  # fully convolutional: any multiple of 2
    _, forward_codes, _ = vq(x)
    assert torch.equal(forward_codes.long(), codes)  # encode is the quantiser's own nearest code


def test_gradients_pass_the_quantiser_to_the_encoder():
    vq = tiny_vq().train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    vq(x)
    reconstruction, _, commit = vq(x)
    ((reconstruction - x).pow(2).mean() + commit).backward()
    first_conv = vq.encoder[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


def test_code_usage_counts_perplexity_and_dead_codes():
    perplexity, dead = code_usage(torch.tensor([0, 1, 2, 3]), 8)
    assert perplexity == pytest.approx(4.0) and dead == 4
    perplexity, dead = code_usage(torch.tensor([5, 5, 5]), 8)
    assert perplexity == pytest.approx(1.0) and dead == 7


def test_save_and_load_through_automodel(tmp_path):
    import mmfactory.models.components.vq  # noqa: F401 - registers the Auto classes

    vq = tiny_vq().train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    vq(x)  # EMA codebook buffers move
    vq.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path).eval()
    vq.eval()
    assert torch.equal(vq.encode(x), again.encode(x))
    assert torch.equal(vq.decode(vq.encode(x)), again.decode(again.encode(x)))
    assert again.codebook_size == CODES


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"quantizer": "pq"}, "quantizer"),
        ({"hidden_sizes": [12]}, "multiples of 8"),
        ({"codebook_decay": 1.0}, "decay"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        check_vq_config(VQTokenizerConfig(**kwargs), "vq")
