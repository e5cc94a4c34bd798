"""Token-level distillation divergences between student and teacher logits (LLaVA-MoD mimic distillation).

Every loss takes logits that are already aligned (position ``t`` of both predicts the same token) and a
boolean ``mask`` ``[B, T]`` of the positions to distil (response tokens), and returns the mean over masked
tokens of a per-token divergence, ``(1/|M|) sum_{t in M} D_t``, as a float32 (or float64) scalar. With no
masked token the loss is 0 and its gradient is zero, never NaN.

Distributions are ``softmax(logits / temperature)``. LLaVA-MoD distils at temperature 1 with no rescaling;
``scale_by_temperature_squared=True`` multiplies the loss by ``temperature**2`` (Hinton et al.), which keeps
gradient magnitudes comparable across temperatures. The teacher is not detached: run it under
``torch.no_grad()``. Half-precision logits are upcast to float32 before the softmax.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfactory.data.chat import IGNORE_INDEX


def shift_for_next_token(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Align causal-LM logits with the tokens they predict.

    Logits at position ``t`` predict the label at ``t + 1``, so the last position and the first label are
    dropped. Shift the teacher's logits the same way (``teacher_logits[:, :-1]``).

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` token ids, ``ignore_index`` where no loss is taken (prompt, image, padding).

    Returns:
        ``(logits[:, :-1], mask)`` with shapes ``[B, T-1, V]`` and ``[B, T-1]`` (bool, True on response
        tokens).
    """
    return logits[:, :-1], labels[:, 1:] != ignore_index


