"""selective_scan (chunked, hand-written backward) against the step-by-step reference, forward and grads."""

import pytest
import torch
from transformers.models.mamba.modeling_mamba import mamba_selective_scan

from mmfactory.models.components.ssm import selective_scan, selective_scan_ref

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(length, batch=2, channels=4, state=3, dtype=torch.float32, seed=0, decay_scale=1.0):
    """Random scan inputs in mamba-ssm's shapes, all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "u": torch.randn(batch, channels, length, generator=g),
        "delta": torch.randn(batch, channels, length, generator=g),
        "A": -torch.rand(channels, state, generator=g) * 4 * decay_scale - 0.1,
        "B": torch.randn(batch, state, length, generator=g),
        "C": torch.randn(batch, state, length, generator=g),
        "D": torch.randn(channels, generator=g),
        "z": torch.randn(batch, channels, length, generator=g),
        "delta_bias": torch.randn(channels, generator=g) - 1,
    }
    return {k: v.to(dtype).requires_grad_() for k, v in inputs.items()}


def value_and_grads(fn, inputs, **kwargs):
    """Output and the gradients of a fixed random projection of it w.r.t. every tensor input."""
    out = fn(**inputs, **kwargs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    tensors = [v for v in inputs.values() if v is not None]
    return out, torch.autograd.grad((out * weight).float().sum(), tensors)


def assert_close_scaled(actual, expected, rtol):
    """Max abs error below ``rtol`` times the max magnitude of ``expected``."""
    actual, expected = actual.float(), expected.float()
    scale = expected.abs().max().clamp_min(1e-6)
    assert (actual - expected).abs().max() <= rtol * scale, (actual - expected).abs().max() / scale


@pytest.mark.parametrize(
    ("length", "chunk_size"),
    [(1, None), (1, 4), (5, 4), (12, 4), (37, 1), (37, 8), (64, 16), (600, 64), (600, None)],
)
def test_matches_reference_fp32(length, chunk_size):
    inputs = make_inputs(length)
    ref, ref_grads = value_and_grads(selective_scan_ref, inputs, delta_softplus=True)
    out, grads = value_and_grads(selective_scan, inputs, delta_softplus=True, chunk_size=chunk_size)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert_close_scaled(out, ref, 1e-5)
    for name, grad, ref_grad in zip(NAMES, grads, ref_grads, strict=True):
        assert grad.shape == inputs[name].shape, name
        assert_close_scaled(grad, ref_grad, 1e-4)


def test_matches_reference_with_time_major_memory():
    """Inputs laid out [Bt, L, X] in memory (a mixer's activations, transposed) take the no-copy path."""
    inputs = {
        k: v.detach().transpose(1, 2).contiguous().requires_grad_().transpose(1, 2) if v.ndim == 3 else v
        for k, v in make_inputs(37).items()
    }
    assert inputs["u"].stride(1) == 1
    ref, ref_grads = value_and_grads(selective_scan_ref, inputs, delta_softplus=True)
    out, grads = value_and_grads(selective_scan, inputs, delta_softplus=True, chunk_size=8)
    assert_close_scaled(out, ref, 1e-5)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert_close_scaled(grad, ref_grad, 1e-4)


def test_optional_arguments_absent():
    """No D, z, delta_bias and no softplus (positive steps given directly)."""
    inputs = make_inputs(23)
    inputs = {k: inputs[k] for k in ("u", "delta", "A", "B", "C")}
    inputs["delta"] = (inputs["delta"].detach().abs() * 0.3).requires_grad_()
    ref, ref_grads = value_and_grads(selective_scan_ref, inputs)
    out, grads = value_and_grads(selective_scan, inputs, chunk_size=6)
    assert_close_scaled(out, ref, 1e-5)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert_close_scaled(grad, ref_grad, 1e-4)


def test_bfloat16_inputs():
    """bf16 in, bf16 out; internally float32, so only the final rounding differs from the reference."""
    inputs = make_inputs(50, dtype=torch.bfloat16)
    ref, ref_grads = value_and_grads(selective_scan_ref, inputs, delta_softplus=True)
    out, grads = value_and_grads(selective_scan, inputs, delta_softplus=True, chunk_size=16)
    assert out.dtype == torch.bfloat16
    assert_close_scaled(out, ref, 1e-2)
    for name, grad, ref_grad in zip(NAMES, grads, ref_grads, strict=True):
        assert grad.dtype == torch.bfloat16, name
        assert_close_scaled(grad, ref_grad, 2e-2)


def test_strong_decay_stays_finite():
    """delta * A down to about -1e4 per step: every factor is a decay, nothing overflows."""
    inputs = make_inputs(40, decay_scale=100.0)
    inputs["delta_bias"] = (inputs["delta_bias"].detach() + 30).requires_grad_()
    ref, ref_grads = value_and_grads(selective_scan_ref, inputs, delta_softplus=True)
    out, grads = value_and_grads(selective_scan, inputs, delta_softplus=True, chunk_size=8)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert_close_scaled(out, ref, 1e-5)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert_close_scaled(grad, ref_grad, 1e-4)


def test_reference_matches_transformers_scan():
    """Our reference against transformers' independent torch fallback of mamba-ssm's selective_scan_fn."""
    inputs = {k: v.detach() for k, v in make_inputs(17).items()}
    ours = selective_scan_ref(**inputs, delta_softplus=True)
    theirs = mamba_selective_scan(
        inputs["u"],
        inputs["delta"],
        inputs["A"],
        inputs["B"],
        inputs["C"],
        D=inputs["D"],
        z=inputs["z"],
        delta_bias=inputs["delta_bias"],
        delta_softplus=True,
    )
    torch.testing.assert_close(ours, theirs)


def test_saves_no_per_step_states():
    """Autograd keeps the [Bt, Dm, L]-sized inputs and the chunk-entry states, never [Bt, Dm, L, N]."""
    batch, channels, state, length, chunk_size = 2, 4, 3, 64, 16
    inputs = make_inputs(length, batch=batch, channels=channels, state=state)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        selective_scan(**inputs, delta_softplus=True, chunk_size=chunk_size)
    input_numel = sum(v.numel() for v in inputs.values())
    pre_gate_output = batch * channels * length
    entry_states = length // chunk_size * batch * channels * state
    assert sum(saved) == input_numel + pre_gate_output + entry_states


@pytest.mark.parametrize(("batch", "length"), [(1, 1), (2, 9)])
def test_leaves_inputs_unchanged(batch, length):
    """The scan works on copies, even where a chunk of an input is already a contiguous float32 view."""
    inputs = make_inputs(length, batch=batch)
    before = {k: v.detach().clone() for k, v in inputs.items()}
    value_and_grads(selective_scan, inputs, delta_softplus=True, chunk_size=4)
    for name, tensor in inputs.items():
        assert torch.equal(tensor, before[name]), name


def test_rejects_bad_arguments():
    inputs = {k: v.detach() for k, v in make_inputs(10).items()}
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        selective_scan(**inputs, chunk_size=0)
    inputs["B"] = inputs["B"][..., :9]
    with pytest.raises(ValueError, match="B has shape"):
        selective_scan(**inputs)
