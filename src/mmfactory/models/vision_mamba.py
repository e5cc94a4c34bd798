"""ARM (Ren et al., "Autoregressive Pretraining with Mamba in Vision", 2024): a vision Mamba encoder, its
cluster-autoregressive and masked (MAE-style) pretraining models, and the classifier it is fine-tuned as.

Encoder (:class:`VisionMamba`). A stride-``P`` convolution embeds ``P x P`` patches, fixed 2-D sin-cos
positions are added (no class token), and ``num_layers`` "MambaMLP" blocks follow::

    x = x + Mamba(LN(x))        # unidirectional selective-SSM mixer, expand 1, d_state 16, d_conv 4
    x = x + SwiGLU(LN(x))       # hidden 4 * d * 2 / 3

Cluster-autoregressive pretraining (:class:`ARMPretrainingModel`). The ``G x G`` patch grid is cut into
clusters of ``c x c`` patches; tokens are ordered cluster by cluster (raster order over clusters, raster
inside each). The encoder reads clusters ``1..K-1``; the features of several of its layers are
layer-normalised, concatenated and projected to one key/value stream per decoder block; a learned query
token plus the target's sin-cos position asks, through cross-attention-only blocks under a block-causal
mask, for the pixels of clusters ``2..K`` (query of cluster ``k+1`` sees clusters ``1..k``). Targets are
per-patch normalised pixels, the loss their MSE. The official code (OliverRensu/ARM) is followed for
everything the paper leaves open: the decoder block ``q + CrossAttn(LN q, LN kv)``, ``q + MLP(LN q)`` (GELU,
ratio 4, ``hidden / 64`` heads), ``LN -> Linear`` prediction head, the init (PyTorch-default linears with
zero biases, Mamba ``out_proj`` scaled by ``1/sqrt(depth)``, LeCun-normal patch embedding, Xavier decoder).

Masked pretraining (:class:`MaskedPretrainingModel`), for the paper's comparison with masked modelling:
the *same* unidirectional encoder reads a random ``1 - mask_ratio`` of the patches (in raster order), and
the *same* decoder class predicts the masked patches' normalised pixels, queries attending to the visible
features without a mask (a cross-attention decoder as in CrossMAE, Fu et al. 2024, instead of MAE's
self-attention one). Both pretext tasks thus share every module and differ only in what is predicted from
what.

Fine-tuning (:class:`VisionMambaClassifier`), as the official model: a class token in the middle of the
raster sequence, learned position embeddings started from the pretraining sin-cos table (interpolated when
fine-tuning at another resolution), the encoder with stochastic depth, a final LayerNorm and a linear head
on the mean of the patch states (or the class token's). ``scans`` adds scan directions initialised from the
unidirectional weights; see :class:`MambaMLPBlock` for how this relates to the official 4-scan ("v3") mixer.

Checkpoints: the three models are Hugging Face ``PreTrainedModel`` s, each with its ``PreTrainedConfig``
(:class:`ARMPretrainingConfig`, :class:`MaskedPretrainingConfig`, :class:`VisionMambaClassifierConfig`;
``encoder`` / ``decoder`` hold the fields of a :class:`VisionMambaConfig` / :class:`PixelDecoderConfig`),
registered with ``AutoConfig`` / ``AutoModel`` when this module is imported. ``save_pretrained`` writes
``config.json`` and ``model.safetensors``; ``from_pretrained`` (or :func:`load_pretrained`, whichever of the
three a folder holds) reads them back, folders written before the models were ``PreTrainedModel`` s
included (same keys, same weights). Fine-tuning transfers the ``encoder.*`` weights of any of the three
(:func:`load_encoder`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init

from mmfactory.config import ConfigError, from_dict
from mmfactory.models.components.ssm import MambaMixer

ScanOrder = Literal["forward", "backward", "column", "column_backward"]
SizeName = Literal["tiny", "small", "base", "large", "huge"]
# (hidden_size, num_layers). base/large/huge are the paper's ARM-B/L/H; tiny/small take DeiT's widths.
VISION_MAMBA_SIZES: dict[str, tuple[int, int]] = {
    "tiny": (192, 12),
    "small": (384, 12),
    "base": (768, 12),
    "large": (1024, 24),
    "huge": (1536, 24),
}


@dataclass
class VisionMambaConfig:
    """Sizes of a :class:`VisionMamba`. ``size`` fills ``hidden_size``/``num_layers`` from
    :data:`VISION_MAMBA_SIZES` (explicit values must then agree); without it both are required.
    ``pixel_mean``/``pixel_std`` normalise ``[0, 1]`` pixels, one value per channel."""

    size: SizeName | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    image_size: int = 192
    patch_size: int = 16
    in_channels: int = 3
    d_state: int = 16
    d_conv: int = 4
    expand: int = 1
    dt_rank: int | None = None  # None: ceil(hidden_size / 16)
    layer_norm_eps: float = 1e-5
    pixel_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    pixel_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    scan_chunk_size: int | None = None  # time steps per chunk of the selective scan (None: automatic)

    def validate(self) -> None:
        if self.size is not None:
            preset = dict(zip(("hidden_size", "num_layers"), VISION_MAMBA_SIZES[self.size], strict=True))
            for name, value in preset.items():
                if getattr(self, name) not in (None, value):
                    raise ConfigError(f"{name}: size {self.size!r} means {value}, got {getattr(self, name)}")
                setattr(self, name, value)
        if self.hidden_size is None or self.num_layers is None:
            raise ConfigError("hidden_size: set size, or both hidden_size and num_layers")
        if self.hidden_size % 4:
            raise ConfigError(
                f"hidden_size: 2-D sin-cos positions need a multiple of 4, got {self.hidden_size}"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size: {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        for name in ("pixel_mean", "pixel_std"):
            if len(getattr(self, name)) != self.in_channels:
                raise ConfigError(f"{name}: needs one value per channel ({self.in_channels})")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_channels


@dataclass
class PixelDecoderConfig:
    """The pretraining decoder (paper: 4 blocks, width 512, 8 heads, features of encoder layers 6, 8, 10,
    12 of 12). ``encoder_layers`` are 1-based; ``None`` takes up to 4 evenly spaced over the second half.
    Encoder blocks after the last listed layer are not run during pretraining."""

    hidden_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    mlp_ratio: float = 4.0
    encoder_layers: list[int] | None = None

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size: {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )
        if self.hidden_size % 4:
            raise ConfigError(
                f"hidden_size: 2-D sin-cos positions need a multiple of 4, got {self.hidden_size}"
            )

    def feature_layers(self, depth: int) -> list[int]:
        layers = self.encoder_layers or sorted({round(depth / 2 + i * depth / 6) for i in range(4)})
        if not all(1 <= layer <= depth for layer in layers):
            raise ConfigError(f"encoder_layers: {layers} must lie in 1..{depth} (the encoder's depth)")
        return layers


# --------------------------------------------------------------------------------------------------
# Pixels, positions, cluster order
# --------------------------------------------------------------------------------------------------


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """``[N]`` positions -> ``[N, dim]``: ``sin(p w_i)`` then ``cos(p w_i)``, ``w_i = 10000^(-2i/dim)``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d_positions(dim: int, grid: int) -> Tensor:
    """MAE's fixed 2-D sin-cos table ``[grid * grid, dim]`` in raster order: the first half of the
    channels encodes the column, the second half the row."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)


def patchify(pixels: Tensor, patch_size: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, L, P * P * C]`` in raster order, each patch flattened (row, column,
    channel) as in MAE."""
    b, c, h, w = pixels.shape
    p = patch_size
    x = pixels.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-patch normalised pixel targets ``(x - mean) / sqrt(var + eps)`` over the last dim (unbiased
    variance, as MAE and ARM compute it)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def cluster_order(grid: int, cluster_size: int) -> Tensor:
    """``[grid^2]`` int64: position ``t`` of the cluster-ordered sequence holds raster patch ``order[t]``.

    Clusters of ``cluster_size x cluster_size`` patches are visited in raster order, patches in raster
    order inside each; cluster ``k`` occupies ``[k * S, (k + 1) * S)`` with ``S = cluster_size^2``.
    """
    if grid % cluster_size:
        raise ValueError(
            f"a {grid}x{grid} patch grid does not split into {cluster_size}x{cluster_size} clusters"
        )
    n, c = grid // cluster_size, cluster_size
    raster = torch.arange(grid * grid).view(n, c, n, c)  # [cluster row, row in cluster, cluster col, col]
    return raster.permute(0, 2, 1, 3).flatten()


