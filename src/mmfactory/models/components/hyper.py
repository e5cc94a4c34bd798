"""HyperLLaVA's HyperNetwork-aware adapter: per-sample bottleneck weights generated from a guidance vector.

For a sample with guidance ``g`` (a pooled feature, ``[G]``), a layer-specific encoder gives a small
embedding ``e = W_e g`` (``[E]``, default 64) and a 2-layer hypernetwork maps it to the weights of a
SwiGLU bottleneck adapter of rank ``r`` (default 16)::

    W_gate, W_value: [r, D_in]    W_up: [D_out, r]    (generated per sample, scaled by 1/sqrt(fan_in))
    E(x) = W_up (silu(W_gate x̂) * (W_value x̂)),   x̂ = x / rms(x)  (``input_norm: rms``, the default)

applied to every token of the sample with batched matmuls. The rows of the hypernetwork's output layer
that make ``W_up`` start at zero, so a fresh adapter outputs zeros (the static model is unchanged) while
its gradient is not zero (as LoRA's ``B = 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfactory.config import ConfigError


@dataclass
class HyperAdapterConfig:
    """Sizes of one HyperNetwork-aware adapter (METHODS.md section 5: embedding 64, bottleneck 16)."""

    embed_dim: int = 64  # E: the layer-specific encoding of the guidance
    hidden_dim: int = 64  # the hypernetwork's hidden width (the paper: 2 layers, width unstated)
    rank: int = 16  # r: the adapter's bottleneck
    # The paper does not say whether E(x) normalises x. A SwiGLU adapter is quadratic in its input's scale,
    # and the scale of a residual stream varies with depth and training (about 0.02 per element in a freshly
    # initialised LM, where an unnormalised expert hardly learns); "rms" divides x by its RMS first.
    input_norm: Literal["rms", "none"] = "rms"

    def validate(self) -> None:
        for name in ("embed_dim", "hidden_dim", "rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.input_norm not in ("rms", "none"):
            raise ConfigError(f"input_norm: expected 'rms' or 'none', got {self.input_norm!r}")


class HyperAdapter(nn.Module):
    """Guidance ``[B, G]`` -> a per-sample SwiGLU adapter on tokens ``[B, T, D_in]`` -> ``[B, T, D_out]``."""

    def __init__(self, guidance_dim: int, in_dim: int, out_dim: int, config: HyperAdapterConfig):
        super().__init__()
        self.in_dim, self.out_dim, self.rank = in_dim, out_dim, config.rank
        self.input_norm = config.input_norm
        self.encoder = nn.Linear(guidance_dim, config.embed_dim)
        self.hyper = nn.Sequential(
            nn.Linear(config.embed_dim, config.hidden_dim),
            nn.GELU(),
            nn.Linear(config.hidden_dim, 2 * config.rank * in_dim + out_dim * config.rank),
        )
        up = self.hyper[2]
        with torch.no_grad():
            up.weight[2 * config.rank * in_dim :].zero_()
            up.bias[2 * config.rank * in_dim :].zero_()

    def weights(self, guidance: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, G]`` -> ``W_gate [B, r, D_in]``, ``W_value [B, r, D_in]``, ``W_up [B, D_out, r]``."""
        flat = self.hyper(self.encoder(guidance))
        n = self.rank * self.in_dim
        gate, value, up = flat.split([n, n, self.out_dim * self.rank], dim=-1)
        down_scale, up_scale = 1 / math.sqrt(self.in_dim), 1 / math.sqrt(self.rank)
        shape = (-1, self.rank, self.in_dim)
        return (
            gate.view(shape) * down_scale,
            value.view(shape) * down_scale,
            up.view(-1, self.out_dim, self.rank) * up_scale,
        )

    def forward(self, x: Tensor, guidance: Tensor) -> Tensor:
        """``x [B, T, D_in]``, ``guidance [B, G]`` -> ``[B, T, D_out]``; sample ``b`` uses its own weights."""
        gate, value, up = (w.to(x.dtype) for w in self.weights(guidance))
        if self.input_norm == "rms":
            wide = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 inputs: the mean in float32
            x = (wide * torch.rsqrt(wide.square().mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        hidden = F.silu(torch.bmm(x, gate.transpose(1, 2))) * torch.bmm(x, value.transpose(1, 2))
        return torch.bmm(hidden, up.transpose(1, 2))


VisualExpertPlace = Literal["l1", "l2", "hidden"]


class VisualExpertProjector(nn.Module):
    """An ``mlp2x_gelu`` projector with HyperLLaVA's visual expert ``E_V``, guided by the mean patch feature.

    ``place`` selects the variant (``f``: tower features ``[N, P, Dv]``, ``L1``/``L2`` the linear layers):

    * ``l1`` (default; the paper's best, ``V = L2(L1(f) + E_V(f))``): ``L2(GELU(L1(f) + E_V(f)))``
    * ``l2``: ``L2(GELU(L1(f))) + E_V(f)``
    * ``hidden``: ``h = GELU(L1(f))``, ``L2(h + E_V(h))``

    ``base`` is the static projector (``nn.Sequential``: ``[0]`` = L1, ``[2]`` = L2), so a static projector's
    weights load into it and a fresh expert leaves its output unchanged.
    """

    def __init__(self, base: nn.Sequential, config: HyperAdapterConfig, place: VisualExpertPlace = "l1"):
        super().__init__()
        if len(base) != 3:
            raise ConfigError(
                f"the visual expert needs an mlp2x_gelu projector, got {len(base) // 2 + 1} linear layers"
            )
        vision_dim, text_dim = base[0].in_features, base[0].out_features
        self.base, self.place = base, place
        in_dim = text_dim if place == "hidden" else vision_dim
        self.expert = HyperAdapter(vision_dim, in_dim, text_dim, config)

    def forward(self, features: Tensor) -> Tensor:
        """``[N, P, Dv]`` -> ``[N, P, D]``."""
        l1, act, l2 = self.base
        guidance = features.mean(dim=1)
        if self.place == "l1":
            return l2(act(l1(features) + self.expert(features, guidance)))
        if self.place == "l2":
            return l2(act(l1(features))) + self.expert(features, guidance)
        hidden = act(l1(features))
        return l2(hidden + self.expert(hidden, guidance))
