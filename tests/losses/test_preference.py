import math

import pytest
import torch

from mmfactory.losses.preference import dpo_loss, kto_pair_loss, sequence_logprobs


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-x))


# ---- naive references ----------------------------------------------------------------------------------


def naive_sequence_logprobs(logits, labels, ignore_index=-100):
    logps, counts = [], []
    for b in range(logits.shape[0]):
        total, n = torch.zeros((), dtype=logits.dtype), 0
        for t in range(1, logits.shape[1]):  # label t is predicted at position t - 1
            if labels[b, t] != ignore_index:
                row = logits[b, t - 1]
                total = total + row[labels[b, t]] - torch.log(torch.exp(row).sum())
                n += 1
        logps.append(total)
        counts.append(n)
    return torch.stack(logps), torch.tensor(counts)


def naive_dpo(pc, pr, rc, rr, beta, eps):
    losses = []
    for i in range(len(pc)):
        h = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
        losses.append(-(1 - eps) * torch.log(_sigmoid(h)) - eps * torch.log(_sigmoid(-h)))
    return sum(losses) / len(losses)


def naive_kto_pair(pc, pr, rc, rr, beta, detach):
    r_w = [pc[i] - rc[i] for i in range(len(pc))]
    r_l = [pr[i] - rr[i] for i in range(len(pr))]
    z_w = torch.clamp(sum(r_w) / len(r_w), min=0)
    z_l = torch.clamp(sum(r_l) / len(r_l), min=0)
    if detach:
        z_w, z_l = z_w.detach(), z_l.detach()
    terms = [1 - _sigmoid(beta * (r - z_l)) for r in r_w] + [1 - _sigmoid(beta * (z_w - r)) for r in r_l]
    return sum(terms) / len(terms)


def _logps(seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    return [(-10 * torch.rand(b, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(4)]


# ---- sequence_logprobs -----------------------------------------------------------------------------------


def test_sequence_logprobs_matches_naive_forward_and_grad():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :3] = -100  # prompt
    labels[1, :] = -100  # no response token at all
    labels[2, -1] = -100  # padding
    got, got_counts = sequence_logprobs(logits, labels)
    want, want_counts = naive_sequence_logprobs(logits, labels)
    torch.testing.assert_close(got, want)
    assert torch.equal(got_counts, want_counts) and got_counts.tolist() == [3, 0, 4]
    assert got[1].item() == 0.0
    weights = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), logits)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), logits)
    torch.testing.assert_close(got_grad, want_grad)
    assert got_grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_sequence_logprobs_hand_value_and_length_one():
    # V = 2, uniform logits: each response token has log-prob ln(1/2).
    logits = torch.zeros(1, 4, 2)
    labels = torch.tensor([[-100, 1, 0, -100]])
    logps, counts = sequence_logprobs(logits, labels)
    assert logps.item() == pytest.approx(2 * math.log(0.5)) and counts.item() == 2
    logps, counts = sequence_logprobs(torch.randn(2, 1, 5, requires_grad=True), torch.tensor([[3], [4]]))
    assert logps.tolist() == [0.0, 0.0] and counts.tolist() == [0, 0]
    with pytest.raises(ValueError, match="disagree"):
        sequence_logprobs(torch.zeros(1, 4, 2), torch.zeros(1, 3, dtype=torch.long))


def test_sequence_logprobs_upcasts_bfloat16():
    logits = torch.randn(2, 5, 9).bfloat16()
    labels = torch.randint(0, 9, (2, 5))
    logps, _ = sequence_logprobs(logits, labels)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, sequence_logprobs(logits.float(), labels)[0])


# ---- DPO -------------------------------------------------------------------------------------------------


def test_dpo_hand_computed():
    # h = (-1 - -2) - (-3 - -2) = 2, beta h = 0.2
    pc, pr, rc, rr = (torch.tensor([x]) for x in (-1.0, -3.0, -2.0, -2.0))
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(0.5981389, abs=1e-6)  # log(1 + e^-0.2)
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.1)
    # 0.9 log(1 + e^-0.2) + 0.1 log(1 + e^0.2)
    loss, *_ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.6181389, abs=1e-6)


@pytest.mark.parametrize(("beta", "eps"), [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_matches_naive_forward_and_grad(beta, eps):
    inputs = _logps()
    loss, chosen, rejected = dpo_loss(*inputs, beta=beta, label_smoothing=eps)
    want = naive_dpo(*inputs, beta, eps)
    torch.testing.assert_close(loss, want)
    for g, w in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(want, inputs), strict=True):
        torch.testing.assert_close(g, w)
    assert not chosen.requires_grad and not rejected.requires_grad
    torch.testing.assert_close(chosen, beta * (inputs[0] - inputs[2]).detach())


def test_dpo_rejects_bad_inputs():
    pc, pr, rc, rr = _logps()
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, label_smoothing=0.7)
    with pytest.raises(ValueError, match=r"\[B\]"):
        dpo_loss(pc, pr[:2], rc, rr)


# ---- paired KTO ------------------------------------------------------------------------------------------


def test_kto_pair_hand_computed():
    # r_w = (1, 3) -> z_w = 2;  r_l = (-2, 0) -> mean -1 -> z_l = 0;  beta = 1
    # loss = mean(1-s(1-0), 1-s(3-0), 1-s(2+2), 1-s(2-0)) = mean(s(-1), s(-3), s(-4), s(-2))
    pc, rc = torch.tensor([1.0, 3.0]), torch.zeros(2)
    pr, rr = torch.tensor([-2.0, 0.0]), torch.zeros(2)
    loss, chosen, rejected = kto_pair_loss(pc, pr, rc, rr, beta=1.0)
    assert loss.item() == pytest.approx(0.1133891, abs=1e-6)
    assert chosen.tolist() == [1.0, 3.0] and rejected.tolist() == [-2.0, 0.0]


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_kto_pair_matches_naive_forward_and_grad(detach, beta):
    inputs = _logps(seed=1)
    with torch.no_grad():  # make both reference points positive so that they carry gradient when attached
        inputs[0] += 3.0
        inputs[1] += 3.0
    loss, *_ = kto_pair_loss(*inputs, beta=beta, detach_reference_point=detach)
    want = naive_kto_pair(*inputs, beta, detach)
    torch.testing.assert_close(loss, want)
    for g, w in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(want, inputs), strict=True):
        torch.testing.assert_close(g, w)


def test_kto_pair_detach_changes_only_the_gradient():
    inputs = _logps(seed=1)
    with torch.no_grad():
        inputs[0] += 3.0
        inputs[1] += 3.0
    detached, *_ = kto_pair_loss(*inputs, beta=1.0, detach_reference_point=True)
    attached, *_ = kto_pair_loss(*inputs, beta=1.0, detach_reference_point=False)
    assert detached.item() == attached.item()
    g_detached = torch.autograd.grad(detached, inputs[0])[0]
    g_attached = torch.autograd.grad(attached, inputs[0])[0]
    assert not torch.allclose(g_detached, g_attached)
    # Detached: d loss / d lp_pi(yw_i) = -(beta / 2B) s'(beta (r_w_i - z_l)) only.
    r_w, r_l = (inputs[0] - inputs[2]).detach(), (inputs[1] - inputs[3]).detach()
    s = _sigmoid(r_w - r_l.mean().clamp(min=0))
    torch.testing.assert_close(g_detached, -s * (1 - s) / (2 * len(r_w)))
