import math

import pytest
import torch

from mmfactory.losses.distill import (
    forward_kl,
    forward_kl_topk,
    generalized_jsd,
    reverse_kl,
    shift_for_next_token,
    teacher_topk,
)

B, T, V = 2, 5, 7


# ---- naive references: explicit loops over tokens and vocabulary --------------------------------------


def _probs(logits: torch.Tensor, temperature: float) -> list[torch.Tensor]:
    z = logits / temperature
    e = [torch.exp(z[v] - z.max()) for v in range(len(z))]
    total = sum(e)
    return [x / total for x in e]


def _kl(p: list[torch.Tensor], q: list[torch.Tensor]) -> torch.Tensor:
    return sum(p[v] * (torch.log(p[v]) - torch.log(q[v])) for v in range(len(p)))


def naive(kind, student, teacher, mask, temperature=1.0, beta=0.5, subtract_teacher_entropy=False):
    total, count = torch.zeros((), dtype=student.dtype), 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not mask[b, t]:
                continue
            p_s, p_t = _probs(student[b, t], temperature), _probs(teacher[b, t], temperature)
            if kind == "forward":
                d = -sum(p_t[v] * torch.log(p_s[v]) for v in range(len(p_s)))
                if subtract_teacher_entropy:
                    d = d + sum(p_t[v] * torch.log(p_t[v]) for v in range(len(p_t)))
            elif kind == "reverse":
                d = _kl(p_s, p_t)
            else:
                m = [beta * p_t[v] + (1 - beta) * p_s[v] for v in range(len(p_s))]
                d = beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)
            total, count = total + d, count + 1
    return total / max(count, 1)


def naive_topk(student, topk_logprobs, topk_indices, mask, temperature=1.0):
    total, count = torch.zeros((), dtype=student.dtype), 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if mask[b, t]:
                p_s = _probs(student[b, t], temperature)
                q_t = _probs(topk_logprobs[b, t], temperature)
                idx = topk_indices[b, t].tolist()
                total = total - sum(q_t[k] * torch.log(p_s[idx[k]]) for k in range(len(idx)))
                count += 1
    return total / max(count, 1)


# ---- helpers -----------------------------------------------------------------------------------------


def _inputs(seed=0, b=B, t=T, v=V):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(b, t, v, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = (2 * torch.randn(b, t, v, generator=g, dtype=torch.float64)).requires_grad_()
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, 0], mask[1] = True, False  # one sequence with no response token at all
    return student, teacher, mask


def _value_and_grads(loss_fn, *tensors):
    loss = loss_fn()
    grads = torch.autograd.grad(loss, tensors)
    return loss.detach(), grads


FNS = {"forward": forward_kl, "reverse": reverse_kl, "jsd": generalized_jsd}


# ---- tests -------------------------------------------------------------------------------------------


def test_hand_computed_values():
    # teacher p_T = (1/2, 1/2); student p_S = (1/4, 3/4)
    student = torch.tensor([[[0.0, math.log(3.0)]]])
    teacher = torch.zeros(1, 1, 2)
    mask = torch.ones(1, 1, dtype=torch.bool)
    # -(0.5 ln 0.25 + 0.5 ln 0.75)
    assert forward_kl(student, teacher, mask).item() == pytest.approx(0.8369882, abs=1e-6)
    # minus the teacher entropy ln 2
    assert forward_kl(student, teacher, mask, subtract_teacher_entropy=True).item() == pytest.approx(
        0.1438410, abs=1e-6
    )
    # 0.25 ln(0.25/0.5) + 0.75 ln(0.75/0.5)
    assert reverse_kl(student, teacher, mask).item() == pytest.approx(0.1308120, abs=1e-6)
    # m = (0.375, 0.625); 0.5 KL(p_T || m) + 0.5 KL(p_S || m)
    assert generalized_jsd(student, teacher, mask, beta=0.5).item() == pytest.approx(0.0338221, abs=1e-6)


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        ("forward", {}),
        ("forward", {"temperature": 2.0}),
        ("forward", {"temperature": 0.5, "subtract_teacher_entropy": True}),
        ("reverse", {}),
        ("reverse", {"temperature": 3.0}),
        ("jsd", {"beta": 0.5}),
        ("jsd", {"beta": 0.2, "temperature": 2.0}),
    ],
)
def test_matches_naive_forward_and_grad(kind, kwargs):
    student, teacher, mask = _inputs()
    got, got_grads = _value_and_grads(lambda: FNS[kind](student, teacher, mask, **kwargs), student, teacher)
    want, want_grads = _value_and_grads(
        lambda: naive(kind, student, teacher, mask, **kwargs), student, teacher
    )
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)
    assert got_grads[0][1].abs().sum() == 0  # unmasked positions get no gradient


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_scale_by_temperature_squared(kind):
    student, teacher, mask = _inputs()
    plain = FNS[kind](student, teacher, mask, temperature=2.5)
    scaled = FNS[kind](student, teacher, mask, temperature=2.5, scale_by_temperature_squared=True)
    torch.testing.assert_close(scaled, 6.25 * plain)


