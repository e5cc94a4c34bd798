"""Video/image-text dual encoder (MAC): a maskable space-time ViT and a Hugging Face text encoder, each
followed by a linear projection into a shared space, and the logit scale (inverse temperature) of the
contrastive loss, fixed or learned.

Hugging Face native: :class:`DualEncoderConfig` / :class:`DualEncoderModel` are a ``PreTrainedConfig`` /
``PreTrainedModel``, so ``save_pretrained`` writes ``config.json`` + ``model.safetensors`` and
``DualEncoderModel.from_pretrained`` (or ``AutoModel``, once this module is imported) reads them back. The
text encoder is any ``AutoModel``: a tiny BERT built from a config, or a local folder such as
all-MiniLM-L6-v2; its own pooler is removed (pooling is ours: the ``[CLS]`` state, or the mean over real
tokens as sentence-transformers do).

Text masking. MAC "adopts the mask sampling technique for text inputs for consistency" with the video. Per
sequence, ``round(ratio * n)`` of its ``n`` maskable tokens (real tokens other than ``[CLS]``/``[SEP]``) are
chosen uniformly at random. ``"replace"`` (the default, as MAC's figure draws it) puts ``[MASK]`` in their
place (BERT-style; same length, no savings). ``"drop"`` removes them as the video's masked patches are
removed: the kept tokens are packed to the left and keep their original position ids, so the encoder must
accept ``position_ids`` (BERT-family models do); it saves text compute, which is small beside the video's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers import initialization as init
from transformers.configuration_utils import SubConfigSpec

from mmfactory.config import ConfigError, from_dict
from mmfactory.models.components.vit import (
    MaskKind,
    SpaceTimeViT,
    SpaceTimeViTConfig,
    clip_vision_config,
    clip_vision_weights,
)
from mmfactory.models.hub import resolve_model_folder
from mmfactory.models.lm import check_config_keys
from mmfactory.models.vision import VisionTowerConfig, has_cls_token, load_image_processor, load_vision_tower

TextMaskMode = Literal["drop", "replace"]
TextPooling = Literal["cls", "mean"]
ENCODER_SPECIAL_TOKENS = {
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
    "pad_token": "[PAD]",
}


def mask_text_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    maskable: Tensor,
    mask_ratio: float,
    mode: TextMaskMode = "replace",
    mask_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Mask ``round(mask_ratio * n_i)`` of the ``n_i`` maskable tokens of each sequence (uniformly at random).

    Args:
        input_ids, attention_mask: ``[B, L]``, right-padded.
        maskable: ``[B, L]`` bool, true on tokens that may be masked (padding never is).
        mode: ``"drop"`` or ``"replace"`` (see the module docstring).

    Returns:
        ``(input_ids, attention_mask, position_ids)``: for ``drop`` ``[B, L']`` with ``L'`` the longest kept
        sequence and ``position_ids`` the kept tokens' original positions; for ``replace`` ``[B, L]`` with
        ``[MASK]`` at masked tokens and ``position_ids = None``.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if mode == "replace" and mask_token_id is None:
        raise ValueError("replace masking needs mask_token_id (the tokenizer's [MASK])")
    real = attention_mask.bool()
    maskable = maskable.bool() & real
    num_masked = torch.round(maskable.sum(dim=1) * mask_ratio).long()  # [B]
    noise = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    noise = noise.masked_fill(~maskable, 2.0)  # never chosen before a maskable token
    rank = noise.argsort(dim=1).argsort(dim=1)  # [B, L] rank of each token's noise within its sequence
    masked = rank < num_masked[:, None]
    if mode == "replace":
        return input_ids.masked_fill(masked, mask_token_id), attention_mask, None
    if mode != "drop":
        raise ValueError(f"text mask mode must be 'drop' or 'replace', got {mode!r}")
    keep = real & ~masked
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices  # kept tokens first, in order
    order = order[:, : int(keep.sum(dim=1).max())]  # [B, L']
    return input_ids.gather(1, order), keep.gather(1, order).to(attention_mask.dtype), order


class DualEncoderConfig(PreTrainedConfig):
    """``vision_config``: :class:`SpaceTimeViTConfig` fields; ``text_config``: any HF encoder config.

    ``logit_scale_init`` is the inverse temperature (MAC, after Frozen-in-Time: temperature 0.05, scale 20),
    fixed unless ``learn_logit_scale`` (CLIP's choice: learned in log space, clamped to
    ``[1, max_logit_scale]`` by the loss). ``mask_token_id`` serves ``replace`` masking.
    """

    model_type = "mmfactory_dual_encoder"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert")}

    vision_config: dict | None = None
    text_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 64
    text_pooling: str = "cls"
    logit_scale_init: float = 20.0
    learn_logit_scale: bool = False
    max_logit_scale: float = 100.0
    mask_token_id: int | None = None
    initializer_range: float = 0.02


@dataclass
class DualEncoderOutput:
    """``video_embeds`` and ``text_embeds`` ``[B, P]`` (projected, not normalised); ``log_logit_scale``."""

    video_embeds: Tensor
    text_embeds: Tensor
    log_logit_scale: Tensor


class DualEncoderModel(PreTrainedModel):
    """Video encoder + text encoder + projections + logit scale; the masking is chosen per call."""

    config_class = DualEncoderConfig
    base_model_prefix = "dual_encoder"
    main_input_name = "video"

    def __init__(self, config: DualEncoderConfig):
        super().__init__(config)
        if config.text_pooling not in ("cls", "mean"):
            raise ValueError(f"text_pooling must be 'cls' or 'mean', got {config.text_pooling!r}")
        vision = from_dict(SpaceTimeViTConfig, config.vision_config, "vision_config")
        self.vision_model = SpaceTimeViT(vision)
        self.text_model = AutoModel.from_config(config.text_config)
        if getattr(self.text_model, "pooler", None) is not None:
            self.text_model.pooler = None  # unused (pooling is ours) and would get no gradient
        self.video_projection = nn.Linear(vision.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        scale = torch.tensor(math.log(config.logit_scale_init))
        if config.learn_logit_scale:
            self.log_logit_scale = nn.Parameter(scale)
        else:  # a fixed temperature: a buffer, so no trainable-set pattern or optimizer can move it
            self.register_buffer("log_logit_scale", scale)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear: normal(0, initializer_range), LayerNorm: (1, 0)
        if isinstance(module, SpaceTimeViT):
            for param in (module.cls_token, module.spatial_pos, module.temporal_pos):
                init.trunc_normal_(param, std=self.config.initializer_range)
        elif isinstance(module, DualEncoderModel):
            init.constant_(module.log_logit_scale, math.log(self.config.logit_scale_init))

    def encode_video(
        self,
        video: Tensor,
        mask_ratio: float = 0.0,
        mask_kind: MaskKind = "frame",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``[B, T, H, W, 3]`` frames (or ``[B, H, W, 3]`` images) -> ``[B, P]`` projected CLS."""
        return self.video_projection(self.vision_model(video, mask_ratio, mask_kind, generator).cls)

    def encode_text(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        special_tokens_mask: Tensor | None = None,
        mask_ratio: float = 0.0,
        mask_mode: TextMaskMode = "replace",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``[B, L]`` tokens (``[CLS] ... [SEP]``, right-padded) -> ``[B, P]`` projected pooled state.

        ``special_tokens_mask`` ``[B, L]`` (1 on ``[CLS]``/``[SEP]``) is needed when ``mask_ratio > 0``.
        """
        position_ids = None
        if mask_ratio > 0:
            if special_tokens_mask is None:
                raise ValueError("text masking needs special_tokens_mask: [CLS] and [SEP] are never masked")
            input_ids, attention_mask, position_ids = mask_text_tokens(
                input_ids,
                attention_mask,
                ~special_tokens_mask.bool(),
                mask_ratio,
                mask_mode,
                self.config.mask_token_id,
                generator,
            )
        extra = {} if position_ids is None else {"position_ids": position_ids}
        hidden = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, **extra
        ).last_hidden_state
        if self.config.text_pooling == "cls":
            pooled = hidden[:, 0]  # [B, H]
        else:
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return self.text_projection(pooled)

    def forward(
        self,
        video: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        special_tokens_mask: Tensor | None = None,
        video_mask_ratio: float = 0.0,
        video_mask_kind: MaskKind = "frame",
        text_mask_ratio: float = 0.0,
        text_mask_mode: TextMaskMode = "replace",
        generator: torch.Generator | None = None,
    ) -> DualEncoderOutput:
        """Both embeddings of matched ``[B, ...]`` videos and texts, with the masking asked for."""
        return DualEncoderOutput(
            video_embeds=self.encode_video(video, video_mask_ratio, video_mask_kind, generator),
            text_embeds=self.encode_text(
                input_ids, attention_mask, special_tokens_mask, text_mask_ratio, text_mask_mode, generator
            ),
            log_logit_scale=self.log_logit_scale,
        )


# Saved folders then load with the Auto classes too (AutoModel, and AutoTokenizer, which reads config.json).
AutoConfig.register(DualEncoderConfig.model_type, DualEncoderConfig)
AutoModel.register(DualEncoderConfig, DualEncoderModel)


# --------------------------------------------------------------------------------------------------
# Building from a recipe's `model` section, and tokenising captions
# --------------------------------------------------------------------------------------------------


@dataclass
class TextEncoderSpec:
    """Where the text encoder comes from: ``path`` (a local HF encoder folder, e.g. all-MiniLM-L6-v2, with
    its tokenizer) or ``tiny`` (HF config kwargs including ``model_type``, e.g. ``bert``; the vocabulary size
    comes from the tokenizer). ``tokenizer`` overrides the tokenizer folder; tiny encoders default to the
    built-in world tokenizer, to which ``[CLS]``/``[SEP]``/``[MASK]`` are added."""

    path: str | None = None
    tiny: dict[str, Any] | None = None
    tokenizer: str | None = None
    pooling: TextPooling = "cls"

    def validate(self) -> None:
        if self.path is not None and self.tiny is not None:
            raise ConfigError("path: set either path or tiny, not both")
        if self.tiny is not None and "model_type" not in self.tiny:
            raise ConfigError("tiny.model_type: required (e.g. bert)")
        if self.tiny is not None:
            check_config_keys(self.tiny, "tiny")


@dataclass
class DualEncoderSpec:
    """A stage's ``model`` section for a dual encoder built from scratch (``init_from`` loads one instead)."""

    vision: SpaceTimeViTConfig = field(default_factory=SpaceTimeViTConfig)
    text: TextEncoderSpec = field(default_factory=TextEncoderSpec)
    # A CLIP vision tower (a folder, a hub id, or an earlier stage) whose weights start the video encoder;
    # its sizes then replace vision's (setting one of them to another value is an error), vision.num_frames
    # is kept.
    vision_init: str | None = None
    projection_dim: int = 64
    logit_scale_init: float = 20.0  # 1 / temperature; MAC / Frozen-in-Time: temperature 0.05
    learn_logit_scale: bool = False  # Frozen-in-Time keeps the temperature fixed; CLIP learns it
    max_logit_scale: float = 100.0


def load_text_tokenizer(spec: TextEncoderSpec) -> PreTrainedTokenizerBase:
    """The spec's tokenizer with ``[CLS]``, ``[SEP]``, ``[MASK]`` and ``[PAD]`` added where missing."""
    if spec.tokenizer is not None or spec.path is not None:
        tokenizer = AutoTokenizer.from_pretrained(
            resolve_model_folder(spec.tokenizer or spec.path, "tokenizer")
        )
    else:
        from mmfactory.data.world_source import world_tokenizer

        tokenizer = world_tokenizer()
    missing = {
        name: token for name, token in ENCODER_SPECIAL_TOKENS.items() if getattr(tokenizer, name) is None
    }
    if missing:
        tokenizer.add_special_tokens(missing)
    return tokenizer


def image_tower_start(spec: DualEncoderSpec, folder: str | Path) -> tuple[SpaceTimeViTConfig, dict]:
    """``(vision config, SpaceTimeViT weights)`` from the CLIP vision tower in ``folder`` (a full CLIP or a
    vision-only one, as LLaVA's towers load); refuses ``spec.vision`` sizes that contradict the tower."""
    tower = load_vision_tower(VisionTowerConfig(path=str(folder)))
    if not has_cls_token(tower.config):
        raise ConfigError(
            f"model.vision_init: {folder} is a {tower.config.model_type} tower without a class token; "
            "the video encoder starts from CLIP vision towers"
        )
    processor = load_image_processor(folder, tower.config.image_size)
    vision = clip_vision_config(
        tower.config, spec.vision.num_frames, processor.image_mean, processor.image_std
    )
    default = SpaceTimeViTConfig()
    for f in ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_ratio"):
        asked, got = getattr(spec.vision, f), getattr(vision, f)
        if asked not in (got, getattr(default, f)):
            raise ConfigError(f"model.vision.{f}: {asked}, but the vision_init tower {folder} has {got}")
    return vision, clip_vision_weights(tower.state_dict(), spec.vision.num_frames)


def load_dual_encoder(
    spec: DualEncoderSpec, init_dir: Path | None = None, vision_init: Path | None = None
) -> tuple[DualEncoderModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` from ``init_dir`` (a ``save_pretrained`` folder) or built from ``spec``.

    ``vision_init`` (``spec.vision_init`` resolved to a folder) starts the video encoder from a CLIP image
    tower; a ``text.path`` encoder keeps its pretrained weights; everything else starts from the config's
    init.
    """
    if init_dir is not None:
        return DualEncoderModel.from_pretrained(init_dir), AutoTokenizer.from_pretrained(init_dir)
    text = spec.text
    tokenizer = load_text_tokenizer(text)
    text_folder = resolve_model_folder(text.path, "text encoder") if text.path is not None else None
    if text_folder is not None:
        text_config = AutoConfig.from_pretrained(text_folder)
    elif text.tiny is not None:
        kwargs = dict(text.tiny)
        text_config = AutoConfig.for_model(
            kwargs.pop("model_type"), vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **kwargs
        )
    else:
        raise ConfigError("model.text: set text.path, text.tiny or the stage's init_from")
    vision, vision_weights = spec.vision, None
    if vision_init is not None:
        vision, vision_weights = image_tower_start(spec, vision_init)
    config = DualEncoderConfig(
        vision_config=dataclasses.asdict(vision),
        text_config=text_config,
        projection_dim=spec.projection_dim,
        text_pooling=text.pooling,
        logit_scale_init=spec.logit_scale_init,
        learn_logit_scale=spec.learn_logit_scale,
        max_logit_scale=spec.max_logit_scale,
        mask_token_id=tokenizer.mask_token_id,
    )
    model = DualEncoderModel(config)
    if vision_weights is not None:
        model.vision_model.load_state_dict(vision_weights)
    if text_folder is not None:
        pretrained = AutoModel.from_pretrained(text_folder).state_dict()
        model.text_model.load_state_dict({k: v for k, v in pretrained.items() if not k.startswith("pooler.")})
    if model.text_model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.text_model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def tokenize_captions(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> dict[str, Tensor]:
    """``[CLS] text [SEP]`` per text, truncated to ``max_length`` tokens and right-padded with ``[PAD]``.

    Returns ``input_ids``, ``attention_mask`` and ``special_tokens_mask`` (1 on ``[CLS]``/``[SEP]``), all
    ``[B, L]`` int64 — what a BERT tokenizer's ``__call__`` gives, for any tokenizer with those tokens.
    """
    body = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length - 2)["input_ids"]
    rows = [[tokenizer.cls_token_id, *ids, tokenizer.sep_token_id] for ids in body]
    input_ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    special_tokens_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        special_tokens_mask[i, [0, len(row) - 1]] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "special_tokens_mask": special_tokens_mask,
    }
