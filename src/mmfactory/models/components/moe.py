"""Sparse mixture-of-experts FFN and sparse upcycling of Hugging Face decoders (the LLaVA-MoD student).

:class:`SparseMoeBlock` routes every token to ``top_k`` of ``E`` expert FFNs. The router is a bias-free
linear layer; its softmax over experts (in float32) picks the top-k experts, whose gates are renormalised to
sum to 1 when ``normalize_topk`` (Mixtral; Qwen2-MoE leaves them as they are). Dispatch is dropless by
default and needs no per-token Python: the ``N * k`` (token, expert) assignments are sorted by expert
once, each expert runs on its contiguous slice of the gathered tokens, and ``index_add`` sums the gated
outputs back.

Optional capacity (``capacity_factor``, as DeepSpeed's top-2 gating that the official LLaVA-MoD code uses):
each expert keeps at most ``max(ceil(capacity_factor * k * N / E), min_capacity)`` assignments, ``N`` the
number of real (non-padding) tokens. Priority is by position, not by gate value: all first choices come
before all second choices (and so on), each in flattened token order ``b * T + t``, so later tokens are
dropped first. A dropped assignment contributes nothing (the token keeps its residual); a token's surviving
gates are renormalised to sum to 1 (``capacity_renormalize``, as DeepSpeed's ``top2gating`` divides by
``gates1_s + gates2_s`` after the capacity masks, clamped at float eps). The count of dropped assignments
of the last forward is ``dropped_assignments``. Unlike DeepSpeed, which samples the second expert with
Gumbel noise in training, routing is plain top-k.

The router runs in float32 (``router_fp32``, as DeepSpeed's gate keeps its weight and input in fp32): under
bf16 autocast, or with the model cast to bf16, the routing decisions stay those of full precision.

:func:`upcycle` replaces the ``mlp`` of chosen decoder layers of any Hugging Face decoder with a block whose
experts are deep copies of that MLP, so (with ``normalize_topk``) the upcycled model computes what the dense
one did until the experts diverge in training. The settings go into ``model.config`` under ``moe_upcycling``;
:func:`load_upcycled` rebuilds the model from a ``save_pretrained`` folder.
"""

import copy
import functools
import math
from collections.abc import Sequence
from os import PathLike
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, PreTrainedModel

UPCYCLING_CONFIG_KEY = "moe_upcycling"
LayerSelection = Literal["sparse", "first_half", "second_half", "dense"] | Sequence[int]