def block_causal_mask(num_clusters: int, cluster_len: int) -> Tensor:
    """``[K * S, K * S]`` bool, true where query ``i`` may attend key ``j``: ``j // S <= i // S``.

    Query cluster ``i`` predicts cluster ``i + 1`` of the image from key clusters ``0..i``.
    """
    cluster = torch.arange(num_clusters * cluster_len) // cluster_len
    return cluster[None, :] <= cluster[:, None]


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """``w3(silu(w1 x) * w2 x)`` ``[..., d] -> [..., d]`` (names as in the official code)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def _transpose_grid(x: Tensor, grid: int, cls_position: int | None) -> Tensor:
    """``[B, L, D]`` raster tokens read column by column; a class token at ``cls_position`` stays there
    (the official 4-scan mixer takes it out, transposes the grid and puts it back)."""
    if cls_position is not None:
        cls = x[:, cls_position : cls_position + 1]
        x = torch.cat([x[:, :cls_position], x[:, cls_position + 1 :]], dim=1)
    b, _, d = x.shape
    x = x.view(b, grid, grid, d).transpose(1, 2).reshape(b, grid * grid, d)
    if cls_position is not None:
        x = torch.cat([x[:, :cls_position], cls, x[:, cls_position:]], dim=1)
    return x


def _to_scan(x: Tensor, scan: ScanOrder, grid: int, cls_position: int | None = None) -> Tensor:
    """Reorder ``[B, L, D]`` raster tokens (a class token at ``cls_position``, if any) into ``scan`` order."""
    if scan.startswith("column"):
        x = _transpose_grid(x, grid, cls_position)
    return x.flip(1) if scan.endswith("backward") else x


def _from_scan(x: Tensor, scan: ScanOrder, grid: int, cls_position: int | None = None) -> Tensor:
    """Inverse of :func:`_to_scan` (a transpose of a square grid is its own inverse)."""
    x = x.flip(1) if scan.endswith("backward") else x
    if scan.startswith("column"):
        x = _transpose_grid(x, grid, cls_position)
    return x


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Per-block stochastic-depth rates as the official fine-tuning builds them: block ``i`` gets
    ``[0] + linspace(0, rate, depth)`` at ``i``, so blocks 0 and 1 never drop and the last gets
    ``rate * (depth - 2) / (depth - 1)``."""
    steps = torch.linspace(0, rate, depth).tolist()
    return ([0.0] + steps)[:depth]


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``rate`` and scale
    the kept ones by ``1 / (1 - rate)``; the identity in eval."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(keep)
        return x * mask / keep


