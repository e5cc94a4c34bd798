"""The consistency judge's stage (``mars_judge``): :class:`~mmfactory.mars.judge.SceneJudge` trained on
world scene images to read each grid cell's shape and colour and the background."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmfactory.config import ConfigError
from mmfactory.data.image_text import ImageCaptions
from mmfactory.data.source_config import SourceConfig
from mmfactory.data.world_source import world_scene_layout, world_scene_vocabulary
from mmfactory.mars.evaluate import (
    consistency_metrics,
    judge_images,
)
from mmfactory.mars.judge import SceneJudge, SceneJudgeConfig, judge_loss
from mmfactory.models.components.vq import (
    pixels_from_uint8,
)
from mmfactory.tasks.base import TrainingTask
from mmfactory.tasks.image_tokenizer import ImageSourcesData, IndexedImages, fitted_uint8, read_up_front


@dataclass
class JudgeSpec:
    hidden_sizes: list[int] = field(default_factory=lambda: [32, 64, 128])
    image_size: int = 32  # images are resized to this side before judging

    def validate(self) -> None:
        if not self.hidden_sizes or min(self.hidden_sizes) < 1:
            raise ConfigError(f"hidden_sizes: positive channel counts, got {self.hidden_sizes}")
        if self.image_size < 2 ** len(self.hidden_sizes):
            raise ConfigError(
                f"image_size: {self.image_size} is too small for {len(self.hidden_sizes)} poolings"
            )


@dataclass
class JudgeData(ImageSourcesData):
    train: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig("world", kind="scenes", size=4000)]
    )
    eval: list[SourceConfig] = field(
        default_factory=lambda: [SourceConfig("world", kind="scenes", split="val", size=400)]
    )


@dataclass
class JudgeOptions:
    pass


def _layouts(source: ImageCaptions, where: str) -> tuple[np.ndarray, np.ndarray]:
    if source.scenes is None:
        raise ConfigError(
            f"{where}: the judge reads world scenes (format: world, kind: scenes), whose layouts it learns"
        )
    return world_scene_layout(source.scenes)


class SceneJudgeTask(TrainingTask):
    """Per-cell shape and colour, and the background, of world scene images (cross-entropy)."""

    model_config = JudgeSpec
    data_config = JudgeData
    options_config = JudgeOptions
    sample_kind = "image-text"
    loss_unit = "images"

    def __init__(self, stage, ctx, model_cfg: JudgeSpec, data_cfg: JudgeData, options: JudgeOptions):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        init_dir = ctx.resolve_init(stage.init_from)
        if init_dir is not None:
            self.judge = SceneJudge.from_pretrained(init_dir)
        else:
            config = SceneJudgeConfig(image_size=model_cfg.image_size, hidden_sizes=model_cfg.hidden_sizes)
            config.update(world_scene_vocabulary())
            self.judge = SceneJudge(config)
        self.counts: Counter[str] = Counter()
        self._data: dict[str, tuple[ImageCaptions, np.ndarray, np.ndarray]] = {}

    def data(self, split: str):
        if split not in self._data:
            source = read_up_front(self, split)
            cells, background = _layouts(source, f"data.{split}") if len(source) else (None, None)
            self._data[split] = (source, cells, background)
        return self._data[split]

    def train_dataset(self) -> Dataset:
        return IndexedImages(self.data("train")[0], train=True)

    def eval_dataset(self) -> Dataset | None:
        source = self.data("eval")[0]
        return IndexedImages(source, train=False) if len(source) else None

    def collate(self, samples: list[dict]) -> dict[str, Tensor]:
        split = "train" if self.training else "eval"
        _, cells, background = self.data(split)
        index = [s["index"] for s in samples]
        return {
            "images": fitted_uint8([s["image"] for s in samples], self.judge.config.image_size),
            "cells": torch.from_numpy(cells[index]),
            "background": torch.from_numpy(background[index]),
        }

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.judge(pixels_from_uint8(batch["images"]))
        loss = judge_loss(out, batch["cells"], batch["background"])
        cell_acc = (out["shape"].argmax(-1) == batch["cells"][..., 0]) & (
            out["color"].argmax(-1) == batch["cells"][..., 1]
        )
        return {"loss": loss, "cell_acc": cell_acc.float().mean().detach()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The judge's consistency on real eval images against their own layouts: the ceiling a generator's
        consistency is read against."""
        source, cells, _ = self.data("eval")
        if not len(source):
            return {}
        self.judge.eval()
        images = fitted_uint8(
            [source.image(i) for i in range(len(source))], self.judge.config.image_size
        ).numpy()
        return consistency_metrics(judge_images(self.judge, images), cells, "judge_real")

    def save_pretrained(self, out_dir: Path) -> None:
        self.judge.save_pretrained(out_dir)
