"""LLaVA-style multimodal SFT: next-token loss on assistant replies of conversations with images.

One task serves both LLaVA stages; the stage's ``trainable`` patterns make the difference:

* projector alignment on captions: ``trainable: ["model.projector.*"]`` (tower and LM frozen), lr 1e-3;
* instruction tuning: ``["model.projector.*", "model.language_model.*"]``, or with ``options.lora`` the
  LM stays frozen under LoRA adapters: ``["model.projector.*", "*lora_*"]``; adapters are merged before
  saving, so ``final/`` is always a plain :class:`~mmfactory.models.mllm.MultimodalLM`.

The first stage assembles the model from parts (``model.vision``, ``model.lm``: tiny configs, local
checkpoints, or an earlier stage's output named by its stage, e.g. ``vision: {path: vision}`` after an
``image_text_contrastive`` stage called ``vision``); later stages start ``init_from`` the previous one.
Under DDP, data mixing in text-only conversations leaves the projector without gradients in some batches: set
``train.find_unused_parameters: true``.
``evaluate()`` runs the generation benchmarks of :mod:`mmfactory.eval.mllm` (held-out world test split,
or VQA / POPE JSONL files).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from mmfactory.config import ConfigError, StageConfig
from mmfactory.data.benchmarks import Benchmarks
from mmfactory.data.chat import IGNORE_INDEX, TemplateName
from mmfactory.data.multimodal import (
    MultimodalChatDataset,
    MultimodalProcessor,
    MultimodalSample,
    fit_conversation,
)
from mmfactory.data.sources import SourceConfig, check_fraction
from mmfactory.data.streaming import SampleStream, TrainStream
from mmfactory.data.world_source import world_benchmarks
from mmfactory.eval.mllm import evaluate_mllm
from mmfactory.examples import Example, write_examples
from mmfactory.losses.lm import sample_mean_loss
from mmfactory.models.generation import GenerationConfig
from mmfactory.models.hyperllava import prompt_mask
from mmfactory.models.lm import DTYPES
from mmfactory.models.lora import LoraOptions, add_lora, save_and_merge
from mmfactory.models.mllm import MultimodalLM, MultimodalLMSpec, add_hyper_experts, build_multimodal_lm
from mmfactory.models.vision import load_image_processor
from mmfactory.tasks.base import StageContext, TrainingTask


@dataclass
class MultimodalDataConfig:
    """Conversations with images from any ``image-chat`` sources (:mod:`mmfactory.data.sources`): the
    built-in world (``kind``: ``captions``, brief captions for LLaVA stage 1; ``vqa``: short answers;
    ``llava``: multi-turn conversations; ``pope``: yes/no object probes), LLaVA JSON, ShareGPT, messages."""

    train: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig("world", kind="llava", size=2000)]
    )
    eval: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig("world", kind="llava", split="val", size=200)]
    )
    max_bad_fraction: float | None = None  # stop when a source has more bad records than this share
    max_length: int = 256  # tokens, placeholders included
    template: TemplateName = "chatml"
    pad_square: bool = True  # LLaVA-1.5's image_aspect_ratio: pad
    pad_to_multiple_of: int | None = None

    def validate(self) -> None:
        if not self.train:
            raise ConfigError("train: at least one source is required")
        check_fraction(self.max_bad_fraction)


@dataclass
class WorldBenchmarkConfig:
    """The built-in world's held-out ``test`` split as end-of-stage benchmarks (VQA, POPE, captions)."""

    seed: int = 0
    image_size: int = 32
    # The caption references of each test image: its brief caption (LLaVA's caption prompt asks for one),
    # or brief and detailed (a captioner trained on a mix of both, as Filter & Align's pool has them).
    caption_details: list[Literal["brief", "detailed"]] = field(default_factory=lambda: ["brief"])

    def validate(self) -> None:
        if not self.caption_details:
            raise ConfigError("world_benchmarks.caption_details: name brief, detailed or both")