class MambaMLPBlock(nn.Module):
    """``x + Mamba(LN x)``, then ``x + SwiGLU(LN x)``: ``[B, L, D] -> [B, L, D]``.

    ``mixer`` scans the sequence as given (causal). Each extra scan in ``scans[1:]`` (``backward``:
    reversed; ``column``: the square raster grid read column by column; ``column_backward``: that,
    reversed) gets its own :class:`MambaMixer` under ``extra_scans``, a copy of ``mixer`` made by
    :meth:`VisionMamba.copy_forward_scans`; the mixer output is the mean over scans, each mapped back to
    the token order. With all four this is the official fine-tuning mixer ("v3") except that there the
    scans share ``in_proj``/``out_proj`` (only conv, ``x_proj``, ``dt_proj``, ``A``, ``D`` are per scan);
    here each scan owns a copy of them. Both start as the same function (every copy equal, and the mean
    of linear maps is the linear map of the mean); they differ in what fine-tuning may change.
    """

    def __init__(self, config: VisionMambaConfig, scans: Sequence[ScanOrder], drop_path: float = 0.0):
        super().__init__()
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.grid = config.grid_size
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mixer = MambaMixer(
            dim,
            d_state=config.d_state,
            d_conv=config.d_conv,
            expand=config.expand,
            dt_rank=config.dt_rank,
            chunk_size=config.scan_chunk_size,
        )
        self.extra_scans = nn.ModuleDict({scan: copy.deepcopy(self.mixer) for scan in scans[1:]})
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, dim * 4 * 2 // 3)
        self.drop_path = DropPath(drop_path)

    def mix(self, x: Tensor, cls_position: int | None = None) -> Tensor:
        """The token mixer on normalised ``[B, L, D]``: forward scan, or the mean over all scans; a class
        token at ``cls_position`` is scanned where it sits (column scans keep it in place)."""
        if not self.extra_scans:
            return self.mixer(x)
        expected = self.grid**2 + (cls_position is not None)
        if x.shape[1] != expected:
            raise ValueError(
                f"multi-scan blocks need the full {self.grid}x{self.grid} raster grid, "
                f"got {x.shape[1]} tokens"
            )
        outs = [self.mixer(x)]
        outs += [
            _from_scan(m(_to_scan(x, scan, self.grid, cls_position)), scan, self.grid, cls_position)
            for scan, m in self.extra_scans.items()
        ]
        return torch.stack(outs).mean(0)

    def forward(self, x: Tensor, cls_position: int | None = None) -> Tensor:
        x = x + self.drop_path(self.mix(self.norm1(x), cls_position))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionMamba(nn.Module):
    """The ARM encoder: patch embedding, fixed 2-D sin-cos positions, MambaMLP blocks (no final norm:
    pretraining normalises the layers it reads, the classifier adds its own).

    ``embed`` maps images to raster tokens; ``forward`` runs any token sequence (a cluster-ordered prefix,
    the visible patches) through the blocks. ``scans`` other than ``["forward"]`` need full raster grids.
    """

    def __init__(
        self, config: VisionMambaConfig, scans: Sequence[ScanOrder] = ("forward",), drop_path: float = 0.0
    ):
        super().__init__()
        config.validate()
        if not scans or scans[0] != "forward" or len(set(scans)) != len(scans):
            raise ConfigError(f"scans: must start with 'forward' and not repeat, got {list(scans)}")
        self.config, self.scans = config, tuple(scans)
        dim = config.hidden_size
        self.patch_embed = nn.Conv2d(config.in_channels, dim, config.patch_size, stride=config.patch_size)
        for name, value in self.fixed_buffers().items():
            self.register_buffer(name, value, persistent=False)
        self.blocks = nn.ModuleList(
            MambaMLPBlock(config, self.scans, rate) for rate in drop_path_rates(drop_path, config.num_layers)
        )
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        fan_in = self.patch_embed.weight[0].numel()
        std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # LeCun normal, truncated at 2 std
        nn.init.trunc_normal_(self.patch_embed.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(self.patch_embed.bias)
        for block in self.blocks:
            for linear in (block.mlp.w1, block.mlp.w2, block.mlp.w3):
                nn.init.zeros_(linear.bias)
            block.mixer.out_proj.weight /= math.sqrt(len(self.blocks))  # GPT-2-style residual scaling
        self.copy_forward_scans()

    def fixed_buffers(self) -> dict[str, Tensor]:
        """The buffers computed from the config, not saved: sin-cos positions ``[L, D]``, pixel mean and std
        ``[C, 1, 1]``, in the default float dtype (as a model built under another default casts them)."""
        cfg, dtype = self.config, torch.get_default_dtype()
        return {
            "pos_embed": sincos_2d_positions(cfg.hidden_size, cfg.grid_size).to(dtype),
            "pixel_mean": torch.tensor(cfg.pixel_mean, dtype=dtype).view(-1, 1, 1),
            "pixel_std": torch.tensor(cfg.pixel_std, dtype=dtype).view(-1, 1, 1),
        }

    @torch.no_grad()
    def copy_forward_scans(self, scans: Sequence[ScanOrder] | None = None) -> None:
        """Make the ``scans`` (default: all extra ones) of every block copies of its forward mixer."""
        for block in self.blocks:
            for scan in scans if scans is not None else list(block.extra_scans):
                block.extra_scans[scan].load_state_dict(block.mixer.state_dict())

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 ``[B, H, W, C]`` -> normalised float ``[B, C, H, W]``."""
        cfg = self.config
        if images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.in_channels):
            side, channels = cfg.image_size, cfg.in_channels
            raise ValueError(f"expected [B, {side}, {side}, {channels}] images, got {list(images.shape)}")
        pixels = images.permute(0, 3, 1, 2).to(self.patch_embed.weight.dtype) / 255.0
        return (pixels - self.pixel_mean) / self.pixel_std

    def patch_tokens(self, pixels: Tensor) -> Tensor:
        """Normalised ``[B, C, H, W]`` -> raster patch tokens ``[B, L, D]``, no positions."""
        return self.patch_embed(pixels).flatten(2).transpose(1, 2)

    def embed(self, pixels: Tensor) -> Tensor:
        """Normalised ``[B, C, H, W]`` -> raster tokens with the fixed sin-cos positions ``[B, L, D]``."""
        return self.patch_tokens(pixels) + self.pos_embed

    def forward(
        self, tokens: Tensor, output_layers: Sequence[int] | None = None, cls_position: int | None = None
    ) -> list[Tensor]:
        """``[B, N, D]`` -> hidden states ``[B, N, D]`` after each 1-based layer in ``output_layers``
        (default: the last); ``cls_position``: where a class token sits among raster tokens, if any."""
        wanted = list(output_layers or [len(self.blocks)])
        hidden = {}
        for depth, block in enumerate(self.blocks[: max(wanted)], start=1):
            tokens = block(tokens, cls_position)
            hidden[depth] = tokens
        return [hidden[layer] for layer in wanted]

    def layer_id(self, name: str) -> int:
        """Depth of parameter ``name`` (relative to this module) for layer-wise lr decay (BEiT / MAE, as the
        official fine-tuning's ``param_groups_lrd``): 0 for the patch embedding, ``i + 1`` for block ``i``."""
        if name.startswith("patch_embed."):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        raise ValueError(f"{name!r} is not a parameter of the encoder")


# --------------------------------------------------------------------------------------------------
# Pretraining decoder
# --------------------------------------------------------------------------------------------------


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``[B, M, d]`` over keys/values ``[B, N, d]`` (SDPA)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, queries: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask`` ``[M, N]`` bool, true where a query may attend a key."""
        b, m, d = queries.shape
        h = self.num_heads
        q = self.q(queries).view(b, m, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, h, M, d / h]
        return self.proj(out.transpose(1, 2).reshape(b, m, d))


class DecoderBlock(nn.Module):
    """Cross-attention only: ``q + CrossAttn(LN q, LN kv)``, then ``q + MLP(LN q)`` (GELU)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, queries: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        queries = queries + self.attn(self.norm_q(queries), self.norm_kv(context), mask)
        return queries + self.mlp(self.norm_mlp(queries))


class PixelDecoder(nn.Module):
    """Predicts normalised pixels of target patches from encoder features.

    ``F`` encoder layers' features are each layer-normalised, concatenated and projected to ``num_layers``
    key/value streams of width ``d`` (one per block); queries are a learned token plus the sin-cos position
    of the target patch.
    """

    def __init__(self, config: PixelDecoderConfig, encoder: VisionMambaConfig):
        super().__init__()
        config.validate()
        self.layers = config.feature_layers(encoder.num_layers)
        dim = config.hidden_size
        self.feature_norms = nn.ModuleList(
            nn.LayerNorm(encoder.hidden_size, eps=encoder.layer_norm_eps) for _ in self.layers
        )
        self.enc_to_dec = nn.Linear(len(self.layers) * encoder.hidden_size, config.num_layers * dim)
        self.query_token = nn.Parameter(torch.zeros(dim))
        self.grid_size = encoder.grid_size
        for name, value in self.fixed_buffers().items():
            self.register_buffer(name, value, persistent=False)
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, config.num_heads, config.mlp_ratio) for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, encoder.patch_dim)
        with torch.no_grad():
            nn.init.trunc_normal_(self.query_token, std=0.02)
            for module in self.blocks.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.zeros_(module.bias)

    def fixed_buffers(self) -> dict[str, Tensor]:
        """The query positions ``[L, d]`` (sin-cos, not saved), in the default float dtype."""
        dim = self.query_token.shape[0]
        return {"pos_embed": sincos_2d_positions(dim, self.grid_size).to(torch.get_default_dtype())}

    def forward(self, features: Sequence[Tensor], targets: Tensor, mask: Tensor | None = None) -> Tensor:
        """``features``: ``F`` tensors ``[B, N, D_enc]``; ``targets``: raster indices of the patches to
        predict, ``[M]`` or ``[B, M]``; ``mask`` ``[M, N]`` bool -> predictions ``[B, M, P * P * C]``."""
        normed = torch.cat([norm(f) for norm, f in zip(self.feature_norms, features, strict=True)], dim=-1)
        streams = self.enc_to_dec(normed).chunk(len(self.blocks), dim=-1)  # each [B, N, d]
        queries = self.query_token + self.pos_embed[targets]  # [M, d] or [B, M, d]
        queries = queries.expand(features[0].shape[0], *queries.shape[-2:])
        for block, context in zip(self.blocks, streams, strict=True):
            queries = block(queries, context, mask)
        return self.pred(self.norm(queries))


