"""The CUDA paths against their references, and a recipe trained in bf16 on a GPU through the real CLI.

Run on a machine with a GPU: ``pytest -m gpu tests/gpu``. Without one every test here is skipped (the
default ``-m 'not slow and not gpu'`` deselects them anyway); the CPU suite covers the same code on CPU.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from mmfactory.cli import main
from mmfactory.mars.sampling import SamplingConfig, sample_images
from mmfactory.models.components.moe import SparseMoeBlock
from mmfactory.models.components.ssm import selective_scan, selective_scan_ref
from tests.helpers import write_recipe
from tests.mars.conftest import tiny_t2i
from tests.models.test_moe import FFN, HEADS, HIDDEN, experts_from_fused, fused_grads
from tests.models.test_ssm_scan import NAMES, assert_close_scaled, make_inputs, value_and_grads
from tests.test_recipe_llava import tiny_llava_recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


@pytest.mark.parametrize(("length", "chunk_size"), [(600, None), (600, 64), (2304, None)])
def test_selective_scan_on_cuda_matches_the_reference(length, chunk_size):
    """The CUDA chunk budget (2**26 state elements) and an explicit chunk: forward and every gradient."""
    inputs = {k: v.detach().to(CUDA).requires_grad_() for k, v in make_inputs(length, batch=2).items()}
    ref, ref_grads = value_and_grads(selective_scan_ref, inputs, delta_softplus=True)
    out, grads = value_and_grads(selective_scan, inputs, delta_softplus=True, chunk_size=chunk_size)
    assert out.device.type == "cuda"
    assert_close_scaled(out, ref, 1e-5)
    for name, grad, ref_grad in zip(NAMES, grads, ref_grads, strict=True):
        assert grad.shape == inputs[name].shape, name
        assert_close_scaled(grad, ref_grad, 1e-4)


def test_moe_block_on_cuda_matches_mixtral_forward_and_backward():
    config = MixtralConfig(
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_local_experts=4,
        num_experts_per_tok=2,
        experts_implementation="eager",
        **HEADS,
    )
    torch.manual_seed(0)
    theirs = MixtralSparseMoeBlock(config)
    for parameter in theirs.parameters():
        nn.init.normal_(parameter, std=0.3)
    ours = SparseMoeBlock(
        experts_from_fused(theirs.experts.gate_up_proj, theirs.experts.down_proj), HIDDEN, 2
    )
    ours.router.weight.data.copy_(theirs.gate.weight)
    ours, theirs = ours.to(CUDA), theirs.to(CUDA)

    x = torch.randn(4, 33, HIDDEN, device=CUDA)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=1e-4)
    weights = torch.randn_like(out_ours)
    (out_ours * weights).sum().backward()
    (out_theirs * weights).sum().backward()
    for mine, reference in zip(
        [x_ours.grad, ours.router.weight.grad, *fused_grads(ours)],
        [
            x_theirs.grad,
            theirs.gate.weight.grad,
            theirs.experts.gate_up_proj.grad,
            theirs.experts.down_proj.grad,
        ],
        strict=True,
    ):
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-4)


def test_t2i_cache_and_batched_cfg_on_cuda_draw_the_codes_of_the_slow_path():
    model = tiny_t2i().to(CUDA)
    prompts, uncond = [[1, 2, 3], [4, 5, 6, 7, 8]], [1, 2]
    codes = [
        sample_images(
            model,
            prompts,
            uncond,
            12,
            SamplingConfig(cfg_scale=3.0, temperature=0.0, use_cache=cache, batched_cfg=batched),
        )
        for cache, batched in [(True, True), (False, False)]
    ]
    assert codes[0].device.type == "cuda"
    assert torch.equal(codes[0], codes[1])


def test_llava_recipe_trains_in_bf16_on_cuda(tmp_path):
    """The runner takes the GPU and bf16 autocast from the recipe: the loss falls, frozen parts stay
    bit-identical, and the saved weights stay float32 (autocast, not a bf16 cast of the model)."""
    recipe = tiny_llava_recipe()
    recipe["defaults"]["train"]["precision"] = "bf16"
    out = tmp_path / "run"
    assert main(["run", str(write_recipe(recipe, tmp_path / "r.yaml")), "--output", str(out)]) == 0
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert metrics["instruct/train_loss"] < metrics["instruct/train_first_loss"] - 1.0
    align = load_file(out / "align/final/model.safetensors")
    instruct = load_file(out / "instruct/final/model.safetensors")
    assert all(v.dtype == torch.float32 for v in instruct.values())
    towers = [k for k in align if k.startswith("vision_tower.")]
    assert towers and all(torch.equal(align[k], instruct[k]) for k in towers)
    moved = [
        k
        for k in align
        if not k.startswith(("vision_tower.", "projector.")) and not torch.equal(align[k], instruct[k])
    ]
    assert moved, "the LM did not train in instruct"
