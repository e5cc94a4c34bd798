"""Preference losses on sequence log-probs: sigmoid DPO and paired KTO (LLaVA-MoD preference distillation).

In LLaVA-MoD the frozen teacher is the reference model. Rewards are ``beta * (log pi(y) - log pi_ref(y))``
with sequence log-probs from :func:`sequence_logprobs`.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfactory.data.chat import IGNORE_INDEX


def sequence_logprobs(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Sum of next-token log-probs over response tokens.

    Logits at position ``t`` score the label at ``t + 1`` (the shift happens here). Computed in float32
    (float64 stays float64).

    Args:
        logits: ``[B, T, V]`` causal-LM logits.
        labels: ``[B, T]`` token ids, ``ignore_index`` on prompt, image and padding positions.

    Returns:
        ``(logps, num_tokens)``: ``[B]`` summed log-probs (0 for a sequence with no response token) and
        ``[B]`` int64 counts of the tokens summed (divide for the length-averaged variant).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    token_logps = -F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=ignore_index, reduction="none"
    ).view_as(labels)  # [B, T-1], 0 where ignored
    return token_logps.sum(-1), mask.sum(-1)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid DPO (Rafailov et al. 2023), with the conservative-DPO label smoothing of TRL's ``sigmoid``.

    With ``h = (lp_pi(yw) - lp_ref(yw)) - (lp_pi(yl) - lp_ref(yl))`` and ``eps = label_smoothing``:
    ``loss = mean(-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h))``.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``
            sequence log-probs.
        beta: inverse strength of the implicit KL constraint (LLaVA-MoD: 0.1).
        label_smoothing: probability that a preference label is flipped, in ``[0, 0.5]``.

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``: scalar loss and detached ``[B]`` implicit rewards
        ``beta * (lp_pi - lp_ref)``.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    chosen_logratios, rejected_logratios = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses.mean(), beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def kto_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    detach_reference_point: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Paired KTO, the ``kto_pair`` loss of TRL's ``DPOTrainer`` that LLaVA-MoD's scripts default to.

    With log-ratios ``r = lp_pi - lp_ref`` and batch reference points ``z_w = max(0, mean(r_w))``,
    ``z_l = max(0, mean(r_l))`` (each half's KL estimate is the other half's reference point, as in the
    KTO report): ``loss = mean(concat(1 - sigmoid(beta (r_w - z_l)), 1 - sigmoid(beta (z_w - r_l))))``
    over the ``2B`` terms.

    ``detach_reference_point=True`` stops gradients through ``z_w`` and ``z_l``, as the KTO paper
    (Ethayarajh et al. 2024) and TRL's ``KTOTrainer`` treat the reference point. TRL's ``DPOTrainer``
    ``loss_type="kto_pair"`` (since removed from TRL) and LLaVA-MoD's copy of it
    (``llavamod/train/dpo_trainer.py``) leave them attached: pass ``False`` to reproduce those exactly.
    The forward value is the same either way.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``.

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)`` as in :func:`dpo_loss`.
    """
    chosen_logratios, rejected_logratios = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    chosen_ref_point = chosen_logratios.mean().clamp(min=0)
    rejected_ref_point = rejected_logratios.mean().clamp(min=0)
    if detach_reference_point:
        chosen_ref_point, rejected_ref_point = chosen_ref_point.detach(), rejected_ref_point.detach()
    losses = torch.cat(
        [
            1.0 - torch.sigmoid(beta * (chosen_logratios - rejected_ref_point)),
            1.0 - torch.sigmoid(beta * (chosen_ref_point - rejected_logratios)),
        ]
    )
    return losses.mean(), beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def _logratios(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> tuple[Tensor, Tensor]:
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    shapes = {tuple(t.shape) for t in logps}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"policy and reference log-probs must all be [B] tensors of one shape, got {shapes}")
    return policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
