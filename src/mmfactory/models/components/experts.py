"""SemVIE (MARS): visual experts in every decoder layer of a transformers causal LM, routed by token type.

:func:`add_visual_experts` replaces each token-wise module of every decoder layer (by default the norms,
the Q/K/V and output projections and the FFN: ``EXPERT_MODULES``) and the final norm with a
:class:`TokenTypeRouted` pair: the original module (frozen, it serves text tokens) and a trainable deep copy
(initialised from it, it serves image tokens). Attention itself, rotary embeddings and the KV cache stay
the LM's own code, so attention runs jointly over the mixed sequence, for any decoder whose layers name
these modules as Llama / Qwen2 / Mistral do.

Routing reads one boolean mask ``[B, T]`` (True = image token) set per forward on :class:`TokenRouting`;
the routed module gathers each type's tokens, applies its module to them in one call and scatters the
results back (no loop over tokens). Without image tokens the text module runs on the whole tensor as the
original LM would, so text-only outputs are bit-identical to the frozen LM's (tested with and without a
KV cache).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import Tensor, nn

EXPERT_MODULES = (
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp",
)


class TokenRouting:
    """The current forward's token types, shared by every routed module of one model."""

    def __init__(self):
        self.image_mask: Tensor | None = None  # [B, T] bool
        self._index: tuple[Tensor, Tensor] | None = None

    @contextmanager
    def tokens(self, image_mask: Tensor | None):
        """Route the forward run inside this block by ``image_mask`` ``[B, T]`` (None: all text)."""
        previous = self.image_mask, self._index
        self.image_mask = image_mask if image_mask is not None and bool(image_mask.any()) else None
        if self.image_mask is not None:
            flat = self.image_mask.flatten()
            self._index = (flat.logical_not().nonzero().squeeze(1), flat.nonzero().squeeze(1))
        try:
            yield
        finally:
            self.image_mask, self._index = previous

    def indices(self) -> tuple[Tensor, Tensor]:
        """(flat positions of text tokens, flat positions of image tokens) over ``B * T``."""
        assert self._index is not None
        return self._index


class TokenTypeRouted(nn.Module):
    """``text`` (the original, frozen) for text tokens, ``image`` (a trainable copy) for image tokens.

    Input ``[B, T, *]`` (token-wise modules only), output ``[B, T, *']``.
    """

    def __init__(self, text: nn.Module, routing: TokenRouting):
        super().__init__()
        self.text = text
        self.image = copy.deepcopy(text)
        self.image.requires_grad_(True)
        self.text.requires_grad_(False)
        self._routing = [routing]  # a list: not a submodule

    def forward(self, x: Tensor) -> Tensor:
        routing = self._routing[0]
        if routing.image_mask is None:
            return self.text(x)
        b, t = x.shape[:2]
        text_at, image_at = routing.indices()
        flat = x.reshape(b * t, *x.shape[2:])
        text_out = self.text(flat.index_select(0, text_at))
        image_out = self.image(flat.index_select(0, image_at))
        out = text_out.new_empty((b * t, *text_out.shape[1:]))
        out = out.index_copy(0, text_at, text_out).index_copy(0, image_at, image_out.to(text_out.dtype))
        return out.reshape(b, t, *out.shape[1:])


def _replace(root: nn.Module, dotted: str, routing: TokenRouting) -> None:
    *parents, leaf = dotted.split(".")
    owner = root
    for name in parents:
        owner = getattr(owner, name)
    module = getattr(owner, leaf)
    if isinstance(module, TokenTypeRouted):
        raise ValueError(f"{dotted} already has a visual expert")
    setattr(owner, leaf, TokenTypeRouted(module, routing))


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (``lm.model.layers``)."""
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(lm).__name__}: no decoder layers at .model.layers (a Llama-style LM is needed)"
        )
    return layers


def add_visual_experts(
    lm: nn.Module, modules: tuple[str, ...] | list[str] = EXPERT_MODULES, final_norm: bool = True
) -> TokenRouting:
    """Give every decoder layer of ``lm`` a visual expert for each of ``modules`` (and ``lm.model.norm``
    with ``final_norm``); returns the routing to set per forward. Every original weight is frozen."""
    routing = TokenRouting()
    lm.requires_grad_(False)
    for index, layer in enumerate(decoder_layers(lm)):
        for name in modules:
            try:
                _replace(layer, name, routing)
            except AttributeError as error:
                raise ValueError(
                    f"decoder layer {index} of {type(lm).__name__} has no module {name!r}"
                ) from error
    if final_norm:
        _replace(lm.model, "norm", routing)
    return routing


def _routed(lm: nn.Module) -> list[str]:
    """Qualified names of the routed modules of ``lm``."""
    return [name for name, module in lm.named_modules() if isinstance(module, TokenTypeRouted)]


def expert_state_dict(lm: nn.Module) -> dict[str, Tensor]:
    """The visual experts' weights (``<routed module>.image.*``), by the LM's parameter names."""
    experts = tuple(f"{name}.image." for name in _routed(lm))
    return {n: p.detach() for n, p in lm.named_parameters() if experts and n.startswith(experts)}


def text_state_dict(lm: nn.Module) -> dict[str, Tensor]:
    """The LM's own weights under their original names (each routed module's ``text`` half unwrapped, its
    expert left out)."""
    routed = _routed(lm)
    out = {}
    for name, tensor in lm.state_dict().items():
        owner = next((r for r in routed if name.startswith(f"{r}.")), None)
        if owner is None:
            out[name] = tensor
        elif name.startswith(f"{owner}.text."):
            out[f"{owner}.{name[len(owner) + len('.text.') :]}"] = tensor
    return out


@torch.no_grad()
def load_experts(lm: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy saved expert weights into ``lm`` (which already has experts); names must match exactly."""
    own = dict(expert_state_dict(lm))
    if set(own) != set(state):
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(f"visual experts do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
    params = dict(lm.named_parameters())
    for name, tensor in state.items():
        params[name].copy_(tensor)