class SparseMoeBlock(nn.Module):
    """Top-k routed mixture of expert FFNs, a drop-in replacement for a decoder layer's ``mlp``.

    Args:
        experts: ``E`` modules mapping ``[n, H] -> [n, H]`` (e.g. copies of a Hugging Face MLP).
        hidden_size: ``H``, the router's input width.
        top_k: experts per token, ``1 <= top_k <= E``.
        normalize_topk: renormalise the top-k gates to sum to 1 (Mixtral) instead of keeping their softmax
            probabilities (Qwen2-MoE).
        capacity_factor: ``None`` for dropless routing; otherwise the per-expert capacity factor (see the
            module docstring for which assignments are dropped).
        min_capacity: lower bound on the capacity (DeepSpeed's default is 4).
        router_jitter: in training, multiply the router's input (not the experts') by uniform noise in
            ``[1 - router_jitter, 1 + router_jitter]`` (Switch Transformer). 0 turns it off.
        capacity_renormalize: with a capacity, renormalise each token's surviving gates (DeepSpeed).
        router_fp32: keep the router's weight in float32 and compute its logits in float32, autocast off.

    After each forward the block holds, for the auxiliary losses (:mod:`mmfactory.losses.moe_aux`),
    ``router_logits`` ``[N, E]`` (with their graph) and ``padding_mask`` ``[N]`` (bool, or ``None``).
    Every expert is called on every forward, with zero rows if no token chose it, so all parameters take part
    in autograd: DDP needs no ``find_unused_parameters`` and FSDP / ZeRO-3 ranks gather the same experts.
    """

    def __init__(
        self,
        experts: Sequence[nn.Module],
        hidden_size: int,
        top_k: int = 2,
        *,
        normalize_topk: bool = True,
        capacity_factor: float | None = None,
        min_capacity: int = 4,
        router_jitter: float = 0.0,
        capacity_renormalize: bool = True,
        router_fp32: bool = True,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= len(experts):
            raise ValueError(f"top_k must be in [1, {len(experts)}] (the number of experts), got {top_k}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None (dropless), got {capacity_factor}")
        if not 0.0 <= router_jitter < 1.0:
            raise ValueError(f"router_jitter must be in [0, 1), got {router_jitter}")
        self.experts = nn.ModuleList(experts)
        self.router = nn.Linear(hidden_size, len(experts), bias=False)
        self.top_k = top_k
        self.normalize_topk = normalize_topk
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity
        self.router_jitter = router_jitter
        self.capacity_renormalize = capacity_renormalize
        self.router_fp32 = router_fp32
        self.router_logits: Tensor | None = None
        self.padding_mask: Tensor | None = None
        self.dropped_assignments = 0

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, hidden_states: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Route, run and combine the experts.

        Args:
            hidden_states: ``[..., H]``, e.g. ``[B, T, H]``.
            padding_mask: optional ``[...]`` matching the leading dims, true/1 on real tokens. Padding tokens
                are not routed (their output is 0), take no capacity and are left out of the aux losses.

        Returns:
            ``[..., H]``.
        """
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # [N, H]
        router_input = x
        if self.training and self.router_jitter > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
            router_input = x * noise
        if self.router_fp32:
            with torch.autocast(x.device.type, enabled=False):
                logits = F.linear(router_input.float(), self.router.weight.float())  # [N, E]
        else:
            logits = self.router(router_input)  # [N, E]
        gates, expert_ids = torch.softmax(logits.float(), dim=-1).topk(self.top_k, dim=-1)  # [N, k]
        if self.normalize_topk:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        mask = None
        if padding_mask is not None:
            if padding_mask.numel() != x.shape[0]:
                raise ValueError(
                    f"padding_mask has {padding_mask.numel()} entries for {x.shape[0]} tokens "
                    f"(hidden_states {tuple(hidden_states.shape)}, padding_mask {tuple(padding_mask.shape)})"
                )
            mask = padding_mask.reshape(-1).bool()
        self.router_logits, self.padding_mask = logits, mask

        token_index, slot_gates, counts = self._dispatch(expert_ids, gates, mask)  # [S], [S], E ints
        if self.capacity_factor is not None and self.capacity_renormalize:
            kept = slot_gates.new_zeros(x.shape[0]).index_add(0, token_index, slot_gates)  # [N]
            slot_gates = slot_gates / kept.clamp_min(torch.finfo(kept.dtype).eps).index_select(0, token_index)
        routed = x.index_select(0, token_index)  # [S, H], grouped by expert
        expert_out = torch.cat(
            [expert(part) for expert, part in zip(self.experts, routed.split(counts), strict=True)]
        )
        weighted = expert_out * slot_gates.to(expert_out.dtype).unsqueeze(-1)  # [S, H]
        combined = x.new_zeros(x.shape).index_add(0, token_index, weighted.to(x.dtype))  # [N, H]
        return combined.view(hidden_states.shape)

    def _dispatch(
        self, expert_ids: Tensor, gates: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, list[int]]:
        """Order the kept assignments by expert.

        Args:
            expert_ids, gates: ``[N, k]`` chosen experts and their gates.
            mask: ``[N]`` bool (true = real token) or ``None``.

        Returns:
            ``(token_index [S], gates [S], counts)``: for each of the ``S`` kept assignments, grouped by
            expert (``counts[e]`` rows for expert ``e``), the token it routes and its gate.
        """
        num_tokens, num_experts = expert_ids.shape[0], self.num_experts
        # Choice-major [k, N] layout: assignment a is token a % N's choice a // N, in capacity priority order.
        slot_experts = expert_ids.t().reshape(-1)  # [k * N]
        if mask is not None:  # padding goes to a sentinel expert E, sorted after every real one
            slot_experts = slot_experts.masked_fill(~mask.repeat(self.top_k), num_experts)
        order = torch.argsort(slot_experts, stable=True)  # by expert, then by priority
        counts = torch.bincount(slot_experts, minlength=num_experts + 1)[:num_experts]  # [E]
        count_list = counts.tolist()
        num_routed = sum(count_list)
        order = order[:num_routed]
        self.dropped_assignments = 0
        if self.capacity_factor is not None:
            capacity = max(math.ceil(self.capacity_factor * num_routed / num_experts), self.min_capacity)
            group_start = torch.cumsum(counts, dim=0) - counts
            rank_in_expert = torch.arange(num_routed, device=order.device) - group_start.repeat_interleave(
                counts, output_size=num_routed
            )
            order = order[rank_in_expert < capacity]
            count_list = [min(count, capacity) for count in count_list]
            self.dropped_assignments = num_routed - order.numel()
        return order % num_tokens, gates.t().reshape(-1).index_select(0, order), count_list


def moe_blocks(model: nn.Module) -> list[SparseMoeBlock]:
    """All :class:`SparseMoeBlock` modules of ``model``, in module order."""
    return [module for module in model.modules() if isinstance(module, SparseMoeBlock)]


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder layer list of a Hugging Face causal LM or a composite (``model.get_decoder().layers``)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(
        isinstance(getattr(l, "mlp", None), nn.Module) for l in layers
    ):
        raise ValueError(
            f"{type(model).__name__}.get_decoder() has no `layers` ModuleList whose layers all have an `mlp` "
            "module; pass the language model itself"
        )
    return layers


def select_moe_layers(layers: LayerSelection, num_layers: int) -> list[int]:
    """Indices of the layers that get MoE blocks.

    ``sparse``: every other layer from 0 (LLaVA-MoD's default); ``first_half`` / ``second_half``: layers
    ``[0, L//2)`` / ``[L//2, L)``; ``dense``: every layer (MoE-LLaVA's name); or explicit indices.
    """
    named = {
        "sparse": range(0, num_layers, 2),
        "first_half": range(num_layers // 2),
        "second_half": range(num_layers // 2, num_layers),
        "dense": range(num_layers),
    }
    if isinstance(layers, str):
        if layers not in named:
            raise ValueError(
                f"unknown layer selection {layers!r}; expected one of {sorted(named)} or indices"
            )
        return list(named[layers])
    indices = sorted(int(i) for i in layers)
    if not indices or len(set(indices)) != len(indices) or indices[0] < 0 or indices[-1] >= num_layers:
        raise ValueError(f"layer indices must be distinct and in [0, {num_layers}), got {list(layers)}")
    return indices


def upcycle(
    model: PreTrainedModel,
    num_experts: int = 4,
    top_k: int = 2,
    layers: LayerSelection = "sparse",
    *,
    normalize_topk: bool = True,
    capacity_factor: float | None = None,
    min_capacity: int = 4,
    router_jitter: float = 0.0,
    capacity_renormalize: bool = True,
    router_fp32: bool = True,
) -> list[int]:
    """Sparse upcycling, in place: the ``mlp`` of each chosen decoder layer becomes a :class:`SparseMoeBlock`.

    Every expert is a deep copy of the dense MLP and the router a new bias-free ``nn.Linear`` (PyTorch's
    default init, as DeepSpeed's gate) on the MLP's device, in float32 with ``router_fp32`` (else the MLP's
    dtype). With ``normalize_topk`` the upcycled
    model's outputs equal the dense model's. The settings (with the resolved layer indices) are recorded in
    ``model.config.moe_upcycling`` so that :func:`load_upcycled` can rebuild the model; the other arguments
    are those of :class:`SparseMoeBlock`. A model is upcycled once.

    Returns:
        The indices of the upcycled layers.
    """
    all_layers = decoder_layers(model)
    sparse_layers = [i for i, layer in enumerate(all_layers) if isinstance(layer.mlp, SparseMoeBlock)]
    if sparse_layers:
        raise ValueError(f"the model is already upcycled (MoE layers {sparse_layers})")
    indices = select_moe_layers(layers, len(all_layers))
    hooked = [i for i in indices if all_layers[i].mlp._forward_hooks or all_layers[i].mlp._forward_pre_hooks]
    if hooked:  # the experts' deep copies would carry the hooks, bound to copies of their owner
        raise ValueError(
            f"decoder layers {hooked} have hooks on their mlp (e.g. HyperLLaVA's language experts); "
            "upcycle the LM before attaching them"
        )
    hidden_size = model.config.get_text_config().hidden_size
    for index in indices:
        dense_mlp = all_layers[index].mlp
        block = SparseMoeBlock(
            [copy.deepcopy(dense_mlp) for _ in range(num_experts)],
            hidden_size,
            top_k,
            normalize_topk=normalize_topk,
            capacity_factor=capacity_factor,
            min_capacity=min_capacity,
            router_jitter=router_jitter,
            capacity_renormalize=capacity_renormalize,
            router_fp32=router_fp32,
        )
        reference = next(dense_mlp.parameters())
        block.router.to(device=reference.device, dtype=torch.float32 if router_fp32 else reference.dtype)
        all_layers[index].mlp = block
    setattr(
        model.config,
        UPCYCLING_CONFIG_KEY,
        {
            "num_experts": num_experts,
            "top_k": top_k,
            "layers": indices,
            "normalize_topk": normalize_topk,
            "capacity_factor": capacity_factor,
            "min_capacity": min_capacity,
            "router_jitter": router_jitter,
            "capacity_renormalize": capacity_renormalize,
            "router_fp32": router_fp32,
        },
    )
    return indices


@functools.cache
def _upcycled_class(base: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """``base`` whose constructor upcycles as its config says, so ``from_pretrained`` loads the MoE weights
    with all of its machinery (shards, dtype, device map, tied weights). Name and module stay ``base``'s, so
    ``save_pretrained`` records the same architecture."""

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        upcycle(self, **getattr(config, UPCYCLING_CONFIG_KEY))

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})


def load_upcycled(
    path: str | PathLike, model_class: type[PreTrainedModel] | None = None, **from_pretrained_kwargs
) -> PreTrainedModel:
    """Load a model saved with ``save_pretrained`` after :func:`upcycle`.

    Args:
        path: local checkpoint folder.
        model_class: the Hugging Face class that was upcycled; by default the ``AutoModelForCausalLM`` class
            of the saved config.
        from_pretrained_kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    config = AutoConfig.from_pretrained(path)
    if getattr(config, UPCYCLING_CONFIG_KEY, None) is None:
        raise ValueError(
            f"{path}/config.json has no {UPCYCLING_CONFIG_KEY!r}: it was not saved from upcycle()"
        )
    base = model_class or MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return _upcycled_class(base).from_pretrained(path, config=config, **from_pretrained_kwargs)


def moe_param_counts(model: nn.Module) -> dict[str, int]:
    """Total and per-token activated parameter counts (shared parameters counted once).

    Activated = total minus, in each block, the experts a token does not use. With experts of unequal size
    the ``top_k`` largest are counted as used (an upper bound); upcycled experts are all the same size.
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for block in moe_blocks(model):
        sizes = sorted(
            (sum(p.numel() for p in expert.parameters()) for expert in block.experts), reverse=True
        )
        inactive += sum(sizes[block.top_k :])
    return {"total": total, "activated": total - inactive}