# --------------------------------------------------------------------------------------------------
# Hugging Face configs and models: save_pretrained / from_pretrained, AutoModel
# --------------------------------------------------------------------------------------------------


def _fields_of(cls: type, value: Any, where: str) -> dict[str, Any]:
    """A ``cls`` dataclass, or its fields as a dict, as the validated dict of its fields."""
    if isinstance(value, cls):
        value = dataclasses.asdict(value)
    return dataclasses.asdict(from_dict(cls, value, where))


class _EncoderConfig(PreTrainedConfig):
    """A config whose ``encoder`` holds the fields of a :class:`VisionMambaConfig` (given as one or as a dict;
    stored as a validated dict, a ``size`` preset resolved)."""

    encoder: dict | VisionMambaConfig | None = None

    def __post_init__(self, **kwargs):
        if self.encoder is not None:
            self.encoder = _fields_of(VisionMambaConfig, self.encoder, "encoder")
        super().__post_init__(**kwargs)

    @property
    def encoder_config(self) -> VisionMambaConfig:
        """A new :class:`VisionMambaConfig` of ``encoder``."""
        return from_dict(VisionMambaConfig, self.encoder, "encoder")


class _PretrainingConfig(_EncoderConfig):
    """... and whose ``decoder`` holds those of a :class:`PixelDecoderConfig` (default: the paper's)."""

    decoder: dict | PixelDecoderConfig | None = None

    def __post_init__(self, **kwargs):
        self.decoder = _fields_of(PixelDecoderConfig, self.decoder, "decoder")
        super().__post_init__(**kwargs)

    @property
    def decoder_config(self) -> PixelDecoderConfig:
        """A new :class:`PixelDecoderConfig` of ``decoder``."""
        return from_dict(PixelDecoderConfig, self.decoder, "decoder")


