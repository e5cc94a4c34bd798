"""A maskable space-time ViT (MAC's video encoder): only the visible patches enter the transformer.

Layout, after Frozen-in-Time: every frame is cut into ``S = (image_size / patch_size)^2`` patches that a
shared linear map embeds (a linear patchify, equal to a stride-``patch_size`` Conv2d); each patch token adds
a learned *spatial* position embedding (its place in the frame) and a learned *temporal* one (its frame), so
the two are divided rather than one embedding per space-time position; a learned CLS token goes first.
Blocks are pre-norm transformer layers with joint attention over all tokens (Frozen-in-Time uses divided
space-time attention; MAC's point, the masking, is the same either way). An image is a 1-frame video.

Mask sampling (MAE): per sample, uniform noise is argsorted and the patches with the ``K`` smallest values are
kept, ``K = round((1 - mask_ratio) * S)`` per frame; the rest are *dropped before the patch embedding*, so
the encoder's cost scales with the visible fraction. ``mask_kind`` picks ``"frame"`` (each frame draws its
own mask) or ``"tube"`` (one spatial mask shared by all frames, as VideoMAE's tube masking). Every sample
keeps exactly ``T * K`` tokens, so a batch needs no attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfactory.config import ConfigError

MaskKind = Literal["frame", "tube"]


@dataclass
class SpaceTimeViTConfig:
    """Sizes of a :class:`SpaceTimeViT`; ``num_frames`` is the most frames it accepts (temporal positions)."""

    image_size: int = 32
    patch_size: int = 8
    num_frames: int = 4
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet, applied to [0, 1] pixels
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size: {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size: {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )

    @property
    def patches_per_frame(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ViTOutput:
    """``cls`` ``[B, D]``; ``tokens`` ``[B, T * K, D]``, the visible patches after the final norm, frame by
    frame (raster order unmasked, sampling order masked); ``mask`` ``[B, T, S]`` bool, true where a patch was
    dropped, or ``None`` when nothing was masked."""

    cls: Tensor
    tokens: Tensor
    mask: Tensor | None


def num_visible(patches_per_frame: int, mask_ratio: float) -> int:
    """Patches kept per frame: ``round((1 - mask_ratio) * S)``, at least one."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, round((1.0 - mask_ratio) * patches_per_frame))


def sample_patch_mask(
    batch: int,
    frames: int,
    patches_per_frame: int,
    mask_ratio: float,
    kind: MaskKind = "tube",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """MAE-style random masking, a different mask per sample.

    Returns:
        ``keep`` ``[B, T, K]`` int64 indices of the visible patches of each frame (random order), and
        ``mask`` ``[B, T, S]`` bool, true on dropped patches; ``K = num_visible(S, mask_ratio)``.
    """
    if kind not in ("frame", "tube"):
        raise ValueError(f"mask kind must be 'frame' or 'tube', got {kind!r}")
    k = num_visible(patches_per_frame, mask_ratio)
    noise = torch.rand(
        batch, 1 if kind == "tube" else frames, patches_per_frame, generator=generator, device=device
    )
    keep = noise.argsort(dim=-1)[..., :k].expand(batch, frames, k)  # [B, T, K]
    mask = torch.ones(batch, frames, patches_per_frame, dtype=torch.bool, device=keep.device)
    return keep, mask.scatter(-1, keep, False)


class Attention(nn.Module):
    """Multi-head self-attention (fused qkv projection, SDPA) ``[B, N, D] -> [B, N, D]``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, D / heads]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer layer: ``x + attn(norm(x))`` then ``x + mlp(norm(x))`` (GELU MLP)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SpaceTimeViT(nn.Module):
    """Video/image encoder with MAE-style mask sampling; see the module docstring."""

    def __init__(self, config: SpaceTimeViTConfig):
        super().__init__()
        config.validate()
        self.config = config
        dim = config.hidden_size
        self.patch_embed = nn.Linear(config.patch_size**2 * 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.spatial_pos = nn.Parameter(torch.zeros(config.patches_per_frame, dim))
        self.temporal_pos = nn.Parameter(torch.zeros(config.num_frames, dim))
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_ratio, config.layer_norm_eps)
            for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        for param in (self.cls_token, self.spatial_pos, self.temporal_pos):
            nn.init.trunc_normal_(param, std=0.02)

    def patchify(self, pixels: Tensor) -> Tensor:
        """``[B, T, H, W, 3]`` or ``[B, H, W, 3]`` (uint8, or float in [0, 1]) -> normalised patches
        ``[B, T, S, P * P * 3]``, each patch flattened in (row, column, channel) order."""
        cfg = self.config
        if pixels.dim() == 4:
            pixels = pixels.unsqueeze(1)  # an image is a 1-frame video
        b, t, h, w, c = pixels.shape
        if (h, w, c) != (cfg.image_size, cfg.image_size, 3) or t > cfg.num_frames:
            raise ValueError(
                f"expected [B, T<={cfg.num_frames}, {cfg.image_size}, {cfg.image_size}, 3] pixels, "
                f"got {tuple(pixels.shape)}"
            )
        dtype = self.patch_embed.weight.dtype
        x = pixels.to(dtype) / 255.0 if pixels.dtype == torch.uint8 else pixels.to(dtype)
        mean = torch.tensor(cfg.pixel_mean, dtype=dtype, device=x.device)
        std = torch.tensor(cfg.pixel_std, dtype=dtype, device=x.device)
        x = (x - mean) / std
        p, n = cfg.patch_size, cfg.image_size // cfg.patch_size
        x = x.view(b, t, n, p, n, p, 3).permute(0, 1, 2, 4, 3, 5, 6)  # [B, T, rows, cols, P, P, 3]
        return x.reshape(b, t, n * n, p * p * 3)

    def forward(
        self,
        pixels: Tensor,
        mask_ratio: float = 0.0,
        mask_kind: MaskKind = "tube",
        generator: torch.Generator | None = None,
    ) -> ViTOutput:
        """Encode ``pixels`` ``[B, T, H, W, 3]`` (or images ``[B, H, W, 3]``), dropping ``mask_ratio`` of the
        patches of every frame first (0 = the full input, no randomness)."""
        patches = self.patchify(pixels)  # [B, T, S, P * P * 3]
        b, t, s, _ = patches.shape
        spatial_pos = self.spatial_pos.expand(b, t, s, -1)  # [B, T, S, D]
        mask = None
        if mask_ratio > 0:
            keep, mask = sample_patch_mask(b, t, s, mask_ratio, mask_kind, generator, patches.device)
            patches = patches.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, patches.shape[-1]))
            spatial_pos = self.spatial_pos[keep]  # [B, T, K, D]
        x = self.patch_embed(patches) + spatial_pos + self.temporal_pos[:t, None]  # [B, T, K, D]
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.flatten(1, 2)], dim=1)  # [B, 1 + T * K, D]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return ViTOutput(cls=x[:, 0], tokens=x[:, 1:], mask=mask)
