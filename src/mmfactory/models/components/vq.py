"""A VQ-GAN-style image tokenizer: a convolutional encoder, a quantiser from ``vector-quantize-pytorch`` and
a convolutional decoder; ``save_pretrained`` / ``from_pretrained`` (safetensors), ``AutoModel`` after
``import mmfactory.models.components.vq``.

Images of side ``S`` become a raster grid of ``(S / 2**num_down)**2`` integer codes. The encoder and decoder
are fully convolutional, so one tokenizer serves every resolution a recipe uses (MARS's stages 1 and 2).

Quantisers (``quantizer``):
* ``vq`` (default): a nearest-neighbour codebook with EMA updates (``codebook_decay``), k-means
  initialisation on the first batch and dead-code revival (a code used by fewer than
  ``dead_code_threshold`` vectors in the EMA is replaced by a batch vector) — VQ-GAN's quantiser with the
  two fixes that keep a small codebook in use; the commitment term is weighted by ``commitment_weight``.
  Gradients reach the encoder through the library's rotation trick (a straight-through variant).
* ``fsq``: finite scalar quantisation (``fsq_levels``, codebook size = their product): no codebook to
  collapse and no commitment term.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from vector_quantize_pytorch import FSQ, VectorQuantize


class VQTokenizerConfig(PretrainedConfig):
    model_type = "mmfactory_vq"

    def __init__(
        self,
        channels: int = 3,
        hidden_sizes: tuple[int, ...] | list[int] = (64, 128),
        res_blocks: int = 1,
        embed_dim: int = 32,
        quantizer: str = "vq",
        codebook_size: int = 256,
        codebook_decay: float = 0.9,
        commitment_weight: float = 0.25,
        kmeans_init: bool = True,
        dead_code_threshold: float = 2.0,
        fsq_levels: tuple[int, ...] | list[int] = (8, 5, 5, 5),
        **kwargs,
    ):
        self.channels = channels
        self.hidden_sizes = list(hidden_sizes)
        self.res_blocks = res_blocks
        self.embed_dim = embed_dim
        self.quantizer = quantizer
        self.codebook_size = codebook_size if quantizer == "vq" else math.prod(fsq_levels)
        self.codebook_decay = codebook_decay
        self.commitment_weight = commitment_weight
        self.kmeans_init = kmeans_init
        self.dead_code_threshold = dead_code_threshold
        self.fsq_levels = list(fsq_levels)
        super().__init__(**kwargs)

    @property
    def downsample(self) -> int:
        """Image side / grid side: one stride-2 step per entry of ``hidden_sizes`` after the first."""
        return 2 ** (len(self.hidden_sizes) - 1)


def check_vq_config(cfg: VQTokenizerConfig, where: str) -> None:
    from mmfactory.config import ConfigError

    if cfg.quantizer not in ("vq", "fsq"):
        raise ConfigError(f"{where}.quantizer: {cfg.quantizer!r} is not one of vq, fsq")
    if len(cfg.hidden_sizes) < 1 or min(cfg.hidden_sizes) < 8 or any(h % 8 for h in cfg.hidden_sizes):
        raise ConfigError(f"{where}.hidden_sizes: need one or more multiples of 8, got {cfg.hidden_sizes}")
    if cfg.codebook_size < 2:
        raise ConfigError(f"{where}.codebook_size: must be >= 2, got {cfg.codebook_size}")
    if not 0.0 < cfg.codebook_decay < 1.0:
        raise ConfigError(f"{where}.codebook_decay: must be in (0, 1), got {cfg.codebook_decay}")
    if cfg.commitment_weight < 0 or cfg.dead_code_threshold < 0:
        raise ConfigError(f"{where}: commitment_weight and dead_code_threshold must be >= 0")


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _encoder(cfg: VQTokenizerConfig) -> nn.Sequential:
    sizes = cfg.hidden_sizes
    layers: list[nn.Module] = [nn.Conv2d(cfg.channels, sizes[0], 3, padding=1)]
    for i, size in enumerate(sizes):
        layers += [ResBlock(size) for _ in range(cfg.res_blocks)]
        if i + 1 < len(sizes):
            layers.append(nn.Conv2d(size, sizes[i + 1], 4, stride=2, padding=1))
    layers += [nn.GroupNorm(8, sizes[-1]), nn.SiLU(), nn.Conv2d(sizes[-1], cfg.embed_dim, 1)]
    return nn.Sequential(*layers)


def _decoder(cfg: VQTokenizerConfig) -> nn.Sequential:
    sizes = cfg.hidden_sizes[::-1]
    layers: list[nn.Module] = [nn.Conv2d(cfg.embed_dim, sizes[0], 3, padding=1)]
    for i, size in enumerate(sizes):
        layers += [ResBlock(size) for _ in range(cfg.res_blocks)]
        if i + 1 < len(sizes):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(size, sizes[i + 1], 3, padding=1),
            ]
    layers += [nn.GroupNorm(8, sizes[-1]), nn.SiLU(), nn.Conv2d(sizes[-1], cfg.channels, 3, padding=1)]
    return nn.Sequential(*layers)


class VQImageTokenizer(PreTrainedModel):
    """Pixels ``[B, C, S, S]`` in [-1, 1] <-> codes ``[B, S/f, S/f]`` (``f = config.downsample``)."""

    config_class = VQTokenizerConfig
    main_input_name = "pixel_values"

    def __init__(self, config: VQTokenizerConfig):
        super().__init__(config)
        self.encoder = _encoder(config)
        self.decoder = _decoder(config)
        if config.quantizer == "vq":
            self.quantizer = VectorQuantize(
                dim=config.embed_dim,
                codebook_size=config.codebook_size,
                decay=config.codebook_decay,
                commitment_weight=config.commitment_weight,
                kmeans_init=config.kmeans_init,
                threshold_ema_dead_code=config.dead_code_threshold,
                accept_image_fmap=True,
            )
        else:
            self.quantizer = FSQ(levels=config.fsq_levels, dim=config.embed_dim)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # PyTorch's default initialisation of every layer, as built

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def quantize(self, latents: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Latents ``[B, D, h, w]`` -> (quantised ``[B, D, h, w]``, codes ``[B, h, w]``, commitment loss)."""
        if self.config.quantizer == "vq":
            quantized, codes, commit = self.quantizer(latents)
            return quantized, codes, commit.sum()
        b, d, h, w = latents.shape
        quantized, codes = self.quantizer(latents.permute(0, 2, 3, 1).reshape(b, h * w, d))
        quantized = quantized.reshape(b, h, w, d).permute(0, 3, 1, 2)
        return quantized, codes.reshape(b, h, w), latents.new_zeros(())

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (reconstruction ``[B, C, S, S]``, codes ``[B, h, w]``, commitment loss)."""
        quantized, codes, commit = self.quantize(self.encoder(pixel_values))
        return self.decoder(quantized), codes, commit

    @torch.no_grad()
    def encode(self, pixel_values: Tensor) -> Tensor:
        """Codes ``[B, h, w]`` (long) of pixels ``[B, C, S, S]``; no codebook update."""
        latents = self.encoder(pixel_values)
        if self.config.quantizer == "vq":
            b, d, h, w = latents.shape
            flat = latents.permute(0, 2, 3, 1).reshape(b, h * w, d)
            codebook = self.quantizer.codebook  # [K, D]
            distance = torch.cdist(flat, codebook.unsqueeze(0).expand(b, -1, -1))
            return distance.argmin(-1).reshape(b, h, w)
        return self.quantize(latents)[1].long()

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Pixels ``[B, C, S, S]`` (unclamped, ~[-1, 1]) of codes ``[B, h, w]``."""
        if self.config.quantizer == "vq":
            quantized = self.quantizer.codebook[codes]  # [B, h, w, D]
        else:
            quantized = self.quantizer.indices_to_codes(codes.flatten(1)).reshape(*codes.shape, -1)
        return self.decoder(quantized.permute(0, 3, 1, 2))


def code_usage(codes: Tensor, codebook_size: int) -> tuple[float, int]:
    """(perplexity of the code histogram ``exp(H)``, number of codes never used) over ``codes``."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).double()
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return float(entropy.exp()), int((counts == 0).sum())


def pixels_from_uint8(images: Tensor) -> Tensor:
    """uint8 ``[B, S, S, C]`` -> float ``[B, C, S, S]`` in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def uint8_from_pixels(pixels: Tensor) -> Tensor:
    """float ``[B, C, S, S]`` ~[-1, 1] -> uint8 ``[B, S, S, C]`` (clamped, rounded)."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


AutoConfig.register(VQTokenizerConfig.model_type, VQTokenizerConfig, exist_ok=True)
AutoModel.register(VQTokenizerConfig, VQImageTokenizer, exist_ok=True)
