"""HyperLLaVA's experts on a :class:`~mmfactory.models.mllm.MultimodalLM` (METHODS.md section 5).

* **Visual expert**: the projector becomes a
  :class:`~mmfactory.models.components.hyper.VisualExpertProjector` (guided by the image's mean feature).
* **Language expert** in the chosen decoder layers (default: the posterior half), parallel to the FFN::

      x = x_attn + FFN(norm(x_attn)) + E_L(x_attn)

  guided by the hidden state after an intermediate layer (default: the last layer of the first half),
  mean-pooled per sample over the **prompt** (tokens before the first response token; the task passes that
  mask), so no response token leaks into the guidance that earlier tokens' experts see. The guidance is
  computed once per forward, inside the same LM pass (a hook on the guidance layer), never by a second
  pass. In generation it is computed at the prefill over the prompt and held for every new token, so
  generation with a KV cache equals generation without one.

The experts attach to transformers' decoder layers by hooks (``post_attention_layernorm``'s input is
``x_attn``; the expert's output is added to ``mlp``'s), so the LM's own parameter names are unchanged; the
experts' parameters live in ``MultimodalLM.language_expert`` and save and load with the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from mmfactory.config import ConfigError
from mmfactory.data.chat import IGNORE_INDEX
from mmfactory.models.components.hyper import HyperAdapter, HyperAdapterConfig, VisualExpertPlace


@dataclass
class VisualExpertConfig(HyperAdapterConfig):
    place: VisualExpertPlace = "l1"


@dataclass
class LanguageExpertConfig(HyperAdapterConfig):
    layers: list[int] | None = None  # decoder layers with an expert; None: the posterior half
    guidance_layer: int | None = None  # its output guides them; None: the layer before the first expert

    def resolve(self, num_layers: int) -> tuple[list[int], int]:
        """``(expert layers, guidance layer)`` for an LM of ``num_layers``, checked."""
        layers = sorted(self.layers) if self.layers is not None else list(range(num_layers // 2, num_layers))
        if not layers or layers[0] < 0 or layers[-1] >= num_layers or len(set(layers)) != len(layers):
            raise ConfigError(
                f"language_expert.layers: {self.layers} is not a set of layers 0..{num_layers - 1}"
            )
        guide = self.guidance_layer if self.guidance_layer is not None else layers[0] - 1
        if not 0 <= guide < layers[0]:
            raise ConfigError(
                f"language_expert.guidance_layer: {guide} must come before the first expert layer "
                f"({layers[0]}): the guidance is computed in the same pass"
            )
        return layers, guide


@dataclass
class HyperExpertsConfig:
    """Which experts a HyperLLaVA model has (either may be null: the ablations of its results table)."""

    visual: VisualExpertConfig | None = field(default_factory=VisualExpertConfig)
    language: LanguageExpertConfig | None = field(default_factory=LanguageExpertConfig)

    def validate(self) -> None:
        if self.visual is None and self.language is None:
            raise ConfigError("hyper: name a visual expert, a language expert or both")
        for part in (self.visual, self.language):
            if part is not None:
                part.validate()


def masked_mean(hidden: Tensor, mask: Tensor | None) -> Tensor:
    """``[B, T, D]`` averaged over the positions where ``mask [B, T]`` is true (all if None) -> ``[B, D]``."""
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class LanguageExperts(nn.Module):
    """The language experts of one LM and the hooks that run them (see the module docstring)."""

    def __init__(self, decoder_layers: nn.ModuleList, hidden_size: int, config: LanguageExpertConfig):
        super().__init__()
        self.layer_ids, self.guidance_layer = config.resolve(len(decoder_layers))
        self.experts = nn.ModuleDict(
            {str(i): HyperAdapter(hidden_size, hidden_size, hidden_size, config) for i in self.layer_ids}
        )
        self._mask: Tensor | None = None
        self._guidance: Tensor | None = None
        self._hold = False
        self._x_attn: dict[int, Tensor] = {}
        decoder_layers[self.guidance_layer].register_forward_hook(self._take_guidance)
        for i in self.layer_ids:
            layer = decoder_layers[i]
            # partials of bound methods, not closures: a deep copy of the model rebinds them to its copy
            layer.post_attention_layernorm.register_forward_pre_hook(partial(self._stash, i))
            layer.mlp.register_forward_hook(partial(self._add_expert, i))

    def pool(self, hidden: Tensor) -> Tensor:
        """The guidance ``[B, D]`` from the guidance layer's output ``[B, T, D]``. A mask of ``B / k`` rows
        (``generate`` with ``num_beams`` or ``num_return_sequences`` = k repeats each prompt k times) is
        repeated to match."""
        mask = self._mask
        if mask is not None and mask.shape != hidden.shape[:2]:
            rows, length = hidden.shape[:2]
            if mask.shape[1] != length or rows % mask.shape[0]:
                raise ValueError(
                    f"the guidance mask {tuple(mask.shape)} does not fit hidden states {tuple(hidden.shape)}"
                )
            mask = mask.repeat_interleave(rows // mask.shape[0], dim=0)
        return masked_mean(hidden, mask)

    def _take_guidance(self, module, args, output):
        if not (self._hold and self._guidance is not None):
            self._guidance = self.pool(output[0] if isinstance(output, tuple) else output)

    def _stash(self, i: int, module, args) -> None:
        self._x_attn[i] = args[0]

    def _add_expert(self, i: int, module, args, output: Tensor) -> Tensor:
        if self._guidance is None:
            raise RuntimeError("the language expert ran before its guidance layer")
        return output + self.experts[str(i)](self._x_attn.pop(i), self._guidance.to(output.dtype))

    @contextmanager
    def guided(self, mask: Tensor | None, hold: bool = False) -> Iterator[None]:
        """Run the LM with guidance pooled over ``mask [B, T]``; with ``hold`` the first forward's guidance
        serves every later forward inside the block (generation: the prefill's)."""
        self._mask, self._guidance, self._hold = mask, None, hold
        try:
            yield
        finally:
            self._mask, self._guidance, self._hold = None, None, False
            self._x_attn.clear()


def prompt_mask(labels: Tensor, attention_mask: Tensor | None, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``[B, T]``: the tokens before each sample's first labelled one (all valid tokens if it has none)."""
    labelled = labels != ignore_index
    first = torch.where(labelled.any(dim=1), labelled.float().argmax(dim=1), labels.shape[1])
    mask = torch.arange(labels.shape[1], device=labels.device) < first.unsqueeze(1)
    return mask if attention_mask is None else mask & attention_mask.bool()
