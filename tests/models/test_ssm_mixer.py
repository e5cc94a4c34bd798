"""MambaMixer: parity with transformers' MambaMixer (torch path) on shared weights, init, causality."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import MambaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer

from mmfactory.models.components.ssm import MambaMixer


def hf_and_ours(d_model, d_state, expand, chunk_size):
    """transformers' mixer (random init) and ours with its state dict loaded."""
    torch.manual_seed(0)
    config = MambaConfig(
        hidden_size=d_model, state_size=d_state, expand=expand, conv_kernel=4, num_hidden_layers=1
    )
    hf = HFMambaMixer(config, layer_idx=0)
    ours = MambaMixer(d_model, d_state=d_state, d_conv=4, expand=expand, chunk_size=chunk_size)
    ours.load_state_dict(hf.state_dict())  # strict: same parameter names and shapes
    return hf, ours


@pytest.mark.parametrize(("expand", "length", "chunk_size"), [(1, 13, 4), (2, 9, None), (1, 1, None)])
def test_matches_transformers_forward_and_grads(expand, length, chunk_size):
    hf, ours = hf_and_ours(d_model=32, d_state=4, expand=expand, chunk_size=chunk_size)
    x = torch.randn(2, length, 32)
    outputs, grads = [], []
    for mixer in (hf, ours):
        x_ = x.clone().requires_grad_()
        out = mixer(x_)
        params = dict(mixer.named_parameters())
        names = sorted(params)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        outputs.append(out)
        grads.append(
            dict(
                zip(
                    ["input", *names],
                    torch.autograd.grad(loss, [x_, *(params[n] for n in names)]),
                    strict=True,
                )
            )
        )
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name, hf_grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], hf_grad, rtol=1e-4, atol=1e-6, msg=name)


def test_init_follows_mamba_ssm():
    d_model, d_state, dt_min, dt_max = 40, 6, 1e-3, 0.1
    mixer = MambaMixer(d_model, d_state=d_state, expand=1, dt_min=dt_min, dt_max=dt_max)
    assert mixer.dt_rank == math.ceil(d_model / 16)
    assert mixer.x_proj.out_features == mixer.dt_rank + 2 * d_state
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1.0, d_state + 1)).expand(d_model, -1))
    torch.testing.assert_close(mixer.D, torch.ones(d_model))
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= dt_min * (1 - 1e-4) and dt.max() <= dt_max * (1 + 1e-4)
    assert mixer.dt_proj.weight.abs().max() <= mixer.dt_rank**-0.5


def test_causal():
    torch.manual_seed(0)
    mixer = MambaMixer(16, d_state=4, expand=1, chunk_size=3)
    x = torch.randn(1, 10, 16)
    changed = x.clone()
    changed[:, 6:] += torch.randn(1, 4, 16)
    out, out_changed = mixer(x), mixer(changed)
    torch.testing.assert_close(out[:, :6], out_changed[:, :6])
    assert not torch.allclose(out[:, 6:], out_changed[:, 6:])


def test_bfloat16_close_to_float32():
    torch.manual_seed(0)
    mixer = MambaMixer(32, d_state=4, expand=1)
    x = torch.randn(2, 20, 32)
    reference = mixer(x)
    out = mixer.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() <= 3e-2 * reference.abs().max()
