"""Contrastive image-text pretraining (CLIP), the ``image_text_contrastive`` task.

A Hugging Face ``CLIPModel`` (ViT image tower + causal text transformer pooled at its first EOS token, each
with a linear projection, and a learnable log logit scale) trained with the symmetric InfoNCE of
:func:`~mmfactory.losses.contrastive.clip_loss`: features are gathered across processes with gradients and the
scale is clamped to at most 100, as in CLIP. The model is tiny from ``CLIPConfig`` keyword arguments (text
tokenizer: the built-in world's, with an EOS appended to every caption) or loaded from a local CLIP folder
(:mod:`mmfactory.models.clip`).
``final/`` holds the model, tokenizer and image processor, so a LLaVA stage loads its vision half with
``model.vision.path: <run>/<stage>/final`` and the same preprocessing.

Data: ``image-text`` sources (docs/formats.md): the world's scenes with their captions (``languages`` x
``details``; training draws one caption per image per step, evaluation uses all), or image-text files:
pairs JSONL (``{"id", "image", "text"}``) or webdataset shards; records that share an image file are one
image with several captions. Images are not augmented.

Shape twins (``data.shape_twins``, world scenes only; off by default): hard negatives in the manner of
NegCLIP. A fraction of every training batch is made of pairs of scenes that differ only in the shapes of
their objects (same colours, sizes, positions and background), each with its own caption, so the loss can
only tell the two apart by shape. In random batches colour and position already single out every image and
caption, and a tower trained on them alone barely encodes shape.

Cell head (``options.cell_head``, world scenes only; off by default): an auxiliary linear head reads the
tower's hidden state at ``layer`` (LLaVA's ``vision_feature_layer``, -2), pools its patch tokens over each
cell of the world's 3x3 layout and classifies the cell's shape and colour (or "empty") with cross-entropy
(:func:`~mmfactory.losses.dense.cell_attribute_loss`), added with ``weight`` to the contrastive loss. It
stands in for what a web-scale CLIP's patch tokens carry and a world-sized contrastive run does not teach:
which object sits where, with its colour bound to its shape, linearly readable. The head is training-only
(``final/`` stays a plain ``CLIPModel``); ``evaluate`` reports its per-cell accuracy on the eval scenes.

``evaluate``: text->image and image->text retrieval over the held-out images and all their captions (R@1/5/10
in percent, median and mean rank) and, on the world, zero-shot classification of the shape and the colour of
single-object test scenes with CLIP's prompt ensembling (a class embedding is the mean of its prompts'
normalised embeddings; the prompts are the world's brief captions of that shape in every colour, or that
colour on every shape). Accuracy and balanced accuracy (mean per-class recall: chance is 1 / classes) are
reported per language.

A stage, e.g.::

    - name: clip
      task: image_text_contrastive
      model:
        tiny:
          text_config: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
                        num_attention_heads: 4, max_position_embeddings: 64}
          vision_config: {hidden_size: 96, intermediate_size: 192, num_hidden_layers: 3,
                          num_attention_heads: 4, image_size: 30, patch_size: 10}
          projection_dim: 64
      data: {train: [{format: world, kind: scenes, size: 4000, languages: [en, zh]}]}

The loss of a micro-batch depends on the negatives it holds, so gradient accumulation is not equivalent to a
larger batch (as in CLIP): grow ``train.batch_size`` or the number of processes instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfactory.config import ConfigError
from mmfactory.data.hard_negatives import with_shape_twins
from mmfactory.data.image_text import ImageCaptionDataset, ImageCaptions, _stream_item
from mmfactory.data.source_config import SourceConfig, check_sources
from mmfactory.data.streaming import ImageTextStream, TrainStream
from mmfactory.data.world_source import world_scene_layout, world_scene_vocabulary, world_zero_shot
from mmfactory.eval.metrics import text_video_retrieval
from mmfactory.eval.zero_shot import zero_shot_accuracy
from mmfactory.examples import retrieval_examples, write_examples
from mmfactory.losses.contrastive import clamp_logit_scale, clip_loss, gather_world_size
from mmfactory.losses.dense import cell_attribute_loss, pool_patches_to_cells
from mmfactory.models.clip import CLIPSpec, clip_pixel_values, load_clip, tokenize_for_clip
from mmfactory.tasks.base import TrainingTask

# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

WorldLanguage = Literal["en", "zh"]


@dataclass
class ImageTextDataConfig:
    """Images with one or more captions from any ``image-text`` sources (:mod:`mmfactory.data.sources`):
    the world (``kind: scenes``), pairs JSONL, webdataset shards."""

    train: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig("world", kind="scenes", size=4000)]
    )
    eval: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig("world", kind="scenes", split="val", size=200)]
    )
    max_bad_fraction: float | None = None  # stop when a source has more bad records than this share
    max_text_length: int | None = (
        None  # tokens with special ones; None: the text model's positions (77 in CLIP)
    )
    pad_square: bool = False  # pad to a square of the mean colour before the processor (LLaVA-1.5's "pad")
    shape_twins: float = 0.0  # fraction of each training batch made of shape-twin pairs; 0: none

    def validate(self) -> None:
        check_sources(self.train, self.max_bad_fraction)
        if self.max_text_length is not None and self.max_text_length < 2:
            raise ConfigError(f"max_text_length: must be >= 2, got {self.max_text_length}")
        if not 0.0 <= self.shape_twins <= 1.0:
            raise ConfigError(f"shape_twins: a fraction in [0, 1], got {self.shape_twins}")
        if self.shape_twins and not self.world_scenes_only:
            raise ConfigError(
                "shape_twins: needs the world's scenes as the one train source {format: world, kind: scenes}"
            )

    @property
    def world_scenes_only(self) -> bool:
        return len(self.train) == 1 and (self.train[0].format, self.train[0].kind) == ("world", "scenes")


@dataclass
class ZeroShotConfig:
    """Zero-shot shape and colour classification of ``size`` single-object world test scenes."""

    size: int = 400
    seed: int = 0
    image_size: int = 32
    languages: list[WorldLanguage] = field(default_factory=lambda: ["en"])


@dataclass
class CellHeadConfig:
    """The auxiliary per-cell shape / colour head on the tower's patch tokens (module docstring)."""

    weight: float = 1.0  # its cross-entropy's weight beside the contrastive loss
    layer: int = -2  # which tower hidden state it reads (LLaVA's vision_feature_layer)

    def validate(self) -> None:
        if not self.weight > 0:
            raise ConfigError(f"cell_head.weight: must be > 0 (null turns the head off), got {self.weight}")