@dataclass
class MultimodalSFTOptions:
    """LoRA and the end-of-stage generation benchmarks (counts of 0 turn one off).

    Benchmarks come from the world's held-out ``test`` split (``world_benchmarks``; null turns it off)
    and from files: VQA and POPE JSONL (``eval_pope_files`` maps a split name to its file).
    """

    lora: LoraOptions | None = None
    # How labelled tokens are averaged: "token" (LLaVA, transformers: every response token of the batch
    # weighs the same, so long captions dominate one-word answers) or "sample" (each sample's mean token
    # loss, averaged over samples: a yes/no answer weighs as much as a caption).
    loss_reduction: Literal["token", "sample"] = "token"
    world_benchmarks: WorldBenchmarkConfig | None = field(default_factory=WorldBenchmarkConfig)
    # Multiplier of the stage's lr for the vision tower when ``trainable`` includes it (LLaVA-NeXT-style
    # tower tuning uses about 1/10 of the LM's lr; LLaVA-1.5 keeps the tower frozen).
    vision_lr_scale: float = 1.0
    eval_vqa: int = 200
    eval_pope: int = 100  # probes per POPE split
    eval_captions: int = 100
    eval_mme: int = 0  # MME-style yes/no questions (two per image; acc and acc+)
    eval_mmbench: int = 0  # MMBench-style four-option questions, each asked in every rotation
    eval_vqa_file: str | None = None
    eval_pope_files: dict[str, str] = field(default_factory=dict)
    max_new_tokens: int = 16
    caption_max_new_tokens: int = 32
    eval_batch_size: int = 32

    def validate(self) -> None:
        if self.eval_mme % 2:
            raise ConfigError(
                f"eval_mme: MME asks two questions per image; give an even count, got {self.eval_mme}"
            )