def teacher_topk(teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Compress teacher logits ``[B, T, V]`` to the format :func:`forward_kl_topk` reads (e.g. on disk).

    Returns:
        ``(topk_logprobs, topk_indices)``, both ``[B, T, k]``: the ``k`` largest temperature-1 log-probs
        of the full-vocabulary softmax and their token ids.
    """
    return torch.topk(F.log_softmax(_upcast(teacher_logits), dim=-1), k, dim=-1)


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    subtract_teacher_entropy: bool = False,
    scale_by_temperature_squared: bool = False,
) -> Tensor:
    """LLaVA-MoD's mimic loss ``-(1/|M|) sum_{t in M} sum_v p_T(v|t) log p_S(v|t)``.

    This is the cross-entropy form: it differs from ``KL(p_T || p_S)`` by the teacher entropy, which has
    no gradient with respect to the student. ``subtract_teacher_entropy=True`` returns the true KL.

    Args:
        student_logits: ``[B, T, V]``.
        teacher_logits: ``[B, T, V]``, same vocabulary as the student.
        mask: ``[B, T]`` bool, True where the token is distilled.
    """
    log_p_s, log_p_t = _masked_log_probs(student_logits, teacher_logits, mask, temperature)
    p_t = log_p_t.exp()
    per_token = -_p_log_q(p_t, log_p_s).sum(-1)
    if subtract_teacher_entropy:
        per_token = per_token + _p_log_q(p_t, log_p_t).sum(-1)
    return _token_mean(per_token, temperature, scale_by_temperature_squared)


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = False,
) -> Tensor:
    """Mode-seeking ``(1/|M|) sum_{t in M} KL(p_S || p_T)``. Shapes as in :func:`forward_kl`."""
    log_p_s, log_p_t = _masked_log_probs(student_logits, teacher_logits, mask, temperature)
    per_token = _kl(log_p_s, log_p_t)
    return _token_mean(per_token, temperature, scale_by_temperature_squared)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = False,
) -> Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), averaged over masked tokens.

    ``JSD(beta) = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)``, ``m = beta * p_T + (1 - beta) * p_S``.
    As ``beta -> 0``, ``JSD(beta) / beta -> KL(p_T || p_S)`` (forward); as ``beta -> 1``,
    ``JSD(beta) / (1 - beta) -> KL(p_S || p_T)`` (reverse). Like TRL's ``generalized_jsd_loss``,
    ``beta=0`` and ``beta=1`` return those limits exactly (the forward and reverse KL), so the value is
    continuous in ``beta`` only up to that ``1/beta`` (``1/(1-beta)``) scale. Shapes as in :func:`forward_kl`.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd needs 0 <= beta <= 1, got {beta}")
    log_p_s, log_p_t = _masked_log_probs(student_logits, teacher_logits, mask, temperature)
    if beta == 0.0:
        per_token = _kl(log_p_t, log_p_s)
    elif beta == 1.0:
        per_token = _kl(log_p_s, log_p_t)
    else:
        log_m = torch.logsumexp(
            torch.stack([log_p_t + math.log(beta), log_p_s + math.log(1.0 - beta)]), dim=0
        )
        per_token = beta * _kl(log_p_t, log_m) + (1.0 - beta) * _kl(log_p_s, log_m)
    return _token_mean(per_token, temperature, scale_by_temperature_squared)


def forward_kl_topk(
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_indices: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    subtract_teacher_entropy: bool = False,
    scale_by_temperature_squared: bool = False,
) -> Tensor:
    """:func:`forward_kl` against a teacher stored as its top-k (precomputed teacher logits on disk).

    The teacher distribution is renormalised over its ``K`` stored tokens,
    ``q_T(k) = softmax_k(teacher_topk_logprobs / temperature)``, which equals the top-k restriction of the
    temperature-``T`` teacher softmax. The student keeps its full-vocabulary ``log p_S`` (not renormalised),
    so mass it puts outside the teacher's top-k is penalised. The loss is
    ``-(1/|M|) sum_t sum_k q_T(k) log p_S(idx_k)``; ``subtract_teacher_entropy`` subtracts the entropy of
    ``q_T``. With ``K = V`` it equals :func:`forward_kl`.

    Args:
        student_logits: ``[B, T, V]``.
        teacher_topk_logprobs: ``[B, T, K]`` teacher log-probs (any constant offset per token cancels).
        teacher_topk_indices: ``[B, T, K]`` int64 token ids in ``[0, V)``.
        mask: ``[B, T]`` bool.
    """
    if teacher_topk_logprobs.shape != teacher_topk_indices.shape:
        raise ValueError(
            f"teacher top-k log-probs {tuple(teacher_topk_logprobs.shape)} and indices "
            f"{tuple(teacher_topk_indices.shape)} must have the same shape [B, T, K]"
        )
    vocab = student_logits.shape[-1]
    if teacher_topk_indices.numel() and int(teacher_topk_indices.max()) >= vocab:
        raise ValueError(
            f"teacher top-k token id {int(teacher_topk_indices.max())} is outside the student vocabulary of "
            f"size {vocab}: teacher and student must share the vocabulary"
        )
    _check_mask(mask, student_logits)
    _check_mask(mask, teacher_topk_logprobs)
    _check_temperature(temperature)
    log_p_s = F.log_softmax(_upcast(student_logits[mask]) / temperature, dim=-1)  # [N, V]
    log_p_s_topk = log_p_s.gather(-1, teacher_topk_indices[mask])  # [N, K]
    log_q_t = F.log_softmax(_upcast(teacher_topk_logprobs[mask]) / temperature, dim=-1)  # [N, K]
    q_t = log_q_t.exp()
    per_token = -_p_log_q(q_t, log_p_s_topk).sum(-1)
    if subtract_teacher_entropy:
        per_token = per_token + _p_log_q(q_t, log_q_t).sum(-1)
    return _token_mean(per_token, temperature, scale_by_temperature_squared)


def _masked_log_probs(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Validate inputs and return student and teacher log-probs at masked positions, ``[N, V]`` each."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student vocabulary size {student_logits.shape[-1]} != teacher vocabulary size "
            f"{teacher_logits.shape[-1]}: distillation needs a shared vocabulary (same tokenizer)"
        )
    _check_mask(mask, student_logits)
    _check_mask(mask, teacher_logits)
    _check_temperature(temperature)
    # Indexing first keeps the softmax off prompt/padding positions, whose logits may be garbage.
    log_p_s = F.log_softmax(_upcast(student_logits[mask]) / temperature, dim=-1)
    log_p_t = F.log_softmax(_upcast(teacher_logits[mask]) / temperature, dim=-1)
    return log_p_s, log_p_t


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` per row of ``[N, V]`` log-probs -> ``[N]``."""
    p = log_p.exp()
    return (_p_log_q(p, log_p) - _p_log_q(p, log_q)).sum(-1)


def _p_log_q(p: Tensor, log_q: Tensor) -> Tensor:
    """``p * log q`` with ``0 * log 0 = 0`` (tokens a ``-inf`` logit rules out)."""
    return p * log_q.masked_fill(p == 0, 0.0)


def _token_mean(per_token: Tensor, temperature: float, scale_by_temperature_squared: bool) -> Tensor:
    """Mean of ``[N]`` per-token losses; 0 (with a zero gradient) when ``N == 0``."""
    loss = per_token.sum() / max(per_token.numel(), 1)
    return loss * temperature**2 if scale_by_temperature_squared else loss


def _check_mask(mask: Tensor, logits: Tensor) -> None:
    if mask.dtype != torch.bool or mask.shape != logits.shape[:-1]:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(logits.shape[:-1])} (logits without the last dim), "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _upcast(x: Tensor) -> Tensor:
    """float16/bfloat16 -> float32; float32/float64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
