"""Router auxiliary losses of sparse MoE layers: load balancing (Switch / Mixtral) and router z-loss (ST-MoE).

Per layer, with router logits ``[N, E]``, ``p = softmax(logits)`` and real (non-padding) tokens ``M``:

- load balancing: ``E * sum_e f_e * P_e`` with ``f_e = (1/|M|) #{n in M : e in topk(p_n)}`` and
  ``P_e = (1/|M|) sum_{n in M} p_{n,e}``. As in transformers' ``load_balancing_loss_func``, ``f_e`` is *not*
  divided by ``k``: it sums to ``k`` over experts, so perfectly balanced routing scores ``k`` (1 for top-1).
  (DeepSpeed's top-2 gate, which the official LLaVA-MoD code uses, counts only first choices in ``f_e``.)
  Only ``P_e`` carries gradient.
- router z-loss: ``(1/|M|) sum_{n in M} logsumexp(logits_n)^2``.

Both are float32 scalars (float64 for float64 logits), and 0 (with zero gradient, never NaN) when every
token is padding.

Across layers, :func:`moe_aux_losses` *sums* the per-layer losses, as MoE-LLaVA / LLaVA-MoD (DeepSpeed) do.
transformers instead pools all layers' logits into one ``f`` and one ``P`` (equivalent to concatenating
them) before the product; the two agree for a single MoE layer. LLaVA-MoD weights the load-balancing sum by
0.01; that coefficient belongs to the task.
"""

import torch
from torch import Tensor, nn

from mmfactory.models.components.moe import moe_blocks


def load_balancing_loss(router_logits: Tensor, top_k: int, padding_mask: Tensor | None = None) -> Tensor:
    """Switch / Mixtral load-balancing loss of one MoE layer (module docstring).

    Args:
        router_logits: ``[N, E]``.
        top_k: experts per token used by the layer.
        padding_mask: optional, ``N`` entries in any shape (e.g. ``[B, T]``), true/1 on real tokens.

    Returns:
        Scalar.
    """
    num_experts = router_logits.shape[-1]
    probs = torch.softmax(_upcast(router_logits), dim=-1)  # [N, E]
    chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)  # [N, E]
    weights = _token_weights(padding_mask, probs)
    fraction_routed = _masked_mean(chosen, weights)  # f: [E], sums to top_k
    mean_prob = _masked_mean(probs, weights)  # P: [E]
    return num_experts * (fraction_routed * mean_prob).sum()


def router_z_loss(router_logits: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss ``mean over real tokens of logsumexp(logits)^2``; shapes as
    :func:`load_balancing_loss`."""
    log_partition = torch.logsumexp(_upcast(router_logits), dim=-1)  # [N]
    return _masked_mean(log_partition.square(), _token_weights(padding_mask, router_logits))


def moe_aux_losses(
    model: nn.Module, attention_mask: Tensor | None = None, groups: int = 1
) -> dict[str, Tensor]:
    """Sum over the model's MoE blocks of both losses, from the router logits of its most recent forward.

    Call it after each forward whose aux loss you want. ``groups`` splits the forward's batch into that many
    equal parts of consecutive rows and adds their losses, as if each had had its own forward: a DPO batch of
    ``B`` chosen then ``B`` rejected rows with ``groups=2`` gives aux(chosen) + aux(rejected).

    Args:
        model: any module containing :class:`~mmfactory.models.components.moe.SparseMoeBlock` s.
        attention_mask: ``[B, T]`` of the forward's input (true/1 on real tokens); when ``None`` each block
            uses the ``padding_mask`` it was called with, if any.
        groups: a divisor of ``B``.

    Returns:
        ``{"load_balancing": scalar, "router_z": scalar}``; zeros for a model with no MoE block.
    """
    blocks = moe_blocks(model)
    if not blocks:
        zero = torch.zeros((), device=next(model.parameters()).device)
        return {"load_balancing": zero, "router_z": zero}
    if any(block.router_logits is None for block in blocks):
        raise RuntimeError("moe_aux_losses needs a forward pass first: some MoE blocks have no router logits")
    load_balancing = router_z = 0
    for block in blocks:
        mask = attention_mask if attention_mask is not None else block.padding_mask
        logits = block.router_logits
        if logits.shape[0] % groups:
            raise ValueError(f"{logits.shape[0]} router rows do not split into {groups} equal groups")
        masks = [None] * groups if mask is None else mask.reshape(groups, -1).unbind(0)
        for group_logits, group_mask in zip(logits.chunk(groups), masks, strict=True):
            load_balancing = load_balancing + load_balancing_loss(group_logits, block.top_k, group_mask)
            router_z = router_z + router_z_loss(group_logits, group_mask)
    return {"load_balancing": load_balancing, "router_z": router_z}


def _upcast(logits: Tensor) -> Tensor:
    """Half-precision logits to float32; float32 / float64 unchanged."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _token_weights(padding_mask: Tensor | None, rows: Tensor) -> Tensor:
    """``padding_mask`` (ones when ``None``) as ``[N]`` in ``rows``' float dtype; ``rows``: ``[N, ...]``."""
    dtype = torch.promote_types(rows.dtype, torch.float32)
    if padding_mask is None:
        return rows.new_ones(rows.shape[0], dtype=dtype)
    if padding_mask.numel() != rows.shape[0]:
        raise ValueError(
            f"padding mask has {padding_mask.numel()} entries ({tuple(padding_mask.shape)}) for "
            f"{rows.shape[0]} router rows; pass the attention mask of the same forward"
        )
    return padding_mask.reshape(-1).to(device=rows.device, dtype=dtype)


def _masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    """Mean of ``values`` ``[N, ...]`` over the rows weighted 1 (0 when there are none)."""
    weights = weights.view(-1, *([1] * (values.dim() - 1)))
    return (values * weights).sum(dim=0) / weights.sum().clamp(min=1.0)