class ARMPretrainingConfig(_PretrainingConfig):
    """:class:`ARMPretrainingModel`'s: ``encoder``, ``decoder``, ``cluster_size`` patches per cluster side."""

    model_type = "mmfactory_arm_pretraining"
    cluster_size: int = 4


class MaskedPretrainingConfig(_PretrainingConfig):
    """:class:`MaskedPretrainingModel`'s: ``encoder``, ``decoder``, the ``mask_ratio`` of hidden patches."""

    model_type = "mmfactory_vision_mamba_mae"
    mask_ratio: float = 0.75


class VisionMambaClassifierConfig(_EncoderConfig):
    """:class:`VisionMambaClassifier`'s: ``encoder``, ``num_classes``, ``scans``, ``class_names`` (default
    ``"0"``, ``"1"``, ...), ``pooling`` (``mean`` or ``cls``) and the ``drop_path`` rate."""

    model_type = "mmfactory_vision_mamba_classifier"
    num_classes: int | None = None
    scans: list[str] = field(default_factory=lambda: ["forward"])
    class_names: list[str] | None = None
    pooling: str = "mean"
    drop_path: float = 0.0

    def __post_init__(self, **kwargs):
        if self.class_names is None and self.num_classes is not None:
            self.class_names = [str(i) for i in range(self.num_classes)]
        super().__post_init__(**kwargs)


def _saved_model_type(path: str | Path) -> str:
    """The ``model_type`` of a ``save_pretrained`` folder's ``config.json``."""
    model_type = PreTrainedConfig.get_config_dict(str(path))[0].get("model_type")
    if model_type is None:
        raise FileNotFoundError(f"{path}: no config.json with a model_type (not a save_pretrained folder)")
    return model_type


