"""Audio towers and their log-mel front end.

The tower is a Whisper encoder: tiny from a config (the built-in world) or the encoder half of a real
Whisper checkpoint in a local folder (``WhisperModel`` / ``WhisperForConditionalGeneration``, e.g.
``openai/whisper-tiny`` saved with ``save_pretrained``). Its input is Whisper's log-mel spectrogram,
computed by transformers' ``WhisperFeatureExtractor``::

    waveform float32 [S] (any rate: resampled to 16 kHz; stereo: mean of channels)
        --WhisperFeatureExtractor--> input_features [M, L]   (M mel bins, L = 2 x max_source_positions frames;
                                                              shorter clips are zero-padded, longer ones cut)
        --encoder--> last_hidden_state [L / 2, Da]

A tiny tower's clip length follows from its ``max_source_positions``: 50 positions are 100 mel frames of
10 ms, 1 s of audio (Whisper's own: 1500 positions, 30 s). Other encoders plug in by returning
``last_hidden_state [A, L', Da]`` from ``input_features``; see docs/av_llm.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    AutoConfig,
    PreTrainedConfig,
    PreTrainedModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from mmfactory.config import ConfigError
from mmfactory.models.hub import resolve_model_folder

HOP_SECONDS = 0.01  # Whisper's mel hop: 160 samples at 16 kHz


@dataclass
class AudioTowerConfig:
    """Where an audio tower comes from: ``path`` (a folder or hub id of a Whisper checkpoint, whose encoder
    is kept) or ``tiny`` (keyword arguments of a ``WhisperConfig``: ``d_model``, ``encoder_layers``,
    ``encoder_attention_heads``, ``encoder_ffn_dim``, ``num_mel_bins``, ``max_source_positions``)."""

    path: str | None = None
    tiny: dict[str, Any] | None = None

    def validate(self) -> None:
        if self.path is not None and self.tiny is not None:
            raise ConfigError("path: set either path or tiny, not both")


def tiny_whisper_config(**kwargs) -> WhisperConfig:
    """A Whisper config whose unused decoder is as small as possible (only the encoder is built)."""
    decoder = {"decoder_layers": 1, "decoder_attention_heads": 1, "decoder_ffn_dim": 4, "vocab_size": 8}
    special = {k: 0 for k in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")}
    return WhisperConfig(**{**decoder, **special, **kwargs})


def build_audio_tower(config: PreTrainedConfig) -> PreTrainedModel:
    """A randomly initialised tower from its config (``from_pretrained`` of the whole model fills it)."""
    if config.model_type != "whisper":
        raise ValueError(f"audio towers of type {config.model_type!r} are not supported (whisper)")
    return WhisperEncoder(config)


def load_audio_tower(
    cfg: AudioTowerConfig, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, WhisperFeatureExtractor]:
    """``(encoder, feature_extractor)``: random from ``cfg.tiny``, or a Whisper checkpoint's encoder and
    feature extractor from ``cfg.path``."""
    if cfg.tiny is not None:
        config = tiny_whisper_config(**cfg.tiny)
        return build_audio_tower(config).to(dtype), log_mel_extractor(config)
    if cfg.path is None:
        raise ConfigError("audio: set audio.path or audio.tiny (or the stage's init_from)")
    path = resolve_model_folder(cfg.path, "audio tower")
    config = AutoConfig.from_pretrained(path)
    if config.model_type != "whisper":
        raise ValueError(f"{path}: audio towers of type {config.model_type!r} are not supported (whisper)")
    # WhisperModel (encoder.*) or WhisperForConditionalGeneration (model.encoder.*): WhisperModel reads
    # both layouts; its encoder half is kept
    encoder = WhisperModel.from_pretrained(path, dtype=dtype).get_encoder()
    has_extractor = (path / "preprocessor_config.json").is_file()
    extractor = WhisperFeatureExtractor.from_pretrained(path) if has_extractor else log_mel_extractor(config)
    return encoder, extractor


def log_mel_extractor(config: PreTrainedConfig) -> WhisperFeatureExtractor:
    """Whisper's log-mel front end sized for ``config``: ``num_mel_bins`` bins, clips of
    ``2 x max_source_positions`` 10 ms frames."""
    seconds = 2 * config.max_source_positions * HOP_SECONDS
    if not float(seconds).is_integer():
        raise ConfigError(
            f"audio: max_source_positions {config.max_source_positions} gives {seconds:g} s clips; "
            "WhisperFeatureExtractor needs whole seconds (use a multiple of 50)"
        )
    return WhisperFeatureExtractor(feature_size=config.num_mel_bins, chunk_length=int(seconds))