class MultimodalSFTTask(TrainingTask):
    model_config = MultimodalLMSpec
    data_config = MultimodalDataConfig
    options_config = MultimodalSFTOptions
    loss_unit = "tokens"
    sample_kind = "image-chat"

    def __init__(
        self,
        stage: StageConfig,
        ctx: StageContext,
        model_cfg: MultimodalLMSpec,
        data_cfg: MultimodalDataConfig,
        options: MultimodalSFTOptions,
    ):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        if options.loss_reduction == "sample":
            self.loss_unit = "samples"
        init_dir = ctx.resolve_init(stage.init_from)
        if init_dir is not None:
            if model_cfg.has_parts:
                raise ConfigError("model: init_from provides the whole model; remove model.vision / model.lm")
            self.model = MultimodalLM.from_pretrained(init_dir, dtype=DTYPES[model_cfg.lm.dtype])
            if model_cfg.hyper is not None:
                add_hyper_experts(self.model, model_cfg.hyper)
            tokenizer = AutoTokenizer.from_pretrained(init_dir)
            image_processor = load_image_processor(init_dir, self.model.config.vision_config.image_size)
        else:
            self.model, tokenizer, image_processor = build_multimodal_lm(self._resolve_parts(model_cfg))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.processor = MultimodalProcessor(
            tokenizer,
            image_processor,
            self.model.config.num_image_tokens,
            data_cfg.template,
            self.model.config.image_token,
            data_cfg.pad_square,
        )
        if options.lora is not None:
            self.model.language_model = add_lora(self.model.language_model, options.lora)
        self.counts: Counter[str] = Counter()
        self._datasets: dict[str, MultimodalChatDataset | None] = {}

    def _resolve_parts(self, spec: MultimodalLMSpec) -> MultimodalLMSpec:
        """``vision.path`` / ``lm.path`` naming an earlier stage -> that stage's ``final/`` folder."""
        resolved = {
            name: replace(part, path=str(self.ctx.resolve_init(part.path, f"model.{name}.path")))
            for name, part in (("vision", spec.vision), ("lm", spec.lm))
            if part.path is not None and part.path in self.ctx.stage_outputs
        }
        return replace(spec, **resolved)

    # -- data ----------------------------------------------------------------------------------------
    def _dataset(self, split: str) -> MultimodalChatDataset | TrainStream | None:
        if split not in self._datasets:
            source = self.read_sources(split, self.counts)
            if isinstance(source, SampleStream):
                self._datasets[split] = TrainStream(source, self._stream_item)
            else:
                self._datasets[split] = (
                    None
                    if source is None
                    else MultimodalChatDataset(
                        source, self.processor, self.data_cfg.max_length, self.counts, split
                    )
                )
        return self._datasets[split]

    def _stream_item(self, sample: dict, rng) -> MultimodalSample | None:
        """A streamed conversation as a training sample (None: it cannot train, counted)."""
        images = sample["images"]
        fitted = fit_conversation(
            self.processor,
            sample["messages"],
            len(images),
            self.data_cfg.max_length,
            self.counts,
            "train",
            sample["where"],
        )
        return (
            None
            if fitted is None
            else MultimodalSample(fitted.input_ids, fitted.labels, fitted.truncated, images)
        )

    def train_dataset(self) -> MultimodalChatDataset | TrainStream:
        return self._dataset("train")

    def train_lengths(self) -> list[int] | None:
        dataset = self._dataset("train")
        if isinstance(dataset, TrainStream):
            return None  # a stream's lengths are not known before it is read
        return [
            len(chat.input_ids) if dataset.source.num_images[index] else -len(chat.input_ids)
            for index, chat in dataset.samples
        ]

    def eval_dataset(self) -> MultimodalChatDataset | None:
        dataset = self._dataset("eval")
        return dataset if dataset else None

    def collate(self, samples: list[MultimodalSample]) -> dict[str, torch.Tensor]:
        return self.processor.collate(samples, self.data_cfg.pad_to_multiple_of)

    def data_report(self) -> dict[str, int]:
        return dict(self.counts)

    # -- math ----------------------------------------------------------------------------------------
    def response_logits(self, model: MultimodalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[N, V]`` logits of ``model`` at the ``N`` positions whose next token is labelled, in row-major
        order (no vocabulary projection of prompt and image positions)."""
        # [B, T]: position t predicts token t + 1
        keep = F.pad(batch["labels"][:, 1:] != IGNORE_INDEX, (0, 1))
        guidance = prompt_mask(batch["labels"], batch["attention_mask"], IGNORE_INDEX)  # HyperLLaVA's
        media = {name: batch[name] for name in model.media_inputs if name in batch}  # video, audio, ...
        return model(
            batch["input_ids"],
            batch.get("pixel_values"),
            batch["attention_mask"],
            guidance_mask=guidance,
            logits_to_keep=keep,
            **media,
        ).logits

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mean next-token cross-entropy over labelled tokens, as :func:`mmfactory.losses.lm.causal_lm_loss`,
        on :meth:`response_logits`."""
        targets = batch["labels"][:, 1:]
        labelled = targets != IGNORE_INDEX
        logits = self.response_logits(self.model, batch).float()
        if self.options.loss_reduction == "sample":
            token_losses = F.cross_entropy(logits, targets[labelled], reduction="none")
            rows = labelled.nonzero()[:, 0]
            return {"loss": sample_mean_loss(token_losses, rows, len(targets))}
        total = F.cross_entropy(logits, targets[labelled], reduction="sum")
        return {"loss": total / labelled.sum().clamp(min=1)}

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        """Labelled tokens, or labelled samples under ``loss_reduction: sample``."""
        labelled = batch["labels"][:, 1:] != IGNORE_INDEX
        if self.options.loss_reduction == "sample":
            return int(labelled.any(dim=1).sum())
        return int(labelled.sum())

    def lr_scale(self, name: str) -> float:
        return self.options.vision_lr_scale if name.startswith("model.vision_tower.") else 1.0

    # -- evaluation and output -------------------------------------------------------------------------
    def benchmarks(self) -> Benchmarks:
        """The world's held-out test split, or the VQA / POPE files named in the options."""
        o = self.options
        if o.world_benchmarks is not None:
            w = o.world_benchmarks
            bench = world_benchmarks(
                o.eval_vqa,
                o.eval_pope,
                o.eval_captions,
                w.seed,
                image_size=w.image_size,
                caption_details=w.caption_details,
                mme=o.eval_mme,
                mmbench=o.eval_mmbench,
            )
        else:
            bench = Benchmarks()
        if o.eval_vqa_file is not None:
            from mmfactory.data.readers import read_vqa

            vqa = read_vqa(o.eval_vqa_file)
            bench.vqa = [vqa[i] for i in range(min(o.eval_vqa, len(vqa)))]
        if o.eval_pope_files:
            from mmfactory.data.readers import read_pope

            bench.pope = {}
            for split, path in o.eval_pope_files.items():
                probes = read_pope(path)
                bench.pope[split] = [probes[i] for i in range(min(o.eval_pope, len(probes)))]
        return bench

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        o = self.options
        cfg = GenerationConfig(max_new_tokens=o.max_new_tokens, batch_size=o.eval_batch_size)
        examples: dict[str, list[Example]] = {}
        bench = self.benchmarks()
        metrics = evaluate_mllm(self.model, self.processor, bench, cfg, o.caption_max_new_tokens, examples)
        for group, shown in examples.items():  # evaluate() runs on the main process only
            write_examples(self.ctx.stage_dir, group, shown)
        return metrics

    def save_pretrained(self, out_dir: Path) -> None:
        """A plain MultimodalLM (LoRA merged in, the LM's adapters alone in ``adapter/``; the stage is over)
        and its processor files."""
        if self.options.lora is not None:
            self.model.language_model = save_and_merge(self.model.language_model, out_dir)
        self.model.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)
