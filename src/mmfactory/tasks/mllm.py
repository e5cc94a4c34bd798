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
from typing import Any, Literal

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
from mmfactory.data.source_config import SourceConfig, check_sources
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
        check_sources(self.train, self.max_bad_fraction)


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
            raise ConfigError("caption_details: name brief, detailed or both")


@dataclass
class MLLMEvalOptions:
    """The ``eval:`` group: end-of-stage generation benchmarks of a multimodal LM (counts of 0 turn one off).

    Benchmarks come from the world's held-out ``test`` split (``world``; null turns it off) and from files:
    VQA and POPE JSONL (``pope_files`` maps a split name to its file). Replies are greedy, ``batch_size``
    prompts at a time.
    """

    world: WorldBenchmarkConfig | None = field(default_factory=WorldBenchmarkConfig)
    vqa: int = 200
    pope: int = 100  # probes per POPE split
    captions: int = 100
    mme: int = 0  # MME-style yes/no questions (two per image; acc and acc+)
    mmbench: int = 0  # MMBench-style four-option questions, each asked in every rotation
    vqa_file: str | None = None
    pope_files: dict[str, str] = field(default_factory=dict)
    max_new_tokens: int = 16
    caption_max_new_tokens: int = 32
    batch_size: int = 32

    def validate(self) -> None:
        counts = {"vqa": self.vqa, "pope": self.pope, "captions": self.captions}
        counts.update(mme=self.mme, mmbench=self.mmbench)
        for name, count in counts.items():
            if count < 0:
                raise ConfigError(f"{name}: a count must be >= 0 (0 turns the benchmark off), got {count}")
        if self.mme % 2:
            raise ConfigError(f"mme: MME asks two questions per image; give an even count, got {self.mme}")
        for name in ("max_new_tokens", "caption_max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")

    def benchmarks(self) -> Benchmarks:
        """The world's held-out test split, then the VQA / POPE files in place of its VQA / POPE."""
        if self.world is not None:
            w = self.world
            bench = world_benchmarks(
                self.vqa,
                self.pope,
                self.captions,
                w.seed,
                image_size=w.image_size,
                caption_details=w.caption_details,
                mme=self.mme,
                mmbench=self.mmbench,
            )
        else:
            bench = Benchmarks()
        if self.vqa_file is not None:
            from mmfactory.data.readers import read_vqa

            vqa = read_vqa(self.vqa_file)
            bench.vqa = [vqa[i] for i in range(min(self.vqa, len(vqa)))]
        if self.pope_files:
            from mmfactory.data.readers import read_pope

            bench.pope = {}
            for split, path in self.pope_files.items():
                probes = read_pope(path)
                bench.pope[split] = [probes[i] for i in range(min(self.pope, len(probes)))]
        return bench


LossReduction = Literal["token", "sample"]


@dataclass
class MultimodalSFTOptions:
    """LoRA, the loss reduction, the vision tower's lr scale and the ``eval:`` benchmarks."""

    lora: LoraOptions | None = None
    # How labelled tokens are averaged: "token" (LLaVA, transformers: every response token of the batch
    # weighs the same, so long captions dominate one-word answers) or "sample" (each sample's mean token
    # loss, averaged over samples: a yes/no answer weighs as much as a caption).
    loss_reduction: LossReduction = "token"
    # Multiplier of the stage's lr for the vision tower when ``trainable`` includes it (LLaVA-NeXT-style
    # tower tuning uses about 1/10 of the LM's lr; LLaVA-1.5 keeps the tower frozen).
    vision_lr_scale: float = 1.0
    eval: MLLMEvalOptions = field(default_factory=MLLMEvalOptions)


# -- the parts every multimodal-LM task composes ---------------------------------------------------------
def resolve_parts(spec: MultimodalLMSpec, ctx: StageContext) -> MultimodalLMSpec:
    """``vision.path`` / ``lm.path`` (and ``audio.path`` where the spec has one) naming an earlier stage ->
    that stage's ``final/`` folder."""
    parts = [name for name in ("vision", "audio", "lm") if getattr(spec, name, None) is not None]
    resolved = {
        name: replace(part, path=str(ctx.resolve_init(part.path, f"model.{name}.path")))
        for name in parts
        if (part := getattr(spec, name)).path is not None and part.path in ctx.stage_outputs
    }
    return replace(spec, **resolved)


def lm_attention(spec: MultimodalLMSpec) -> dict[str, Any]:
    """``from_pretrained`` keywords giving a saved model's LM the spec's ``lm.attn_implementation`` (a saved
    model does not record it; null: transformers' default)."""
    impl = spec.lm.attn_implementation
    return {} if impl is None else {"attn_implementation": {"text_config": impl}}


