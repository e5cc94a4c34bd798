"""Vision towers (CLIP / SigLIP vision transformers) and their image processors.

Tiny from a config (tests, the built-in world) or real from a local folder, which may hold a vision-only
checkpoint or a full CLIP / SigLIP one (its text half is left unused, as LLaVA loads
``openai/clip-vit-large-patch14-336``). Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    PreTrainedConfig,
    PreTrainedModel,
    SiglipVisionModel,
)
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils import logging as hf_logging

from mmfactory.config import ConfigError
from mmfactory.models.hub import resolve_model_folder

# checkpoint model_type -> the vision-only class that loads it (a full CLIP folder loads its vision half)
VISION_TOWERS: dict[str, type[PreTrainedModel]] = {
    "clip": CLIPVisionModel,
    "clip_vision_model": CLIPVisionModel,
    "siglip": SiglipVisionModel,
    "siglip_vision_model": SiglipVisionModel,
}
TINY_TOWER_TYPES = ("clip_vision_model", "siglip_vision_model")
PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclass
class VisionTowerConfig:
    """Where a vision tower comes from: ``path`` (a local folder or a hub id) or ``tiny`` (keyword arguments
    of a ``clip_vision_model`` / ``siglip_vision_model`` config, including ``model_type``)."""

    path: str | None = None
    tiny: dict[str, Any] | None = None

    def validate(self) -> None:
        if self.path is not None and self.tiny is not None:
            raise ConfigError("path: set either path or tiny, not both")
        if self.tiny is not None and self.tiny.get("model_type") not in TINY_TOWER_TYPES:
            raise ConfigError(f"tiny.model_type: expected one of {list(TINY_TOWER_TYPES)}")


def has_cls_token(vision_config: PreTrainedConfig) -> bool:
    """CLIP's ViT prepends a CLS token to its patch tokens; SigLIP's does not."""
    return vision_config.model_type.startswith("clip")


def num_patches(vision_config: PreTrainedConfig) -> int:
    return (vision_config.image_size // vision_config.patch_size) ** 2


def load_vision_tower(cfg: VisionTowerConfig, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A ``CLIPVisionModel`` / ``SiglipVisionModel``, random from ``cfg.tiny`` or loaded from ``cfg.path``."""
    if cfg.tiny is not None:
        kwargs = dict(cfg.tiny)
        config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        return AutoModel.from_config(config, dtype=dtype)
    if cfg.path is None:
        raise ConfigError("vision: set vision.path or vision.tiny (or the stage's init_from)")
    path = resolve_model_folder(cfg.path, "vision tower")
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in VISION_TOWERS:
        raise ValueError(
            f"{path}: vision towers of type {model_type!r} are not supported ({sorted(VISION_TOWERS)})"
        )
    if model_type.endswith("_vision_model"):
        return VISION_TOWERS[model_type].from_pretrained(path, dtype=dtype)
    # A full CLIP / SigLIP checkpoint: its text half is left out on purpose, so transformers' load report
    # (every text weight listed as unexpected) says nothing worth printing.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return VISION_TOWERS[model_type].from_pretrained(path, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)


def load_image_processor(folder: str | Path | None, image_size: int) -> BaseImageProcessor:
    """The image processor saved in ``folder`` (PIL backend), or CLIP's at ``image_size``: resize the short
    side, centre-crop, normalise with the OpenAI CLIP mean/std."""
    if folder is not None and (Path(folder) / PREPROCESSOR_FILE).is_file():
        return AutoImageProcessor.from_pretrained(folder, backend="pil")
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
