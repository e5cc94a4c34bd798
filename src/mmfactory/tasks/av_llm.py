"""Audio-Visual LLM (METHODS.md section 6): instruction tuning of an LM on a mixture of visual-only,
audio-only and audio-visual conversations, the modality tokens telling it which streams a sample carries.

One task serves every stage; the stage's ``trainable`` patterns and data make the difference:

* alignment per modality on video and audio captions: the projectors train (``["model.projector.*",
  "model.audio_projector.*"]`` with pretrained encoders and LM; ``av_llm/tiny`` also trains the audio tower,
  which has no pretrained checkpoint in the built-in world, and the LM, which starts from scratch);
* joint instruction tuning on the mixture (``data.train`` sources with ``weight`` s, the data layer's
  mixture), projectors and LM: ``["model.projector.*", "model.audio_projector.*", "model.language_model.*"]``.

The loss is the multimodal SFT one (:func:`~mmfactory.tasks.mllm.reply_loss`: next-token cross-entropy
on assistant replies, per token or per sample). ``evaluate()`` runs the held-out world benchmarks of
:func:`~mmfactory.data.world_source.world_av_benchmarks` with the streams the model was trained on
(``options.streams``): video QA, audio QA, audio-visual QA, a zero-shot question kind, audio and video
captioning.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoTokenizer, WhisperFeatureExtractor

from mmfactory.config import ConfigError, StageConfig
from mmfactory.data.av import AUDIO_PREPROCESSOR_FILE, AVChatDataset, AVProcessor
from mmfactory.data.chat import TemplateName
from mmfactory.data.multimodal import MultimodalProcessor
from mmfactory.data.source_config import SourceConfig, check_sources
from mmfactory.data.streaming import SampleStream
from mmfactory.data.world_source import world_av_benchmarks
from mmfactory.eval.av import evaluate_av
from mmfactory.examples import Example, write_examples
from mmfactory.models.av_llm import AudioVisualLM, AudioVisualLMSpec, build_audio_visual_lm
from mmfactory.models.generation import GenerationConfig
from mmfactory.models.lm import DTYPES
from mmfactory.models.vision import load_image_processor
from mmfactory.tasks.base import StageContext, TrainingTask
from mmfactory.tasks.mllm import (
    LossReduction,
    lm_attention,
    reply_loss,
    reply_loss_weight,
    resolve_parts,
    response_logits,
    vision_lr_scale,
)


def _default_train() -> list[SourceConfig]:
    return [
        SourceConfig("world", kind=kind, size=2000)
        for kind in ("video_qa", "audio_qa", "av_qa", "av_conversations", "av_narratives")
    ]


@dataclass
class AVDataConfig:
    """Conversations about videos, audio clips or both from ``av-chat`` sources (:mod:`mmfactory.data.av`):
    the world's kinds (``video_captions``, ``video_qa``, ``audio_captions``, ``audio_qa``, ``av_qa``,
    ``av_conversations``, ``av_narratives``) or files (docs/formats.md). ``modality_tokens``: the span
    delimiters and modality markers of Audio-Visual LLM (False: placeholders only, the ablation); it is
    saved with the model and used when it is asked questions."""

    train: list[SourceConfig] = field(default_factory=_default_train)
    eval: list[SourceConfig] = field(default_factory=list)
    max_bad_fraction: float | None = None
    max_length: int = 192  # tokens, placeholders and modality tokens included
    template: TemplateName = "chatml"
    pad_square: bool = True
    pad_to_multiple_of: int | None = None
    modality_tokens: bool = True

    def validate(self) -> None:
        check_sources(self.train, self.max_bad_fraction)


# items asked per benchmark; av_qa and av_which scan this many clips and ask those their question fits
# (about 53 % and 33 % of them: several objects, one stream alone at chance)
BENCHMARK_SIZES = {
    "video_qa": 200,
    "audio_qa": 200,
    "av_qa": 400,
    "av_which": 400,
    "audio_captions": 100,
    "video_captions": 100,
}


@dataclass
class AVEvalOptions:
    """The ``eval:`` group: the world's held-out benchmarks (``benchmarks``: name -> size, see
    :func:`~mmfactory.data.world_source.world_av_benchmarks`; ``{}`` turns them off), answered greedily."""

    benchmarks: dict[str, int] = field(default_factory=lambda: dict(BENCHMARK_SIZES))
    seed: int = 0
    frame_size: int = 32  # pixels of the world's video frames
    # a model that knows both streams is also asked the audio-visual questions with each stream alone
    single_stream_probes: bool = True
    max_new_tokens: int = 16
    caption_max_new_tokens: int = 40
    batch_size: int = 32

    def validate(self) -> None:
        unknown = set(self.benchmarks) - set(BENCHMARK_SIZES)
        if unknown:
            raise ConfigError(
                f"benchmarks: unknown {sorted(unknown)}; expected names of {sorted(BENCHMARK_SIZES)}"
            )
        if any(n < 0 for n in self.benchmarks.values()):
            raise ConfigError(f"benchmarks: sizes must be >= 0, got {self.benchmarks}")
        for name in ("max_new_tokens", "caption_max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")


@dataclass
class AVOptions:
    """The loss reduction, the vision tower's lr scale, the streams the model knows (benchmarks are asked
    with those alone: a video-only model answers audio-visual questions from the video) and ``eval:``."""

    loss_reduction: LossReduction = "sample"
    vision_lr_scale: float = 1.0
    streams: list[Literal["video", "audio"]] = field(default_factory=lambda: ["video", "audio"])
    eval: AVEvalOptions = field(default_factory=AVEvalOptions)

    def validate(self) -> None:
        if not self.streams:
            raise ConfigError("streams: name video, audio or both")


class AudioVisualSFTTask(TrainingTask):
    """Builds an :class:`AudioVisualLM`, reads ``av-chat`` samples; the loss, its weight and the vision
    lr scale are the multimodal SFT ones (:func:`~mmfactory.tasks.mllm.reply_loss`)."""

    model_config = AudioVisualLMSpec
    data_config = AVDataConfig
    options_config = AVOptions
    sample_kind = "av-chat"

    def __init__(
        self,
        stage: StageConfig,
        ctx: StageContext,
        model_cfg: AudioVisualLMSpec,
        data_cfg: AVDataConfig,
        options: AVOptions,
    ):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        self.loss_unit = "samples" if options.loss_reduction == "sample" else "tokens"
        init_dir = ctx.resolve_init(stage.init_from)
        if init_dir is not None:
            if model_cfg.has_parts:
                raise ConfigError(
                    "model: init_from provides the whole model; remove model.vision / model.audio / model.lm"
                )
            dtype = DTYPES[model_cfg.lm.dtype]
            self.model = AudioVisualLM.from_pretrained(init_dir, dtype=dtype, **lm_attention(model_cfg))
            tokenizer = AutoTokenizer.from_pretrained(init_dir)
            image_processor = load_image_processor(init_dir, self.model.config.vision_config.image_size)
            extractor = WhisperFeatureExtractor.from_json_file(str(init_dir / AUDIO_PREPROCESSOR_FILE))
        else:
            self.model, tokenizer, image_processor, extractor = build_audio_visual_lm(
                resolve_parts(model_cfg, ctx)
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        cfg = self.model.config
        base = MultimodalProcessor(
            tokenizer,
            image_processor,
            cfg.num_image_tokens,
            data_cfg.template,
            cfg.image_token,
            data_cfg.pad_square,
        )
        self.processor = AVProcessor(
            base,
            extractor,
            cfg.video_frames,
            cfg.num_video_tokens,
            cfg.audio_tokens,
            data_cfg.modality_tokens,
        )
        self.counts: Counter[str] = Counter()
        self._datasets: dict[str, AVChatDataset | None] = {}

    # -- data ----------------------------------------------------------------------------------------
    def _dataset(self, split: str) -> AVChatDataset | None:
        if split not in self._datasets:
            source = self.read_sources(split, self.counts)
            if isinstance(source, SampleStream):
                raise ConfigError("data: av-chat sources are not streamed; drop streaming")
            self._datasets[split] = (
                None
                if source is None
                else AVChatDataset(source, self.processor, self.data_cfg.max_length, self.counts, split)
            )
        return self._datasets[split]

    def train_dataset(self) -> AVChatDataset:
        return self._dataset("train")

    def eval_dataset(self) -> AVChatDataset | None:
        return self._dataset("eval") or None

    def collate(self, samples: list) -> dict[str, torch.Tensor]:
        return self.processor.collate(samples, self.data_cfg.pad_to_multiple_of)

    def data_report(self) -> dict[str, int]:
        return dict(self.counts)

    # -- math ----------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = response_logits(self.model, batch)
        return {"loss": reply_loss(logits, batch["labels"], self.options.loss_reduction)}

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        return reply_loss_weight(batch["labels"], self.options.loss_reduction)

    def lr_scale(self, name: str) -> float:
        return vision_lr_scale(name, self.options.vision_lr_scale)

    # -- evaluation and output -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        o, streams = self.options.eval, self.options.streams
        cfg = GenerationConfig(max_new_tokens=o.max_new_tokens, batch_size=o.batch_size)
        benchmarks = world_av_benchmarks(
            o.benchmarks,
            streams,
            o.seed,
            frame_size=o.frame_size,
            single_stream_probes=o.single_stream_probes,
        )
        examples: dict[str, list[Example]] = {}
        metrics = evaluate_av(self.model, self.processor, benchmarks, cfg, o.caption_max_new_tokens, examples)
        for group, shown in examples.items():  # evaluate() runs on the main process only
            write_examples(self.ctx.stage_dir, group, shown)
        return metrics

    def save_pretrained(self, out_dir: Path) -> None:
        self.model.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)
