"""Pairwise reward-model loss (Filter & Align: a human-preference image-text scorer)."""

import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | float = 0.0,
    target: Tensor | None = None,
) -> Tensor:
    """Bradley-Terry pairwise loss ``mean(-log sigmoid(r_chosen - r_rejected - margin))``.

    ``margin`` (a float, or ``[P]`` per pair as in Llama 2's reward model, e.g. larger for clearer
    preferences) asks the chosen reward to win by at least that much; 0 is plain Bradley-Terry.
    ``target`` (``[P]`` in [0, 1], default all 1) is the probability that "chosen" wins: a tie kept as a
    pair has 0.5, and the loss is then the binary cross-entropy
    ``-(t log sigmoid(d) + (1 - t) log sigmoid(-d))`` with ``d = r_chosen - r_rejected - margin``,
    smallest at equal rewards.

    Args:
        chosen_rewards: ``[P]`` scalar rewards of the preferred items.
        rejected_rewards: ``[P]`` rewards of the items they were preferred to.

    Returns:
        Scalar loss.
    """
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise ValueError(
            f"chosen and rejected rewards must both be [P], got {tuple(chosen_rewards.shape)} and "
            f"{tuple(rejected_rewards.shape)}"
        )
    difference = chosen_rewards - rejected_rewards - margin
    if target is None:
        return -F.logsigmoid(difference).mean()
    return -(target * F.logsigmoid(difference) + (1 - target) * F.logsigmoid(-difference)).mean()