class VisionMambaPreTrainedModel(PreTrainedModel):
    """What the three models share as Hugging Face models.

    Parameters are initialised where the modules are built (the official init above; ``post_init`` leaves
    them alone). ``from_pretrained`` builds on the meta device and swaps in the loaded tensors; what it cannot
    load is put back: the buffers computed from the config (``_init_weights``) and the ``_no_weight_decay``
    marks that ``build_optimizer`` reads. It is strict: a folder of another model type, or whose weights are
    not exactly the model's, is refused (an absent weight would otherwise stay uninitialised).
    """

    main_input_name = "images"
    _no_split_modules = ["MambaMLPBlock", "DecoderBlock"]

    def post_init(self) -> None:
        super().post_init()
        marked = self.named_parameters()
        self._no_weight_decay_names = [name for name, p in marked if getattr(p, "_no_weight_decay", False)]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, VisionMamba | PixelDecoder | ARMPretrainingModel):
            for name, value in module.fixed_buffers().items():
                init.copy_(getattr(module, name), value)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args, **kwargs) -> Self:
        path, expected = pretrained_model_name_or_path, cls.config_class.model_type
        if not isinstance(kwargs.get("config"), PreTrainedConfig):  # AutoModel passes the folder's config
            saved = _saved_model_type(path)
            if saved != expected:
                raise ValueError(f"{path}: holds a {saved!r} model, not {expected!r}")
        with_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        except ConfigError as err:
            raise ConfigError(f"{path}/config.json: {err}") from None
        wrong = {
            key: sorted(str(k) for k in info[key])
            for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
            if info[key]
        }
        if wrong:
            raise ValueError(f"{path}: its weights do not fit a {cls.__name__}: {wrong}")
        for name in model._no_weight_decay_names:
            model.get_parameter(name)._no_weight_decay = True
        return (model, info) if with_info else model