@dataclass
class ImageTextOptions:
    """What ``evaluate`` measures, and the optional auxiliary cell head."""

    eval_batch_size: int = 256  # images or texts per encoder call
    zeroshot: ZeroShotConfig | None = None  # e.g. {size: 400}: world zero-shot; null: none
    cell_head: CellHeadConfig | None = None  # e.g. {weight: 1.0}: per-cell attribute head; null: none

    def validate(self) -> None:
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size: must be >= 1, got {self.eval_batch_size}")
        if self.cell_head is not None:
            self.cell_head.validate()


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------


class ImageTextContrastiveTask(TrainingTask):
    model_config = CLIPSpec
    data_config = ImageTextDataConfig
    options_config = ImageTextOptions
    sample_kind = "image-text"

    def __init__(
        self, stage, ctx, model_cfg: CLIPSpec, data_cfg: ImageTextDataConfig, options: ImageTextOptions
    ):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        init_dir = ctx.resolve_init(stage.init_from)
        if init_dir is not None and (model_cfg.path is not None or model_cfg.tiny is not None):
            raise ConfigError("model: init_from provides the whole model; remove model.path / model.tiny")
        self.model, self.tokenizer, self.image_processor = load_clip(model_cfg, init_dir)
        positions = self.model.config.text_config.max_position_embeddings
        self.max_text_length = data_cfg.max_text_length or positions
        if self.max_text_length > positions:
            raise ConfigError(
                f"data.max_text_length: {self.max_text_length} exceeds the text model's "
                f"max_position_embeddings ({positions})"
            )
        self.counts: Counter[str] = Counter()
        self._sources: dict[str, ImageCaptions] = {}
        self.cell_head = self.build_cell_head() if options.cell_head is not None else None

    def build_cell_head(self) -> nn.ModuleList:
        """Linear heads ``[Dv] -> [1 + num_shapes]`` and ``[Dv] -> [1 + num_colors]`` (class 0: empty)."""
        if not self.data_cfg.world_scenes_only:
            raise ConfigError(
                "options.cell_head: needs the world's scenes as the one train source "
                "{format: world, kind: scenes}"
            )
        vision, vocab = self.model.config.vision_config, world_scene_vocabulary()
        side = vision.image_size // vision.patch_size
        if side % vocab["grid"]:
            raise ConfigError(
                f"options.cell_head: the tower's {side}x{side} patch grid does not divide into the world's "
                f"{vocab['grid']}x{vocab['grid']} cells; choose image_size / patch_size a multiple of "
                f"{vocab['grid']}"
            )
        layers = vision.num_hidden_layers
        if not -layers - 1 <= self.options.cell_head.layer <= layers:
            raise ConfigError(
                f"options.cell_head.layer: {self.options.cell_head.layer} is not a hidden state of a "
                f"{layers}-layer tower"
            )
        classes = (1 + vocab["num_shapes"], 1 + vocab["num_colors"])
        return nn.ModuleList(nn.Linear(vision.hidden_size, k) for k in classes)

    # -- data ----------------------------------------------------------------------------------------
    def image_captions(self, split: Literal["train", "eval"]) -> ImageCaptions:
        if split not in self._sources:
            self._sources[split] = self.read_sources(split, self.counts) or ImageCaptions.empty()
        return self._sources[split]

    def train_dataset(self) -> ImageCaptionDataset | TrainStream:
        source = self.image_captions("train")
        if isinstance(source, ImageTextStream):
            return TrainStream(source, _stream_item)
        return ImageCaptionDataset(source, train=True)

    def eval_dataset(self) -> ImageCaptionDataset | None:
        """The eval images with their first captions, cut to a multiple of the process count: the loss
        gathers equal-sized batches from every process, so every shard must batch alike."""
        source = self.image_captions("eval")
        processes = gather_world_size()
        usable = len(source) // processes * processes
        return ImageCaptionDataset(source, train=False, indices=range(usable)) if usable else None

    def pixel_values(self, images: Sequence[np.ndarray]) -> Tensor:
        return clip_pixel_values(self.image_processor, images, self.data_cfg.pad_square)

    def with_shape_twins(self, samples: list[dict]) -> list[dict]:
        """The batch with its last ``floor(shape_twins * B) // 2`` samples replaced by the shape twins of its
        first as many (:func:`~mmfactory.data.hard_negatives.with_shape_twins`)."""
        return with_shape_twins(samples, self.data_cfg.shape_twins, self.data_cfg.train[0])

    def collate(self, samples: list[dict]) -> dict[str, Tensor]:
        """``pixel_values`` ``[B, 3, S, S]``; the captions' ``input_ids``, ``attention_mask`` ``[B, L]``.
        Training batches of the world get their shape twins (``world_shape_twins``)."""
        if self.data_cfg.shape_twins and "scene" in samples[0]:
            samples = self.with_shape_twins(samples)
        batch = {
            "pixel_values": self.pixel_values([s["image"] for s in samples]),
            **tokenize_for_clip(self.tokenizer, [s["caption"] for s in samples], self.max_text_length),
        }
        if self.cell_head is not None and "scene" in samples[0]:
            batch["cells"] = torch.from_numpy(world_scene_layout([s["scene"] for s in samples])[0])
        return batch

    def data_report(self) -> dict[str, int]:
        report = {}
        for split, source in self._sources.items():
            if isinstance(source, ImageTextStream):
                continue  # a stream's size is what it is; its skips are in the counts
            report[f"{split}/images"] = len(source)
            report[f"{split}/captions"] = sum(map(len, source.captions))
        return {**report, **self.counts}

    # -- math ----------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The contrastive loss, plus ``weight x`` the cell head's on training batches (``cells``)."""
        with_cells = "cells" in batch
        vision = self.model.get_image_features(
            pixel_values=batch["pixel_values"], output_hidden_states=with_cells
        )
        text_embeds = self.model.get_text_features(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).pooler_output
        max_scale = self.model_cfg.max_logit_scale
        contrastive = clip_loss(vision.pooler_output, text_embeds, self.model.logit_scale, max_scale)
        out = {"logit_scale": clamp_logit_scale(self.model.logit_scale, max_scale).exp().detach()}
        if not with_cells:
            return {"loss": contrastive, **out}
        logits = self.cell_logits(vision.hidden_states[self.options.cell_head.layer])
        cell_loss = cell_attribute_loss(logits, batch["cells"])
        return {
            "loss": contrastive + self.options.cell_head.weight * cell_loss,
            "contrastive_loss": contrastive.detach(),
            "cell_loss": cell_loss.detach(),
            **out,
        }

    def cell_logits(self, hidden: Tensor) -> list[Tensor]:
        """A tower hidden state ``[B, 1 + P, Dv]`` -> per cell ``[B, 9, 1 + num_shapes]`` and
        ``[B, 9, 1 + num_colors]`` scores (CLS dropped, patches mean-pooled per cell)."""
        cells = pool_patches_to_cells(hidden[:, 1:], world_scene_vocabulary()["grid"])
        return [head(cells) for head in self.cell_head]

    # -- encoding and scoring --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Sequence[np.ndarray]) -> Tensor:
        """uint8 ``[H, W, 3]`` images -> ``[N, P]`` L2-normalised embeddings (``eval_batch_size`` chunks)."""
        batch, device = self.options.eval_batch_size, self.model.device
        embeds = [
            self.model.get_image_features(
                pixel_values=self.pixel_values(images[lo : lo + batch]).to(device)
            ).pooler_output
            for lo in range(0, len(images), batch)
        ]
        return F.normalize(torch.cat(embeds), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """Texts -> ``[N, P]`` L2-normalised embeddings, in ``eval_batch_size`` chunks."""
        batch, device = self.options.eval_batch_size, self.model.device
        embeds = []
        for lo in range(0, len(texts), batch):
            tokens = tokenize_for_clip(self.tokenizer, texts[lo : lo + batch], self.max_text_length)
            embeds.append(
                self.model.get_text_features(**{k: v.to(device) for k, v in tokens.items()}).pooler_output
            )
        return F.normalize(torch.cat(embeds), dim=-1)

    def clip_scores(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> Tensor:
        """``[N]`` cosine similarity of each image with its text (the CLIP score of data filtering)."""
        return (self.encode_images(images) * self.encode_texts(texts)).sum(dim=-1)

    # -- evaluation and output -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        metrics = self.retrieval()
        if self.options.zeroshot is not None and self.options.zeroshot.size > 0:
            metrics.update(self.zero_shot())
        if self.cell_head is not None:
            metrics.update(self.cell_accuracy())
        return metrics

    @torch.no_grad()
    def cell_accuracy(self) -> dict[str, float]:
        """``cell_{shape,color}_acc``: the cell head's accuracy (percent) on the eval scenes' occupied
        cells; ``cell_empty_acc``: on their empty cells (both attributes must say empty)."""
        source = self.image_captions("eval")
        if not len(source) or source.scenes is None:
            return {}
        batch, device, layer = self.options.eval_batch_size, self.model.device, self.options.cell_head.layer
        shapes, colors = [], []
        for lo in range(0, len(source), batch):
            pixels = self.pixel_values([source.image(i) for i in range(lo, min(lo + batch, len(source)))])
            hidden = self.model.get_image_features(pixel_values=pixels.to(device), output_hidden_states=True)
            shape_logits, color_logits = self.cell_logits(hidden.hidden_states[layer])
            shapes.append(shape_logits.argmax(-1).cpu())
            colors.append(color_logits.argmax(-1).cpu())
        predicted = torch.stack([torch.cat(shapes), torch.cat(colors)], dim=-1)  # [N, 9, 2]
        truth = torch.from_numpy(world_scene_layout(source.scenes)[0])
        occupied, correct = truth[..., 0] > 0, predicted == truth
        return {
            "cell_shape_acc": 100.0 * correct[..., 0][occupied].float().mean().item(),
            "cell_color_acc": 100.0 * correct[..., 1][occupied].float().mean().item(),
            "cell_empty_acc": 100.0 * correct.all(-1)[~occupied].float().mean().item(),
        }

    @torch.no_grad()
    def retrieval(self, source: ImageCaptions | None = None) -> dict[str, float]:
        """``t2i_*`` and ``i2t_*`` R@1/5/10, MdR, MnR over the images of ``source`` (default: the eval set)
        and all their captions; an image's i2t rank is the best rank among its captions."""
        source = self.image_captions("eval") if source is None else source
        if not len(source):
            return {}
        image_embeds = self.encode_images([source.image(i) for i in range(len(source))])
        texts = [text for captions in source.captions for text in captions]
        image_of_text = [i for i, captions in enumerate(source.captions) for _ in captions]
        similarity = self.encode_texts(texts) @ image_embeds.T  # [T, I]
        results = text_video_retrieval(similarity, image_of_text)
        if self.ctx.is_main_process:
            shown = retrieval_examples(similarity.cpu(), texts, image_of_text, source.image)
            write_examples(self.ctx.stage_dir, "Text-to-image retrieval", shown)
        names = {"t2v": "t2i", "v2t": "i2t"}
        metrics = {f"{names[d]}_{name}": value for d, m in results.items() for name, value in m.items()}
        return {**metrics, "retrieval_images": len(source), "retrieval_captions": len(texts)}

    @torch.no_grad()
    def zero_shot(self) -> dict[str, float]:
        """``zeroshot_{lang}_{shape|color}_acc`` and ``..._balanced_acc`` (percent) on ``zeroshot.size``
        single-object world test scenes (:func:`~mmfactory.data.world_source.world_zero_shot`)."""
        cfg, metrics = self.options.zeroshot, {}
        for benchmark in world_zero_shot(cfg.size, cfg.seed, cfg.image_size, cfg.languages):
            metrics.update(zero_shot_accuracy(benchmark, self.encode_images, self.encode_texts))
        return metrics

    def save_pretrained(self, out_dir: Path) -> None:
        """``CLIPModel`` + tokenizer + ``preprocessor_config.json``: ``CLIPModel.from_pretrained`` and
        :func:`~mmfactory.models.vision.load_vision_tower` / ``load_image_processor`` read the folder."""
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)
