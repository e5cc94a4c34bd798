"""A maskable space-time ViT (MAC's video encoder): only the visible patches enter the transformer.

Layout, after Frozen-in-Time: every frame is cut into ``S = (image_size / patch_size)^2`` patches that a
shared linear map embeds (a linear patchify, equal to a stride-``patch_size`` Conv2d); each patch token adds
a learned *spatial* position embedding (its place in the frame) and a learned *temporal* one (its frame), so
the two are divided rather than one embedding per space-time position; a learned CLS token goes first.
Blocks are pre-norm transformer layers with joint attention over all tokens (Frozen-in-Time uses divided
space-time attention; MAC's point, the masking, is the same either way). An image is a 1-frame video.

Starting from an image ViT (Frozen-in-Time and MAC start from image-pretrained weights):
:func:`clip_vision_weights` maps a Hugging Face CLIP vision tower onto this layout (``pre_norm`` and
``hidden_act`` give CLIP's pre-LayerNorm and QuickGELU), the temporal embeddings starting at zero so a
1-frame video is encoded exactly as the image tower encodes the image.

Mask sampling (MAE): per sample, uniform noise is argsorted and the patches with the ``K`` smallest values are
kept, ``K = round((1 - mask_ratio) * S)`` per frame; the rest are *dropped before the patch embedding*, so
the encoder's cost scales with the visible fraction. ``mask_kind`` picks ``"frame"`` (each frame draws its
own mask, as MAC's figure shows; the default) or ``"tube"`` (one spatial mask shared by all frames, as
VideoMAE's tube masking). Every sample keeps exactly ``T * K`` tokens, so a batch needs no attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfactory.config import ConfigError

MaskKind = Literal["frame", "tube"]
Activation = Literal["gelu", "quick_gelu"]


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
    pre_norm: bool = False  # a LayerNorm on the embedded tokens before the blocks (CLIP's pre_layrnorm)
    hidden_act: Activation = "gelu"  # the MLP's; CLIP towers use quick_gelu
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
        if self.hidden_act not in ("gelu", "quick_gelu"):
            raise ConfigError(f"hidden_act: must be 'gelu' or 'quick_gelu', got {self.hidden_act!r}")

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
    kind: MaskKind = "frame",
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


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the activation of OpenAI's CLIP."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    """Pre-norm transformer layer: ``x + attn(norm(x))`` then ``x + mlp(norm(x))`` (GELU or QuickGELU)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, act: Activation = "gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        activation = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), activation, nn.Linear(hidden, dim))

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
        self.pre_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps) if config.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_ratio, config.layer_norm_eps, config.hidden_act)
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
        mask_kind: MaskKind = "frame",
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
        x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return ViTOutput(cls=x[:, 0], tokens=x[:, 1:], mask=mask)


def clip_vision_config(clip_config, num_frames: int, pixel_mean, pixel_std) -> SpaceTimeViTConfig:
    """The :class:`SpaceTimeViTConfig` of a Hugging Face ``CLIPVisionConfig`` (same sizes, pre-norm, its
    activation), taking ``num_frames`` frames normalised by the tower's image processor's mean and std."""
    if clip_config.hidden_act not in ("gelu", "quick_gelu"):
        raise ConfigError(f"vision_init: a {clip_config.hidden_act!r} MLP has no SpaceTimeViT equivalent")
    return SpaceTimeViTConfig(
        image_size=clip_config.image_size,
        patch_size=clip_config.patch_size,
        num_frames=num_frames,
        hidden_size=clip_config.hidden_size,
        num_layers=clip_config.num_hidden_layers,
        num_heads=clip_config.num_attention_heads,
        mlp_ratio=clip_config.intermediate_size / clip_config.hidden_size,
        layer_norm_eps=clip_config.layer_norm_eps,
        pre_norm=True,
        hidden_act=clip_config.hidden_act,
        pixel_mean=tuple(pixel_mean),
        pixel_std=tuple(pixel_std),
    )


def clip_vision_weights(clip_state: dict[str, Tensor], num_frames: int) -> dict[str, Tensor]:
    """A ``CLIPVisionModel`` state dict -> :class:`SpaceTimeViT` weights (see :func:`clip_vision_config`).

    The patch convolution becomes the linear patch embedding (rows, columns, channels; zero bias), the
    class embedding plus its position becomes ``cls_token``, the other positions ``spatial_pos``; the
    temporal embeddings start at zero (Frozen-in-Time's init); q/k/v are fused; ``post_layernorm`` is the
    final norm. A 1-frame video is then encoded as the image tower encodes the image.
    """
    prefix = "vision_model."
    w = {k.removeprefix(prefix): v for k, v in clip_state.items()}
    conv = w["embeddings.patch_embedding.weight"]  # [D, 3, P, P]
    dim = conv.shape[0]
    pos = w["embeddings.position_embedding.weight"]  # [1 + S, D]
    out = {
        "patch_embed.weight": conv.permute(0, 2, 3, 1).reshape(dim, -1),
        "patch_embed.bias": torch.zeros(dim, dtype=conv.dtype),
        "cls_token": (w["embeddings.class_embedding"] + pos[0]).view(1, 1, dim),
        "spatial_pos": pos[1:],
        "temporal_pos": torch.zeros(num_frames, dim, dtype=pos.dtype),
        "pre_norm.weight": w["pre_layrnorm.weight"],
        "pre_norm.bias": w["pre_layrnorm.bias"],
        "norm.weight": w["post_layernorm.weight"],
        "norm.bias": w["post_layernorm.bias"],
    }
    layer = 0
    while f"encoder.layers.{layer}.layer_norm1.weight" in w:
        src, dst = f"encoder.layers.{layer}.", f"blocks.{layer}."
        for name in ("weight", "bias"):
            out[dst + f"attn.qkv.{name}"] = torch.cat(
                [w[src + f"self_attn.{p}_proj.{name}"] for p in ("q", "k", "v")]
            )
            out[dst + f"attn.proj.{name}"] = w[src + f"self_attn.out_proj.{name}"]
            out[dst + f"norm1.{name}"] = w[src + f"layer_norm1.{name}"]
            out[dst + f"norm2.{name}"] = w[src + f"layer_norm2.{name}"]
            out[dst + f"mlp.0.{name}"] = w[src + f"mlp.fc1.{name}"]
            out[dst + f"mlp.2.{name}"] = w[src + f"mlp.fc2.{name}"]
        layer += 1
    return out