def load_multimodal_lm(
    stage: StageConfig,
    ctx: StageContext,
    spec: MultimodalLMSpec,
    data_cfg: MultimodalDataConfig | Any,
    lora: LoraOptions | None,
) -> tuple[MultimodalLM, MultimodalProcessor]:
    """The stage's trainable model and its processor: ``init_from`` an earlier stage or a folder (with
    HyperLLaVA's experts added when ``spec.hyper`` asks), else built from parts; LoRA on the LM last.
    ``data_cfg`` gives the chat template and ``pad_square``."""
    init_dir = ctx.resolve_init(stage.init_from)
    if init_dir is not None:
        if spec.has_parts:
            raise ConfigError("model: init_from provides the whole model; remove model.vision / model.lm")
        model = MultimodalLM.from_pretrained(init_dir, dtype=DTYPES[spec.lm.dtype], **lm_attention(spec))
        if spec.hyper is not None:
            add_hyper_experts(model, spec.hyper)
        tokenizer = AutoTokenizer.from_pretrained(init_dir)
        image_processor = load_image_processor(init_dir, model.config.vision_config.image_size)
    else:
        model, tokenizer, image_processor = build_multimodal_lm(resolve_parts(spec, ctx))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    processor = MultimodalProcessor(
        tokenizer,
        image_processor,
        model.config.num_image_tokens,
        data_cfg.template,
        model.config.image_token,
        data_cfg.pad_square,
    )
    if lora is not None:
        model.language_model = add_lora(model.language_model, lora)
    return model, processor


def response_logits(model: MultimodalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
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


def reply_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: LossReduction) -> torch.Tensor:
    """Next-token cross-entropy of :func:`response_logits` ``[N, V]`` against ``labels [B, T]``, averaged
    over labelled tokens (``token``, as :func:`mmfactory.losses.lm.causal_lm_loss`) or per sample first."""
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    logits = logits.float()
    if reduction == "sample":
        token_losses = F.cross_entropy(logits, targets[labelled], reduction="none")
        rows = labelled.nonzero()[:, 0]
        return sample_mean_loss(token_losses, rows, len(targets))
    total = F.cross_entropy(logits, targets[labelled], reduction="sum")
    return total / labelled.sum().clamp(min=1)


def reply_loss_weight(labels: torch.Tensor, reduction: LossReduction) -> int:
    """What :func:`reply_loss` averages over: labelled tokens, or samples with a labelled token."""
    labelled = labels[:, 1:] != IGNORE_INDEX
    return int(labelled.any(dim=1).sum()) if reduction == "sample" else int(labelled.sum())


def vision_lr_scale(name: str, scale: float) -> float:
    """``scale`` for the vision tower's parameters, 1 for the rest."""
    return scale if name.startswith("model.vision_tower.") else 1.0


@torch.no_grad()
def run_benchmarks(
    model: MultimodalLM, processor: MultimodalProcessor, opts: MLLMEvalOptions, stage_dir: Path
) -> dict[str, float]:
    """:func:`~mmfactory.eval.mllm.evaluate_mllm` on ``opts``' benchmarks; shown examples to ``stage_dir``."""
    cfg = GenerationConfig(max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size)
    examples: dict[str, list[Example]] = {}
    metrics = evaluate_mllm(model, processor, opts.benchmarks(), cfg, opts.caption_max_new_tokens, examples)
    for group, shown in examples.items():  # evaluate() runs on the main process only
        write_examples(stage_dir, group, shown)
    return metrics


def save_multimodal_lm(
    model: MultimodalLM, processor, lora: LoraOptions | None, out_dir: Path
) -> MultimodalLM:
    """A plain model in ``out_dir`` (LoRA merged in, the LM's adapters alone in ``adapter/``) and its
    processor files; returns the merged model (the stage is over)."""
    if lora is not None:
        model.language_model = save_and_merge(model.language_model, out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return model


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
        self.model, self.processor = load_multimodal_lm(stage, ctx, model_cfg, data_cfg, options.lora)
        self.counts: Counter[str] = Counter()
        self._datasets: dict[str, MultimodalChatDataset | None] = {}

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
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:func:`reply_loss` of :func:`response_logits`."""
        logits = response_logits(self.model, batch)
        return {"loss": reply_loss(logits, batch["labels"], self.options.loss_reduction)}

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        """Labelled tokens, or labelled samples under ``loss_reduction: sample``."""
        return reply_loss_weight(batch["labels"], self.options.loss_reduction)

    def lr_scale(self, name: str) -> float:
        return vision_lr_scale(name, self.options.vision_lr_scale)

    # -- evaluation and output -------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        return run_benchmarks(self.model, self.processor, self.options.eval, self.ctx.stage_dir)

    def save_pretrained(self, out_dir: Path) -> None:
        self.model = save_multimodal_lm(self.model, self.processor, self.options.lora, out_dir)