def test_jsd_limits_are_forward_and_reverse_kl():
    student, teacher, mask = _inputs()
    fkl = forward_kl(student, teacher, mask, subtract_teacher_entropy=True)
    rkl = reverse_kl(student, teacher, mask)
    torch.testing.assert_close(generalized_jsd(student, teacher, mask, beta=0.0), fkl)
    torch.testing.assert_close(generalized_jsd(student, teacher, mask, beta=1.0), rkl)
    eps = 1e-5
    torch.testing.assert_close(
        generalized_jsd(student, teacher, mask, beta=eps) / eps, fkl, rtol=1e-3, atol=0
    )
    torch.testing.assert_close(
        generalized_jsd(student, teacher, mask, beta=1 - eps) / eps, rkl, rtol=1e-3, atol=0
    )
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(student, teacher, mask, beta=1.5)


def _all_losses(student, teacher, mask):
    topk = teacher_topk(teacher, 3)
    return [
        forward_kl(student, teacher, mask),
        forward_kl(student, teacher, mask, subtract_teacher_entropy=True),
        reverse_kl(student, teacher, mask),
        generalized_jsd(student, teacher, mask, beta=0.3),
        forward_kl_topk(student, *topk, mask),
    ]


def test_all_masked_is_zero_with_zero_grad():
    student, teacher, _ = _inputs()
    mask = torch.zeros(B, T, dtype=torch.bool)
    for loss in _all_losses(student, teacher, mask):
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_length_one_sequences():
    # T = 1: after the next-token shift nothing is left to distil.
    student, teacher, _ = _inputs(t=1)
    labels = torch.tensor([[5], [6]])
    s, mask = shift_for_next_token(student, labels)
    assert s.shape == (B, 0, V) and mask.shape == (B, 0)
    for loss in _all_losses(s, teacher[:, :-1], mask):
        assert loss.item() == 0.0
        assert torch.autograd.grad(loss, student)[0].abs().sum() == 0
    # One token per sequence: the mean is over that single token.
    student, teacher, _ = _inputs(t=1)
    mask = torch.tensor([[True], [False]])
    torch.testing.assert_close(
        forward_kl(student, teacher, mask), naive("forward", student[:1], teacher[:1], mask[:1])
    )


def test_shift_for_next_token_aligns_logits_with_the_next_label():
    student, teacher, _ = _inputs()
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 3, 6]])
    s, mask = shift_for_next_token(student, labels)
    t, _ = shift_for_next_token(teacher, labels)
    assert torch.equal(mask, torch.tensor([[False, True, True, False], [True, True, True, True]]))
    # Position t-1 predicts label t: naive loop over the unshifted tensors.
    want = naive(
        "forward",
        torch.stack([student[b, t - 1] for b in range(B) for t in range(1, T) if labels[b, t] != -100])[None],
        torch.stack([teacher[b, t - 1] for b in range(B) for t in range(1, T) if labels[b, t] != -100])[None],
        torch.ones(1, 6, dtype=torch.bool),
    )
    torch.testing.assert_close(forward_kl(s, t, mask), want)


