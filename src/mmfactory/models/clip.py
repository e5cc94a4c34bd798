"""Hugging Face ``CLIPModel`` loading and CLIP's text and pixel preparation.

A model is tiny from ``CLIPConfig`` keyword arguments (text tokenizer: the built-in world's unless
``tokenizer`` names one, with vocabulary size and special-token ids taken from it) or loaded from a local
CLIP folder. HF CLIP pools the text at its first EOS token, so :func:`tokenize_for_clip` ends every text in
EOS and :func:`check_eos_pooling` refuses a text config that would pool elsewhere. Used by the
``image_text_contrastive`` task, the reward and matching scorers and CLIP-score filtering.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    PreTrainedTokenizerBase,
)
from transformers.image_processing_utils import BaseImageProcessor

from mmfactory.config import ConfigError
from mmfactory.data.multimodal import pad_to_square
from mmfactory.models.hub import resolve_model_folder
from mmfactory.models.vision import load_image_processor

# HF CLIP pools the text at argmax(input_ids) when eos_token_id is 2 (configs older than transformers#24773).
LEGACY_EOS_ID = 2
FROM_TOKENIZER = ("vocab_size", "eos_token_id", "pad_token_id", "bos_token_id")


def _check_keys(config_class: type, kwargs: dict[str, Any], where: str) -> None:
    known = [f.name for f in dataclasses.fields(config_class)]
    for key in kwargs:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}.{key}: not a {config_class.__name__} field{hint}")


@dataclass
class CLIPSpec:
    """A stage's ``model`` section: ``path`` (a local CLIP folder with its tokenizer and, ideally, its
    ``preprocessor_config.json``) or ``tiny`` (``CLIPConfig`` keyword arguments with ``text_config`` and
    ``vision_config`` dicts; vocabulary size and special-token ids come from the tokenizer) — or neither
    when the stage has ``init_from``. ``tokenizer`` overrides the tokenizer folder; tiny models default to
    the built-in world tokenizer."""

    path: str | None = None
    tiny: dict[str, Any] | None = None
    tokenizer: str | None = None
    max_logit_scale: float = 100.0  # CLIP clamps the learned inverse temperature at 100

    def validate(self) -> None:
        if self.path is not None and self.tiny is not None:
            raise ConfigError("path: set either path or tiny, not both")
        if self.tiny is None:
            return
        _check_keys(CLIPConfig, self.tiny, "tiny")
        for name, config_class in (("text_config", CLIPTextConfig), ("vision_config", CLIPVisionConfig)):
            sub = self.tiny.get(name) or {}
            if not isinstance(sub, dict):
                raise ConfigError(f"tiny.{name}: expected a mapping, got {sub!r}")
            _check_keys(config_class, sub, f"tiny.{name}")
        taken = [key for key in FROM_TOKENIZER if key in (self.tiny.get("text_config") or {})]
        if taken:
            raise ConfigError(f"tiny.text_config.{taken[0]}: set from the tokenizer; remove it")


def check_eos_pooling(text_config: CLIPTextConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a text config whose pooling would not land on the EOS that :func:`tokenize_for_clip` appends.

    HF CLIP pools at the first ``eos_token_id`` in the ids, or at ``argmax(input_ids)`` when that id is the
    legacy 2 (right only if EOS is the largest id, as in OpenAI's vocabulary).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the text tokenizer has no eos_token: CLIP pools the text at its EOS")
    if text_config.eos_token_id == LEGACY_EOS_ID:
        pools_at_eos = eos == len(tokenizer) - 1
    else:
        pools_at_eos = text_config.eos_token_id == eos
    if not pools_at_eos:
        raise ValueError(
            f"text_config.eos_token_id {text_config.eos_token_id} with the tokenizer's EOS {eos} (vocabulary "
            f"{len(tokenizer)}): the text would not be pooled at its EOS"
        )


def load_clip(
    spec: CLIPSpec, init_dir: Path | None = None
) -> tuple[CLIPModel, PreTrainedTokenizerBase, BaseImageProcessor]:
    """``(model, tokenizer, image_processor)`` from ``init_dir`` (a saved stage), ``spec.path`` or
    ``spec.tiny``. The image processor is the folder's own, else CLIP's at the tower's image size."""
    folder = init_dir if init_dir is not None else spec.path
    if folder is None and spec.tiny is None:
        raise ConfigError("model: set model.path, model.tiny or the stage's init_from")
    if folder is not None:
        folder = resolve_model_folder(folder, "CLIP folder")
    if spec.tokenizer is not None or folder is not None:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_folder(spec.tokenizer or folder, "tokenizer"))
    else:
        from mmfactory.data.world_source import world_tokenizer

        tokenizer = world_tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # pooling takes the *first* EOS, so padding with it is safe
    if folder is not None:
        model_type = AutoConfig.from_pretrained(folder).model_type
        if model_type != "clip":
            raise ValueError(f"{folder}: a {model_type!r} checkpoint; this task trains CLIP models ('clip')")
        model = CLIPModel.from_pretrained(folder)
    else:
        kwargs = dict(spec.tiny)
        text_config = {
            **(kwargs.pop("text_config", None) or {}),
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        }
        vision_config = kwargs.pop("vision_config", None) or {}
        model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, **kwargs))
    check_eos_pooling(model.config.text_config, tokenizer)
    image_processor = load_image_processor(folder, model.config.vision_config.image_size)
    return model, tokenizer, image_processor


def clip_pixel_values(
    image_processor: BaseImageProcessor, images: Sequence[np.ndarray], pad_square: bool = False
) -> Tensor:
    """uint8 ``[H, W, 3]`` images -> ``[N, 3, S, S]`` float32 through the image processor, padded first to
    squares of its mean colour with ``pad_square`` (LLaVA-1.5's "pad")."""
    if pad_square:
        fill = [round(255 * m) for m in image_processor.image_mean]
        images = [pad_to_square(image, fill) for image in images]
    return image_processor(images=list(images), return_tensors="pt")["pixel_values"]


def tokenize_for_clip(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> dict[str, Tensor]:
    """Each text as the tokenizer encodes it (with its special tokens) ending in EOS — appended when the
    tokenizer does not add it — truncated to ``max_length`` with the EOS kept, right-padded.

    Returns ``input_ids`` and ``attention_mask``, ``[B, L]`` int64.
    """
    eos = tokenizer.eos_token_id
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    rows = [ids if ids and ids[-1] == eos else [*ids[: max_length - 1], eos] for ids in encoded]
    input_ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
