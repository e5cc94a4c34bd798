"""Next-token cross-entropy over labelled positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfactory.data.chat import IGNORE_INDEX


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy: position ``t`` predicts ``labels[t + 1]``.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` token ids, ``IGNORE_INDEX`` where no loss is taken (prompt, padding).
    Returns:
        ``(loss, count)``: the mean over the ``count`` labelled target tokens (0 with a zero gradient
        when there are none, never NaN), and ``count`` as a long scalar.
    """
    targets = labels[:, 1:]
    count = (targets != IGNORE_INDEX).sum()
    total = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / count.clamp(min=1), count


def sample_mean_loss(token_losses: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Mean over samples of each sample's mean token loss (every labelled sample weighs the same).

    Args:
        token_losses: ``[N]`` per-token losses of the labelled targets.
        rows: ``[N]`` long, the sample (batch row) each target belongs to.
        num_rows: ``B``, the batch size.
    Returns:
        The mean over the samples with at least one target (0 with a zero gradient when there are none).
    """
    sums = token_losses.new_zeros(num_rows).index_add(0, rows, token_losses)
    counts = torch.bincount(rows, minlength=num_rows)
    present = counts > 0
    per_sample = sums[present] / counts[present]
    return per_sample.sum() / present.sum().clamp(min=1)
