"""ARM's stages: cluster-autoregressive pretraining of a vision Mamba, the masked (MAE-style) pretraining
it is compared with, and classification fine-tuning (see :mod:`mmfactory.models.vision_mamba`).

* ``arm_pretrain``: MSE between predicted and per-patch normalised pixels of clusters ``2..K``.
* ``arm_mae_pretrain``: the same encoder and decoder class, MSE on the masked patches only.
* ``arm_finetune``: the official fine-tuning model (middle class token, learned positions, stochastic
  depth), cross-entropy with label smoothing, layer-wise lr decay, and ``init_from`` a pretraining (or
  fine-tuning) stage whose encoder weights are transferred, at the pretraining resolution or another one
  (``model.image_size``: positions interpolated); extra scan directions start as copies of the forward one.
  Eval reports top-1 accuracy (``eval_accuracy``).

Images come from ``labelled-image`` sources (the world, image folders, IDX files), fitted to the encoder's
``image_size`` and ``in_channels``; pretraining uses the images only. Training images are augmented as the
official code does (``options.augment``, :mod:`mmfactory.data.augment`). Throughput is logged as
``images_per_s``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from mmfactory.config import ConfigError
from mmfactory.data.augment import AugmentedImages, ImageAugment
from mmfactory.data.images import FittedImages, align_classes
from mmfactory.data.source_config import SourceConfig, check_sources
from mmfactory.examples import Example, write_examples
from mmfactory.models.vision_mamba import (
    ARMPretrainingModel,
    MaskedPretrainingModel,
    PixelDecoderConfig,
    Pooling,
    ScanOrder,
    VisionMambaClassifier,
    VisionMambaConfig,
    load_pretrained,
    load_pretrained_encoder,
)
from mmfactory.tasks.base import TrainingTask


@dataclass
class ImageDataConfig:
    """Labelled images from any ``labelled-image`` sources (:mod:`mmfactory.data.sources`): the world
    (``kind: labelled``), image folders (``format: folder``), IDX files (``format: idx``). Images are fitted
    to the encoder's ``image_size`` and ``in_channels``; eval labels are mapped onto the training classes
    by name."""

    train: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig("world", kind="labelled", size=2000, max_objects=4)]
    )
    eval: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig("world", kind="labelled", split="val", size=500, max_objects=4)]
    )
    max_bad_fraction: float | None = None  # stop when a source has more bad records than this share

    def validate(self) -> None:
        check_sources(self.train, self.max_bad_fraction)


@dataclass
class ARMModelSpec:
    """``arm_pretrain``'s model: encoder, decoder, and ``cluster_size`` patches per cluster side
    (paper: 12x12 patches in 3x3 clusters of 4x4)."""

    encoder: VisionMambaConfig
    decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    cluster_size: int = 4


@dataclass
class MAEModelSpec:
    """``arm_mae_pretrain``'s model: the same encoder and decoder; ``mask_ratio`` of the patches hidden."""

    encoder: VisionMambaConfig
    decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    mask_ratio: float = 0.75


