"""Symmetric InfoNCE between video and text embeddings, gathered across processes (MAC, CLIP-style).

Every process computes the same loss on the global batch (open_clip's ``local_loss=False``). Features are
gathered *with* gradients (open_clip's ``gather_with_grad=True``): each rank's loss then backpropagates
into every rank's features, and DDP's gradient averaging reproduces the one-process gradient on the global
batch exactly, for the encoders and the logit scale alike. (Gathering without gradients and putting the
local tensor back in its slot would scale encoder gradients by ``1 / world_size`` but not the logit
scale's.) The price is one all-to-all of the ``[N, D]`` feature gradients in backward.
"""

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor


def gather_world_size() -> int:
    """How many processes :func:`gather_with_grad` gathers from (1 without a process group): a task sizes
    its evaluation batches by it, since every rank must pass the same ``B``."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate every rank's ``[B, ...]`` tensor in rank order -> ``[world_size * B, ...]``.

    Differentiable: the backward pass sums, into each rank's local slice, the gradients that every rank's
    loss sends to it. All ranks must pass the same ``B`` (use ``drop_last``). Identity when no process
    group is initialised or the world has one process.
    """
    if gather_world_size() == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


def clamp_logit_scale(log_logit_scale: Tensor, max_logit_scale: float = 100.0) -> Tensor:
    """Clamp a learnable log logit scale to ``[0, log(max_logit_scale)]`` (CLIP caps the scale at 100).

    ``torch.clamp`` passes no gradient once the bound is reached, so the parameter stops growing there.
    """
    return log_logit_scale.clamp(0.0, math.log(max_logit_scale))


def clip_loss(
    video_feats: Tensor, text_feats: Tensor, log_logit_scale: Tensor, max_logit_scale: float = 100.0
) -> Tensor:
    """Symmetric InfoNCE over the global batch; pair ``i`` (video ``i``, text ``i``) is the positive.

    Features are L2-normalised here. With ``s = exp(clamp_logit_scale(log_logit_scale))`` and gathered
    ``v, w`` ``[N, D]``: ``logits = s * v @ w.T`` ``[N, N]``, and the loss is the mean of the video->text
    and text->video cross-entropies against the diagonal. MAC uses temperature ~0.05, i.e. initialise the
    parameter to ``log(1 / 0.05) = log(20)``.

    Args:
        video_feats: ``[B, D]`` this rank's video embeddings (e.g. CLS after projection).
        text_feats: ``[B, D]`` this rank's text embeddings.
        log_logit_scale: ``[]`` learnable log of the inverse temperature.
        max_logit_scale: upper bound of ``s``.

    Returns:
        Scalar loss, identical on every rank.
    """
    if video_feats.shape != text_feats.shape or video_feats.dim() != 2:
        raise ValueError(
            f"video and text features must both be [B, D], got {tuple(video_feats.shape)} and "
            f"{tuple(text_feats.shape)}"
        )
    video = gather_with_grad(F.normalize(video_feats, dim=-1))  # [N, D]
    text = gather_with_grad(F.normalize(text_feats, dim=-1))  # [N, D]
    logits = clamp_logit_scale(log_logit_scale, max_logit_scale).exp() * video @ text.T  # [N, N]
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
