"""LLaVA-MoD's option groups and preference data: sparse upcycling, router-loss weights, image preference
pairs (given, or sampled on-policy by the preference stage's prepare step)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmfactory.config import ConfigError
from mmfactory.data.chat import TemplateName
from mmfactory.data.source_config import SourceConfig, check_fraction
from mmfactory.llava_mod.on_policy import OnPolicySampling

LAYER_SELECTIONS = ("sparse", "first_half", "second_half", "dense")


@dataclass
class UpcycleOptions:
    """Sparse upcycling of the student's LM (:func:`~mmfactory.models.components.moe.upcycle`); LLaVA-MoD's
    defaults: 4 experts, top-2, MoE in every other layer from 0, dropless (``capacity_factor: null``)."""

    num_experts: int = 4
    top_k: int = 2
    layers: str | list[int] = "sparse"  # sparse | first_half | second_half | dense | explicit indices
    normalize_topk: bool = True
    capacity_factor: float | None = None
    min_capacity: int = 4
    router_jitter: float = 0.0
    capacity_renormalize: bool = True  # DeepSpeed renormalises a token's surviving gates after drops
    router_fp32: bool = True  # DeepSpeed keeps the gate in float32

    def validate(self) -> None:
        if isinstance(self.layers, str) and self.layers not in LAYER_SELECTIONS:
            raise ConfigError(f"layers: expected one of {list(LAYER_SELECTIONS)} or layer indices")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"top_k: must be in [1, num_experts={self.num_experts}], got {self.top_k}")


@dataclass
class MoELossOptions:
    """The ``moe:`` group: weights of the router losses (summed over MoE layers); LLaVA-MoD uses 0.01 load
    balancing."""

    aux_weight: float = 0.01
    router_z_weight: float = 0.0

    def validate(self) -> None:
        if self.aux_weight < 0 or self.router_z_weight < 0:
            raise ConfigError("aux_weight, router_z_weight: weights must be >= 0")

    def loss(self, aux: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of :func:`~mmfactory.losses.moe_aux.moe_aux_losses`' ``aux``."""
        return self.aux_weight * aux["load_balancing"] + self.router_z_weight * aux["router_z"]


@dataclass
class MultimodalPreferenceDataConfig:
    """Image preference pairs from any ``preference`` sources (:mod:`mmfactory.data.sources`): the world
    (``kind: preference``: faithful vs hallucinated detailed descriptions — a wrong attribute or an extra
    object — and correct vs wrong short answers) or preference JSONL with images (the prompt holding
    ``<image>``). With ``on_policy`` set the training pairs are sampled instead (:class:`OnPolicySampling`)
    from the ``prompts`` sources; evaluation still reads the ``eval`` pairs."""

    train: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig("world", kind="preference", size=2000)]
    )
    eval: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig("world", kind="preference", split="val", size=100)]
    )
    on_policy: OnPolicySampling | None = None
    prompts: list[SourceConfig] = field(default_factory=list)  # image-chat prompts for on_policy
    max_bad_fraction: float | None = None
    max_length: int = 192
    template: TemplateName = "chatml"
    pad_square: bool = True
    pad_to_multiple_of: int | None = None

    def validate(self) -> None:
        check_fraction(self.max_bad_fraction)
        if self.on_policy is not None and not self.prompts:
            raise ConfigError("prompts: on_policy sampling needs image-chat prompt sources")
        if self.on_policy is None and self.prompts:
            raise ConfigError("prompts: only read with on_policy sampling; set on_policy or drop prompts")
        if self.on_policy is None and not self.train:
            raise ConfigError("train: at least one source is required")
