"""Audio-Visual LLM (arXiv 2312.06720): video frames and audio clips into one causal LM.

A :class:`~mmfactory.models.mllm.MultimodalLM` (vision tower, projector, LM; images keep working) plus an
audio tower and its projector::

    video_values [F, 3, S, S] (frames of Nv videos, T each, F = Nv * T)
        --vision tower, projector (shared with images)--> [Nv, T, P, D]
        --video_pool: none--> [Nv, T * P, D]      (every frame's tokens, in time order)
                      time_mean--> [Nv, P, D]     (the mean over frames)
    audio_features [A, M, L] (log-mel, :mod:`mmfactory.models.audio`)
        --audio tower--> [A, L', Da] --mean-pool in time--> [A, Na, Da] --audio projector--> [A, Na, D]
                                                            (Na = audio_tokens)

Each item fills its placeholder tokens (``<video>`` / ``<audio>``, expanded by the data layer) in reading
order, with :func:`~mmfactory.models.mllm.merge_modal_embeddings`. Only the encoders a batch needs run, on
the items that need them: a batch mixing visual-only, audio-only and audio-visual samples passes its
videos' frames through the vision tower in one call (a second one for images, when it has some) and its
audio clips through the audio tower in one call; the modality tokens that tell the LM which streams a
sample carries are text (:mod:`mmfactory.data.av`). In training, the trainable parts of an encoder a batch
does not need get a zero gradient (so DDP finds every parameter used).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec

from mmfactory.config import ConfigError
from mmfactory.data.av import AUDIO_TOKEN, MODALITY_TOKENS, VIDEO_TOKEN
from mmfactory.models.audio import AudioTowerConfig, build_audio_tower, load_audio_tower
from mmfactory.models.components.projector import build_projector, projector_depth
from mmfactory.models.mllm import (
    MultimodalLM,
    MultimodalLMConfig,
    MultimodalLMSpec,
    add_placeholder_token,
    load_multimodal_parts,
    merge_modal_embeddings,
)
from mmfactory.models.vision import load_image_processor

VideoPool = Literal["none", "time_mean"]


@strict
class AudioVisualLMConfig(MultimodalLMConfig):
    """:class:`~mmfactory.models.mllm.MultimodalLMConfig` plus the audio side and how videos are read.

    Args:
        audio_config: the audio tower's config (``whisper``).
        audio_projector_type: ``linear`` or ``mlp{N}x_gelu``.
        audio_tokens: feature vectors per audio clip (the tower's output mean-pooled in time to this many).
        video_frames: frames per video (``T``; the data layer samples them uniformly).
        video_pool: ``none`` keeps every frame's tokens (``T x P``), ``time_mean`` averages over frames.
        video_token, audio_token: the placeholder texts; ``*_token_id`` their token ids.
    """

    model_type = "mmfactory_av_llm"
    sub_configs_defaults = {
        **MultimodalLMConfig.sub_configs_defaults,
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper"),
    }

    audio_config: dict | PreTrainedConfig | None = None
    audio_projector_type: str = "mlp2x_gelu"
    audio_tokens: int = 8
    video_frames: int = 4
    video_pool: VideoPool = "none"
    video_token: str = VIDEO_TOKEN
    video_token_id: int | None = None
    audio_token: str = AUDIO_TOKEN
    audio_token_id: int | None = None

    @property
    def num_video_tokens(self) -> int:
        """Placeholder tokens per video."""
        per_frame = self.num_image_tokens
        return per_frame if self.video_pool == "time_mean" else self.video_frames * per_frame


class AudioVisualLM(MultimodalLM):
    """Vision tower + projector, audio tower + audio projector, causal LM (see the module docstring).
    Submodules add ``audio_tower`` and ``audio_projector`` to :class:`MultimodalLM`'s."""

    config_class = AudioVisualLMConfig
    config: AudioVisualLMConfig
    input_modalities = ("image", "video", "audio", "text")
    media_inputs = ("video_values", "audio_features")

    def __init__(
        self,
        config: AudioVisualLMConfig,
        vision_tower: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
        audio_tower: PreTrainedModel | None = None,
    ):
        super().__init__(config, vision_tower, language_model)
        self.audio_tower = audio_tower if audio_tower is not None else build_audio_tower(config.audio_config)
        config.audio_config = self.audio_tower.config
        self.audio_projector = build_projector(
            config.audio_projector_type, config.audio_config.d_model, config.text_config.hidden_size
        )
        self.audio_projector.apply(self._init_weights)

    def encode_videos(self, video_values: Tensor) -> Tensor:
        """``[Nv * T, 3, S, S]`` frames (video by video) -> ``[Nv, num_video_tokens, D]``."""
        frames = self.encode_images(video_values)  # [Nv * T, P, D]
        t = self.config.video_frames
        if len(frames) % t:
            raise ValueError(f"{len(frames)} video frames are not whole videos of {t} frames")
        videos = frames.unflatten(0, (-1, t))  # [Nv, T, P, D]
        return videos.mean(dim=1) if self.config.video_pool == "time_mean" else videos.flatten(1, 2)

    def encode_audio(self, audio_features: Tensor) -> Tensor:
        """``[A, M, L]`` log-mel -> ``[A, audio_tokens, D]``."""
        hidden = self.audio_tower(audio_features.to(self.audio_tower.dtype)).last_hidden_state  # [A, L', Da]
        pooled = F.adaptive_avg_pool1d(hidden.transpose(1, 2), self.config.audio_tokens).transpose(1, 2)
        return self.audio_projector(pooled)

    def embed_inputs(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        video_values: Tensor | None = None,
        audio_features: Tensor | None = None,
    ) -> Tensor:
        """``[B, T]`` ids + each modality's items (reading order; absent or empty: not encoded) ->
        ``[B, T, D]``."""
        cfg = self.config
        embeds = self.get_input_embeddings()(input_ids)
        encoders = (
            (cfg.image_token_id, cfg.image_token, pixel_values, self.encode_images),
            (cfg.video_token_id, cfg.video_token, video_values, self.encode_videos),
            (cfg.audio_token_id, cfg.audio_token, audio_features, self.encode_audio),
        )
        features, names = {}, {}
        for token_id, name, values, encode in encoders:
            names[token_id] = name
            features[token_id] = encode(values) if values is not None and len(values) else []
        embeds = merge_modal_embeddings(embeds, input_ids, features, names)
        if self.training:  # a skipped encoder's trainable parts still get a (zero) gradient: DDP needs one
            skipped = [
                module
                for used, module in (
                    (len(features[cfg.image_token_id]) or len(features[cfg.video_token_id]), self.projector),
                    (len(features[cfg.audio_token_id]), self.audio_tower),
                    (len(features[cfg.audio_token_id]), self.audio_projector),
                )
                if not used
            ]
            touched = [p.sum() for m in skipped for p in m.parameters() if p.requires_grad]
            if touched:
                embeds = embeds + 0.0 * torch.stack(touched).sum().to(embeds.dtype)
        return embeds


AutoConfig.register(AudioVisualLMConfig.model_type, AudioVisualLMConfig)
AutoModel.register(AudioVisualLMConfig, AudioVisualLM)


@dataclass
class AudioVisualLMSpec(MultimodalLMSpec):
    """:class:`~mmfactory.models.mllm.MultimodalLMSpec` plus ``audio`` (where the audio tower comes from)
    and the video / audio token settings of :class:`AudioVisualLMConfig`."""

    audio: AudioTowerConfig = field(default_factory=AudioTowerConfig)
    audio_projector_type: str = "mlp2x_gelu"
    audio_tokens: int = 8
    video_frames: int = 4
    video_pool: VideoPool = "none"

    def validate(self) -> None:
        super().validate()
        try:
            projector_depth(self.audio_projector_type)
        except ValueError as err:
            raise ConfigError(f"audio_projector_type: {err}") from None
        if self.audio_tokens < 1 or self.video_frames < 1:
            raise ConfigError(
                f"audio_tokens and video_frames must be >= 1, got {self.audio_tokens}, {self.video_frames}"
            )
        if self.hyper is not None:
            raise ConfigError("hyper: HyperLLaVA's experts are not wired into the audio-visual model")

    @property
    def has_parts(self) -> bool:
        return super().has_parts or self.audio.path is not None or self.audio.tiny is not None


def build_audio_visual_lm(spec: AudioVisualLMSpec):
    """``(model, tokenizer, image_processor, feature_extractor)`` from a vision tower, an audio tower, fresh
    projectors and an LM; the image, video and audio placeholders are added to the tokenizer."""
    if spec.audio.path is None and spec.audio.tiny is None:
        raise ConfigError("model.audio: set audio.path or audio.tiny (or the stage's init_from)")
    tower, lm, tokenizer, config = load_multimodal_parts(
        spec,
        AudioVisualLMConfig,
        audio_projector_type=spec.audio_projector_type,
        audio_tokens=spec.audio_tokens,
        video_frames=spec.video_frames,
        video_pool=spec.video_pool,
    )
    audio_tower, extractor = load_audio_tower(spec.audio, tower.dtype)
    config.audio_config = audio_tower.config
    config.video_token_id = add_placeholder_token(tokenizer, lm, VIDEO_TOKEN)
    config.audio_token_id = add_placeholder_token(tokenizer, lm, AUDIO_TOKEN)
    for token in MODALITY_TOKENS:  # span delimiters and modality markers (text, learned as embeddings)
        add_placeholder_token(tokenizer, lm, token)
    model = AudioVisualLM(config, tower, lm, audio_tower).to(tower.dtype)
    return model, tokenizer, load_image_processor(spec.vision.path, tower.config.image_size), extractor