def test_vocab_mismatch_raises_naming_both_sizes():
    student, _, mask = _inputs()
    teacher = torch.randn(B, T, V + 3)
    for fn in FNS.values():
        with pytest.raises(
            ValueError, match=rf"student vocabulary size {V} != teacher vocabulary size {V + 3}"
        ):
            fn(student, teacher, mask)
    logprobs, indices = torch.zeros(B, T, 2), torch.full((B, T, 2), V + 2)
    with pytest.raises(ValueError, match=rf"token id {V + 2} is outside the student vocabulary of size {V}"):
        forward_kl_topk(student, logprobs, indices, mask)


def test_bad_mask_and_temperature_raise():
    student, teacher, mask = _inputs()
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        forward_kl(student, teacher, mask[:, :-1])
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        forward_kl(student, teacher, mask.float())
    with pytest.raises(ValueError, match="temperature"):
        reverse_kl(student, teacher, mask, temperature=0.0)


@pytest.mark.parametrize("kwargs", [{}, {"temperature": 2.0, "subtract_teacher_entropy": True}])
def test_topk_with_k_equal_vocab_matches_full(kwargs):
    student, teacher, mask = _inputs()
    logprobs, indices = teacher_topk(teacher.detach(), V)
    got, (got_grad,) = _value_and_grads(
        lambda: forward_kl_topk(student, logprobs, indices, mask, **kwargs), student
    )
    want, (want_grad,) = _value_and_grads(lambda: forward_kl(student, teacher, mask, **kwargs), student)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


def test_topk_renormalises_teacher_and_matches_naive():
    student, teacher, mask = _inputs()
    logprobs, indices = teacher_topk(teacher.detach(), 3)
    assert logprobs.shape == indices.shape == (B, T, 3)
    torch.testing.assert_close(logprobs, torch.log_softmax(teacher.detach(), -1).gather(-1, indices))
    for temperature in (1.0, 2.0):
        got, (got_grad,) = _value_and_grads(
            lambda t=temperature: forward_kl_topk(student, logprobs, indices, mask, temperature=t), student
        )
        want, (want_grad,) = _value_and_grads(
            lambda t=temperature: naive_topk(student, logprobs, indices, mask, temperature=t), student
        )
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_grad, want_grad)
    # Shifting the stored log-probs by a per-token constant (unnormalised logits) changes nothing.
    shifted = forward_kl_topk(student, logprobs + torch.randn(B, T, 1, dtype=torch.float64), indices, mask)
    torch.testing.assert_close(shifted, forward_kl_topk(student, logprobs, indices, mask))
    with pytest.raises(ValueError, match="same shape"):
        forward_kl_topk(student, logprobs, indices[..., :2], mask)


def test_teacher_ruling_out_tokens_with_minus_inf_stays_finite():
    student, teacher, mask = _inputs()
    teacher = teacher.detach().clone()
    teacher[..., 0] = float("-inf")  # token 0 impossible for the teacher
    for loss in (
        forward_kl(student, teacher, mask, subtract_teacher_entropy=True),
        generalized_jsd(student, teacher, mask, beta=0.5),
    ):
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # Forward KL matches the naive value with token 0 given negligible (e^-60) teacher mass.
    want = naive("forward", student, teacher.nan_to_num(neginf=-60.0), mask, subtract_teacher_entropy=True)
    torch.testing.assert_close(forward_kl(student, teacher, mask, subtract_teacher_entropy=True), want)
    assert torch.isinf(reverse_kl(student, teacher, mask))  # the student puts mass where p_T = 0


def test_half_precision_logits_are_upcast():
    student, teacher, mask = _inputs()
    s16, t16 = student.detach().bfloat16(), teacher.detach().bfloat16()
    loss = forward_kl(s16, t16, mask)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, forward_kl(s16.float(), t16.float(), mask))