class ARMPretrainingModel(VisionMambaPreTrainedModel):
    """Cluster-autoregressive pretraining (see the module docstring)."""

    config_class = ARMPretrainingConfig

    def __init__(
        self,
        config: ARMPretrainingConfig | VisionMambaConfig,
        decoder: PixelDecoderConfig | None = None,
        cluster_size: int = 4,
    ):
        """From ``config``, or from the encoder's config, the decoder's and ``cluster_size``."""
        if isinstance(config, VisionMambaConfig):
            config = ARMPretrainingConfig(encoder=config, decoder=decoder, cluster_size=cluster_size)
        super().__init__(config)
        encoder = config.encoder_config
        self.encoder = VisionMamba(encoder)
        self.decoder = PixelDecoder(config.decoder_config, encoder)
        self.cluster_len = config.cluster_size**2
        self.num_clusters = len(cluster_order(encoder.grid_size, config.cluster_size)) // self.cluster_len
        if self.num_clusters < 2:
            raise ConfigError(
                f"cluster_size: {config.cluster_size} leaves a single cluster; nothing to predict"
            )
        for name, value in self.fixed_buffers().items():
            self.register_buffer(name, value, persistent=False)
        self.post_init()

    def fixed_buffers(self) -> dict[str, Tensor]:
        """The buffers computed from the config, not saved: the cluster order ``[L]`` (int64) and the
        block-causal mask ``[(K - 1) S, (K - 1) S]`` (bool)."""
        order = cluster_order(self.encoder.config.grid_size, self.config.cluster_size)
        return {"order": order, "mask": block_causal_mask(self.num_clusters - 1, self.cluster_len)}

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 ``[B, H, W, C]`` -> ``(pred, target)``, both ``[B, (K - 1) * S, P * P * C]``: the patches
        of clusters ``2..K`` in cluster order."""
        pixels = self.encoder.normalize(images)
        tokens = self.encoder.embed(pixels)  # [B, L, D] raster
        seen, predicted = self.order[: -self.cluster_len], self.order[self.cluster_len :]
        features = self.encoder(tokens[:, seen], self.decoder.layers)  # F x [B, (K - 1) S, D]
        pred = self.decoder(features, predicted, self.mask)
        target = normalize_patches(patchify(pixels, self.encoder.config.patch_size))[:, predicted]
        return pred, target

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """uint8 ``[B, H, W, C]`` -> uint8 ``[B, H, W, C]``: the first cluster as given, clusters ``2..K``
        predicted, each predicted patch mapped back to pixels with the true patch's mean and variance (the
        targets are per-patch normalised; MAE's figures are drawn the same way)."""
        pred, _ = self(images)
        pixels = self.encoder.normalize(images)
        p = self.encoder.config.patch_size
        patches = patchify(pixels, p)  # [B, L, P * P * C]
        predicted = self.order[self.cluster_len :]
        true = patches[:, predicted]
        std, mean = (true.var(-1, keepdim=True) + 1e-6).sqrt(), true.mean(-1, keepdim=True)
        patches[:, predicted] = pred.to(patches.dtype) * std + mean
        b, c, h, w = pixels.shape
        grid = h // p
        x = patches.reshape(b, grid, grid, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        x = x * self.encoder.pixel_std + self.encoder.pixel_mean
        return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def random_split(
    batch: int,
    length: int,
    num_visible: int,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Per sample, ``num_visible`` of ``length`` positions drawn uniformly: ``(visible [B, V], masked
    [B, L - V])`` int64, each sorted ascending (so both stay in raster order)."""
    noise = torch.rand(batch, length, generator=generator, device=device)
    shuffle = noise.argsort(dim=1)
    return shuffle[:, :num_visible].sort(dim=1).values, shuffle[:, num_visible:].sort(dim=1).values


class MaskedPretrainingModel(VisionMambaPreTrainedModel):
    """MAE-style pretraining of the same encoder with the same decoder class (see the module docstring)."""

    config_class = MaskedPretrainingConfig

    def __init__(
        self,
        config: MaskedPretrainingConfig | VisionMambaConfig,
        decoder: PixelDecoderConfig | None = None,
        mask_ratio: float = 0.75,
    ):
        """From ``config``, or from the encoder's config, the decoder's and ``mask_ratio``."""
        if isinstance(config, VisionMambaConfig):
            config = MaskedPretrainingConfig(encoder=config, decoder=decoder, mask_ratio=mask_ratio)
        super().__init__(config)
        if not 0.0 < config.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio: must be in (0, 1), got {config.mask_ratio}")
        encoder = config.encoder_config
        self.encoder = VisionMamba(encoder)
        self.decoder = PixelDecoder(config.decoder_config, encoder)
        self.num_visible = max(1, round((1 - config.mask_ratio) * encoder.num_patches))
        self.post_init()

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """uint8 ``[B, H, W, C]`` -> ``(pred, target)`` ``[B, M, P * P * C]`` for the ``M`` masked patches."""
        pixels = self.encoder.normalize(images)
        tokens = self.encoder.embed(pixels)  # [B, L, D]
        b, length, dim = tokens.shape
        visible, masked = random_split(b, length, self.num_visible, generator, tokens.device)
        features = self.encoder(tokens.gather(1, visible[..., None].expand(-1, -1, dim)), self.decoder.layers)
        pred = self.decoder(features, masked)
        target = normalize_patches(patchify(pixels, self.encoder.config.patch_size))
        return pred, target.gather(1, masked[..., None].expand(-1, -1, target.shape[-1]))


Pooling = Literal["cls", "mean"]


def interpolate_positions(table: Tensor, grid: int) -> Tensor:
    """A ``[g * g, D]`` raster position table resized to ``[grid * grid, D]`` (bicubic, as the official
    fine-tuning's ``interpolate_pos_embed``); returned as it is when ``g == grid``."""
    old = math.isqrt(table.shape[0])
    if old == grid:
        return table
    x = table.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(table.dtype)


class VisionMambaClassifier(VisionMambaPreTrainedModel):
    """The official fine-tuning model: a learned class token in the *middle* of the raster sequence
    (position ``N // 2`` of ``N`` patches), a learned position embedding ``[N + 1, D]``, the encoder (with
    stochastic depth ``drop_path``), a final LayerNorm and a linear head on the mean of the patch states
    before and after the class token (``pooling: mean``: the official ``global_pool``, which its README's
    fine-tuning commands set) or on the class token's state (``cls``). Column scans keep the class token in
    place.

    Position embeddings start from the pretraining encoder's fixed sin-cos table, bicubically interpolated
    when fine-tuning at another resolution (:func:`interpolate_positions`), with zeros at the class token.
    """

    config_class = VisionMambaClassifierConfig

    def __init__(
        self,
        config: VisionMambaClassifierConfig | VisionMambaConfig,
        num_classes: int | None = None,
        scans: Sequence[ScanOrder] = ("forward",),
        class_names: Sequence[str] | None = None,
        pooling: Pooling = "mean",
        drop_path: float = 0.0,
    ):
        """From ``config``, or from the encoder's config and the other fields of one."""
        if isinstance(config, VisionMambaConfig):
            names = None if class_names is None else list(class_names)
            config = VisionMambaClassifierConfig(
                encoder=config,
                num_classes=num_classes,
                scans=list(scans),
                class_names=names,
                pooling=pooling,
                drop_path=drop_path,
            )
        super().__init__(config)
        if config.num_classes is None:
            raise ConfigError("num_classes: required")
        if config.pooling not in ("cls", "mean"):
            raise ConfigError(f"pooling: must be 'cls' or 'mean', got {config.pooling!r}")
        encoder = config.encoder_config
        self.encoder = VisionMamba(encoder, config.scans, config.drop_path)
        dim, patches = encoder.hidden_size, encoder.num_patches
        self.cls_position = patches // 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(patches + 1, dim))
        for param in (self.cls_token, self.pos_embed):
            param._no_weight_decay = True  # the official no_weight_decay list
        self.norm = nn.LayerNorm(dim, eps=encoder.layer_norm_eps)
        self.head = nn.Linear(dim, config.num_classes)
        with torch.no_grad():
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            self.set_positions(sincos_2d_positions(dim, encoder.grid_size))
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.post_init()

    @property
    def pooling(self) -> Pooling:
        return self.config.pooling

    @property
    def class_names(self) -> list[str]:
        return self.config.class_names

    @torch.no_grad()
    def set_positions(self, patch_table: Tensor) -> None:
        """``pos_embed`` from a ``[g * g, D]`` raster table (interpolated to this grid), zero at the class
        token."""
        table = interpolate_positions(patch_table, self.encoder.config.grid_size)
        c = self.cls_position
        zero = table.new_zeros(1, table.shape[1])
        self.pos_embed.copy_(torch.cat([table[:c], zero, table[c:]]))

    def patch_positions(self) -> Tensor:
        """``[N, D]``: ``pos_embed`` without the class token's row."""
        c = self.cls_position
        return torch.cat([self.pos_embed[:c], self.pos_embed[c + 1 :]])

    def forward(self, images: Tensor) -> Tensor:
        """uint8 ``[B, H, W, C]`` -> logits ``[B, num_classes]``."""
        enc, c = self.encoder, self.cls_position
        x = enc.patch_tokens(enc.normalize(images))  # [B, N, D]
        x = torch.cat([x[:, :c], self.cls_token.expand(len(x), -1, -1), x[:, c:]], dim=1) + self.pos_embed
        (hidden,) = enc(x, cls_position=c)
        hidden = self.norm(hidden)  # [B, N + 1, D]
        if self.pooling == "cls":
            return self.head(hidden[:, c])
        return self.head((hidden[:, :c].mean(1) + hidden[:, c + 1 :].mean(1)) / 2)

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay depth: the encoder's, 0 for the class token and positions (as the patch
        embedding), ``num_layers + 1`` for the norm and head."""
        if name.startswith("encoder."):
            return self.encoder.layer_id(name.removeprefix("encoder."))
        if name in ("cls_token", "pos_embed"):
            return 0
        return len(self.encoder.blocks) + 1


MODELS: dict[str, type[VisionMambaPreTrainedModel]] = {
    model.config_class.model_type: model
    for model in (ARMPretrainingModel, MaskedPretrainingModel, VisionMambaClassifier)
}


def load_pretrained(path: str | Path) -> VisionMambaPreTrainedModel:
    """The model of a ``save_pretrained`` folder, whichever of :data:`MODELS` it holds (``AutoModel`` would
    load any model type; this refuses the others)."""
    model_type = _saved_model_type(path)
    if model_type not in MODELS:
        raise ValueError(f"{path}: holds a {model_type!r} model, not a vision Mamba ({', '.join(MODELS)})")
    return MODELS[model_type].from_pretrained(path)


def load_pretrained_encoder(
    classifier: VisionMambaClassifier, state: dict[str, Tensor], saved: VisionMambaConfig
) -> None:
    """Start ``classifier`` from a ``save_pretrained`` state dict whose encoder config is ``saved``: the
    encoder weights (:func:`load_encoder`), then the position embeddings — a classifier's own (its patch
    rows interpolated to this grid) or the pretraining encoder's sin-cos table (interpolated) — and a
    classifier's class token. The head is re-initialised with std 2e-5, as the official fine-tuning does."""
    load_encoder(classifier.encoder, state)
    with torch.no_grad():
        if "pos_embed" in state:
            c = saved.num_patches // 2
            classifier.set_positions(torch.cat([state["pos_embed"][:c], state["pos_embed"][c + 1 :]]))
            classifier.cls_token.copy_(state["cls_token"])
        else:
            classifier.set_positions(sincos_2d_positions(saved.hidden_size, saved.grid_size))
        nn.init.trunc_normal_(classifier.head.weight, std=2e-5)


def load_encoder(encoder: VisionMamba, state: dict[str, Tensor]) -> None:
    """Load the ``encoder.*`` weights of a ``save_pretrained`` state dict into ``encoder``.

    Extra scans the checkpoint lacks (a unidirectional pretraining output loaded into a bidirectional or
    4-scan encoder) become copies of the forward mixer, as the official fine-tuning initialises them.
    """
    prefix = "encoder."
    weights = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError("the checkpoint holds no encoder.* weights")
    missing, unexpected = encoder.load_state_dict(weights, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint weights the encoder does not have: {sorted(unexpected)[:5]}")
    absent = {key.split(".")[3] for key in missing if ".extra_scans." in key}
    if any(".extra_scans." not in key for key in missing):
        raise ValueError(f"checkpoint lacks encoder weights: {sorted(missing)[:5]}")
    encoder.copy_forward_scans(sorted(absent))


AutoConfig.register(ARMPretrainingConfig.model_type, ARMPretrainingConfig, exist_ok=True)
AutoModel.register(ARMPretrainingConfig, ARMPretrainingModel, exist_ok=True)
AutoConfig.register(MaskedPretrainingConfig.model_type, MaskedPretrainingConfig, exist_ok=True)
AutoModel.register(MaskedPretrainingConfig, MaskedPretrainingModel, exist_ok=True)
AutoConfig.register(VisionMambaClassifierConfig.model_type, VisionMambaClassifierConfig, exist_ok=True)
AutoModel.register(VisionMambaClassifierConfig, VisionMambaClassifier, exist_ok=True)