@dataclass
class ClassifierSpec:
    """``arm_finetune``'s model. The encoder comes from ``init_from`` (then ``encoder``, if given, must
    match it, its ``image_size`` aside) or is built from ``encoder``. ``image_size`` fine-tunes at another
    resolution than the encoder's (the official code: pretrain at 192, fine-tune at 224 or 384), position
    embeddings interpolated. ``scans``: ``[forward]`` is the pretrained unidirectional encoder,
    ``[forward, backward]`` bidirectional, all four the official fine-tuning mixer. ``pooling``: ``mean`` of
    the patch states (the official README's ``--global_pool True``) or the middle class token's state
    (``cls``, the official code's default). ``drop_path``: stochastic depth (official 0.1).
    ``num_classes`` defaults to the training data's."""

    encoder: VisionMambaConfig | None = None
    image_size: int | None = None
    scans: list[ScanOrder] = field(default_factory=lambda: ["forward"])
    pooling: Pooling = "mean"
    drop_path: float = 0.1
    num_classes: int | None = None

    def validate(self) -> None:
        if not self.scans or self.scans[0] != "forward" or len(set(self.scans)) != len(self.scans):
            raise ConfigError(f"scans: must start with 'forward' and not repeat, got {self.scans}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"drop_path: must be in [0, 1), got {self.drop_path}")
        if self.pooling not in ("cls", "mean"):
            raise ConfigError(f"pooling: must be 'cls' or 'mean', got {self.pooling!r}")


@dataclass
class PretrainOptions:
    """Pretraining augmentation; default the official ``RandomResizedCrop(scale=(0.2, 1))`` + flip."""

    augment: ImageAugment = field(default_factory=lambda: ImageAugment(crop_scale=[0.2, 1.0], flip=True))


@dataclass
class FinetuneOptions:
    """``layer_decay``: block ``i`` (1-based) of ``L`` trains at ``lr * layer_decay^(L + 1 - i)``, the patch
    embedding, class token and positions at ``lr * layer_decay^(L + 1)``, the norm and head at ``lr`` (1
    disables it). ``augment``: default the official timm transform's crop (scale 0.08-1), flip and random
    erasing (0.25); RandAugment is not implemented."""

    label_smoothing: float = 0.1
    layer_decay: float = 0.75
    augment: ImageAugment = field(
        default_factory=lambda: ImageAugment(crop_scale=[0.08, 1.0], flip=True, erase_prob=0.25)
    )

    def validate(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"layer_decay: must be in (0, 1], got {self.layer_decay}")


class _ImageTask(TrainingTask):
    """Shared data handling: ``{"images": uint8 [B, S, S, C], "labels": int64 [B]}`` batches."""

    loss_unit = "images"
    sample_kind = "labelled-image"
    encoder_config: VisionMambaConfig  # set by the subclass before data is read

    def _setup_data(self) -> None:
        self.counts: Counter = Counter()
        self._data: dict[str, tuple[Dataset, list[str]] | None] = {}

    def labelled(self, split: Literal["train", "eval"]) -> tuple[Dataset, list[str]] | None:
        """``(dataset, class_names)`` of a split (eval labels on the training classes), or None when the
        split names no sources."""
        if split not in self._data:
            samples = self.read_sources(split, self.counts)
            if samples is not None and split == "eval":
                samples = align_classes(samples, self.labelled("train")[1], "data.eval")
            enc = self.encoder_config
            self._data[split] = (
                None
                if samples is None
                else (FittedImages(samples, enc.image_size, enc.in_channels), samples.classes)
            )
        return self._data[split]

    def train_dataset(self) -> Dataset:
        data, augment = self.labelled("train")[0], self.options.augment
        return AugmentedImages(data, augment) if augment.active else data

    def eval_dataset(self) -> Dataset | None:
        data = self.labelled("eval")
        return data[0] if data is not None and len(data[0]) else None

    def collate(self, samples: list[dict]) -> dict[str, Tensor]:
        return {
            "images": torch.from_numpy(np.stack([s["image"] for s in samples])),
            "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        }

    def data_report(self) -> dict[str, int]:
        report = {f"{split}/images": len(data[0]) for split, data in self._data.items() if data is not None}
        return {**report, **self.counts}

    def save_pretrained(self, out_dir: Path) -> None:
        self.model.save_pretrained(out_dir)


RECONSTRUCTIONS = 6  # eval images ARM pretraining draws back as examples


def _rgb(image: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, C]`` with C in {1, 3} -> ``[H, W]`` or ``[H, W, 3]`` (what a PNG takes)."""
    return image[..., 0] if image.shape[-1] == 1 else image


class _PixelPretrainTask(_ImageTask):
    """MSE between predicted and target normalised pixels, ``model(images) -> (pred, target)``."""

    options_config = PretrainOptions

    def __init__(
        self,
        stage,
        ctx,
        model_cfg: ARMModelSpec | MAEModelSpec,
        data_cfg: ImageDataConfig,
        options: PretrainOptions,
    ):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        if stage.init_from is not None:
            raise ConfigError(f"stages.{stage.name}.init_from: pretraining starts from scratch")
        self.encoder_config = model_cfg.encoder
        self._setup_data()

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        pred, target = self.model(batch["images"])
        return {"loss": F.mse_loss(pred, target)}  # float32 under autocast (an fp32-policy op)


class ARMPretrainTask(_PixelPretrainTask):
    model_config = ARMModelSpec
    data_config = ImageDataConfig

    def __init__(
        self, stage, ctx, model_cfg: ARMModelSpec, data_cfg: ImageDataConfig, options: PretrainOptions
    ):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        self.model = ARMPretrainingModel(model_cfg.encoder, model_cfg.decoder, model_cfg.cluster_size)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """No metric beyond the eval loss; writes reconstructions of the first eval images as examples."""
        data = self.eval_dataset()
        if data is None:
            return {}
        batch = self.collate([data[i] for i in range(min(RECONSTRUCTIONS, len(data)))])
        images = batch["images"].to(next(self.model.parameters()).device)
        drawn = self.model.reconstruct(images).cpu().numpy()
        fields = {"left": "the image", "right": "cluster 1 given, clusters 2..K predicted"}
        shown = [
            Example(f"eval image {i}", fields, [_rgb(x), _rgb(y)])
            for i, (x, y) in enumerate(zip(images.cpu().numpy(), drawn, strict=True))
        ]
        write_examples(self.ctx.stage_dir, "Reconstructions", shown)
        return {}


class MaskedPretrainTask(_PixelPretrainTask):
    model_config = MAEModelSpec
    data_config = ImageDataConfig

    def __init__(
        self, stage, ctx, model_cfg: MAEModelSpec, data_cfg: ImageDataConfig, options: PretrainOptions
    ):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        self.model = MaskedPretrainingModel(model_cfg.encoder, model_cfg.decoder, model_cfg.mask_ratio)


def _encoder_differences(a: VisionMambaConfig, b: VisionMambaConfig) -> list[str]:
    # a preset name and a speed knob do not change the weights; the resolution is model.image_size's
    skip = {"size", "scan_chunk_size", "image_size"}
    return [
        f.name
        for f in dataclasses.fields(a)
        if f.name not in skip and getattr(a, f.name) != getattr(b, f.name)
    ]


class ImageClassificationTask(_ImageTask):
    model_config = ClassifierSpec
    data_config = ImageDataConfig
    options_config = FinetuneOptions

    def __init__(
        self, stage, ctx, model_cfg: ClassifierSpec, data_cfg: ImageDataConfig, options: FinetuneOptions
    ):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        init_dir = ctx.resolve_init(stage.init_from)
        state = saved = None
        self.encoder_config = model_cfg.encoder
        if init_dir is not None:
            source = load_pretrained(init_dir)
            saved, state = source.encoder.config, source.state_dict()
            if model_cfg.encoder is None:
                self.encoder_config = dataclasses.replace(saved)
            elif diff := _encoder_differences(model_cfg.encoder, saved):
                raise ConfigError(f"model.encoder: {diff} differ from the encoder of init_from {init_dir}")
        elif model_cfg.encoder is None:
            raise ConfigError("model.encoder: needed to build the encoder when there is no init_from")
        if model_cfg.image_size is not None:
            self.encoder_config = dataclasses.replace(self.encoder_config, image_size=model_cfg.image_size)
            self.encoder_config.validate()
        self._setup_data()
        class_names = self.labelled("train")[1]
        num_classes = model_cfg.num_classes or len(class_names)
        if len(class_names) > num_classes:
            raise ConfigError(
                f"model.num_classes: {num_classes} but the training data has {len(class_names)} classes"
            )
        names = class_names + [str(i) for i in range(len(class_names), num_classes)]
        self.model = VisionMambaClassifier(
            self.encoder_config, num_classes, model_cfg.scans, names, model_cfg.pooling, model_cfg.drop_path
        )
        if state is not None:
            load_pretrained_encoder(self.model, state, saved)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = self.model(batch["images"])
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels, label_smoothing=self.options.label_smoothing)
        return {"loss": loss, "accuracy": (logits.argmax(-1) == labels).float().mean()}

    def lr_scale(self, name: str) -> float:
        """``layer_decay ** (L + 1 - depth)`` for ``model.*`` parameters (see :class:`FinetuneOptions`)."""
        depth = self.model.layer_id(name.removeprefix("model."))
        return self.options.layer_decay ** (len(self.model.encoder.blocks) + 1 - depth)
