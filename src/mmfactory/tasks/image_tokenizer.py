"""Image tokenizer training (``mars_vq``): a VQ-GAN-style tokenizer
(:mod:`mmfactory.models.components.vq`) on the images of any ``image-text`` sources, by reconstruction
(L1 + L2) + commitment, logging PSNR, code perplexity and dead codes. Also the small image-dataset helpers
the other MARS stages share."""

from __future__ import annotations

import inspect
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from mmfactory.config import ConfigError
from mmfactory.data.image_text import ImageCaptions
from mmfactory.data.images import fit_image
from mmfactory.data.source_config import SourceConfig, check_sources
from mmfactory.data.streaming import SampleStream
from mmfactory.mars.evaluate import (
    save_grid,
)
from mmfactory.models.components.vq import (
    VQImageTokenizer,
    VQTokenizerConfig,
    check_vq_config,
    code_usage,
    pixels_from_uint8,
    uint8_from_pixels,
)
from mmfactory.models.hub import resolve_model_folder
from mmfactory.tasks.base import TrainingTask


def _scene_sources() -> list[SourceConfig]:
    return [SourceConfig("world", kind="scenes", size=4000, languages=["en", "zh"])]


def _eval_scenes() -> list[SourceConfig]:
    return [SourceConfig("world", kind="scenes", split="val", size=200, languages=["en", "zh"])]


def fitted_uint8(images: list[np.ndarray], size: int) -> Tensor:
    """uint8 ``[B, size, size, 3]`` of images of any size (Pillow bicubic, RGB)."""
    return torch.from_numpy(np.stack([fit_image(image, size, 3) for image in images]))


def read_up_front(task: TrainingTask, split: str) -> ImageCaptions:
    source = task.read_sources(split, task.counts)
    if isinstance(source, SampleStream):
        raise ConfigError(f"{task.stage.task}: data.{split} sources are read up front; set streaming: false")
    return source or ImageCaptions.empty()


@dataclass
class ImageSourcesData:
    """``image-text`` sources read up front (world scenes in English and Chinese by default)."""

    train: list[SourceConfig] = field(default_factory=_scene_sources)
    eval: list[SourceConfig] = field(default_factory=_eval_scenes)
    max_bad_fraction: float | None = None

    def validate(self) -> None:
        check_sources(self.train, self.max_bad_fraction)


class ImageSourcesTask(TrainingTask):
    """A task over ``image-text`` sources read up front: :meth:`source` per split (cached); datasets of
    :class:`IndexedImages` unless a subclass builds its own."""

    sample_kind = "image-text"

    def __init__(self, stage, ctx, model_cfg, data_cfg, options):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        self.counts: Counter[str] = Counter()
        self._sources: dict[str, ImageCaptions] = {}

    def source(self, split: str) -> ImageCaptions:
        if split not in self._sources:
            self._sources[split] = read_up_front(self, split)
        return self._sources[split]

    def train_dataset(self) -> Dataset:
        return IndexedImages(self.source("train"), train=True)

    def eval_dataset(self) -> Dataset | None:
        source = self.source("eval")
        return IndexedImages(source, train=False) if len(source) else None


class IndexedImages(Dataset):
    """Item ``i``: ``{"index": i, "image": uint8 [H, W, 3], "caption": str}``; training draws the caption
    from torch's RNG (resumed runs replay it), evaluation takes the first."""

    def __init__(self, source: ImageCaptions, train: bool):
        self.source, self.train = source, train

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        captions = self.source.captions[index]
        chosen = int(torch.randint(len(captions), ())) if self.train else 0
        return {"index": index, "image": self.source.image(index), "caption": captions[chosen]}


def check_sizes(sizes: list[int], downsample: int, where: str) -> None:
    for size in sizes:
        if size < downsample or size % downsample:
            raise ConfigError(f"{where}: image size {size} is not a multiple of the tokenizer's {downsample}")


@dataclass
class VQSpec:
    """``path``: a saved tokenizer folder; ``tiny``: keyword arguments of :class:`VQTokenizerConfig`."""

    path: str | None = None
    tiny: dict[str, Any] | None = None

    def validate(self) -> None:
        if self.path is not None and self.tiny is not None:
            raise ConfigError("set either path or tiny, not both")
        if self.tiny is not None:
            known = set(inspect.signature(VQTokenizerConfig.__init__).parameters) - {"self", "kwargs"}
            for key in self.tiny:
                if key not in known:
                    raise ConfigError(
                        f"tiny.{key}: not a VQ tokenizer setting (known: {', '.join(sorted(known))})"
                    )
            check_vq_config(VQTokenizerConfig(**self.tiny), "tiny")


@dataclass
class VQData(ImageSourcesData):
    image_sizes: list[int] = field(default_factory=lambda: [32])  # each batch at one, drawn uniformly

    def validate(self) -> None:
        super().validate()
        if not self.image_sizes or min(self.image_sizes) < 8:
            raise ConfigError(f"image_sizes: one or more sides >= 8, got {self.image_sizes}")


@dataclass
class VQOptions:
    l1_weight: float = 1.0  # reconstruction terms on pixels in [-1, 1]
    l2_weight: float = 1.0
    eval_images: int = 256  # eval images reconstructed by `evaluate` (PSNR, code usage)

    def validate(self) -> None:
        if self.l1_weight < 0 or self.l2_weight < 0 or self.l1_weight + self.l2_weight == 0:
            raise ConfigError("l1_weight and l2_weight: >= 0, not both 0")


def load_vq(spec: VQSpec, init_dir: Path | None) -> VQImageTokenizer:
    if init_dir is not None or spec.path is not None:
        return VQImageTokenizer.from_pretrained(init_dir or resolve_model_folder(spec.path, "VQ tokenizer"))
    return VQImageTokenizer(VQTokenizerConfig(**(spec.tiny or {})))


class VQTokenizerTask(ImageSourcesTask):
    """Reconstruction (L1 + L2) + commitment; logs PSNR and the batch's code perplexity and dead codes."""

    model_config = VQSpec
    data_config = VQData
    options_config = VQOptions
    sample_kind = "image-text"
    loss_unit = "images"

    def __init__(self, stage, ctx, model_cfg: VQSpec, data_cfg: VQData, options: VQOptions):
        super().__init__(stage, ctx, model_cfg, data_cfg, options)
        self.vq = load_vq(model_cfg, ctx.resolve_init(stage.init_from))
        check_sizes(data_cfg.image_sizes, self.vq.config.downsample, "data.image_sizes")

    def collate(self, samples: list[dict]) -> dict[str, Tensor]:
        return {"images": fitted_uint8([s["image"] for s in samples], max(self.data_cfg.image_sizes))}

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        sizes = self.data_cfg.image_sizes
        size = sizes[int(torch.randint(len(sizes), ()))] if self.training else max(sizes)
        x = pixels_from_uint8(batch["images"])
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        reconstruction, codes, commit = self.vq(x)
        l1, mse = (reconstruction - x).abs().mean(), (reconstruction - x).pow(2).mean()
        loss = self.options.l1_weight * l1 + self.options.l2_weight * mse + commit
        perplexity, dead = code_usage(codes, self.vq.codebook_size)
        return {
            "loss": loss,
            "l1": l1.detach(),
            "commitment": commit.detach(),
            "psnr": 10 * torch.log10(4.0 / mse.detach().clamp(min=1e-10)),
            "code_perplexity": torch.tensor(perplexity, device=x.device),
            "dead_codes": torch.tensor(float(dead), device=x.device),
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Per image size: PSNR (uint8 round trip), code perplexity and unused codes over the eval images;
        originals above reconstructions in ``reconstructions_{size}.png``."""
        source = self.source("eval")
        n = min(len(source), self.options.eval_images)
        if n == 0:
            return {}
        device = next(self.vq.parameters()).device
        self.vq.eval()
        metrics: dict[str, float] = {}
        for size in sorted(set(self.data_cfg.image_sizes)):
            images = fitted_uint8([source.image(i) for i in range(n)], size)
            codes = torch.cat(
                [self.vq.encode(pixels_from_uint8(images[s : s + 128]).to(device)) for s in range(0, n, 128)]
            )
            out = torch.cat(
                [uint8_from_pixels(self.vq.decode(codes[s : s + 128])).cpu() for s in range(0, n, 128)]
            )
            mse = (out.float() - images.float()).pow(2).mean().item()
            perplexity, dead = code_usage(codes, self.vq.codebook_size)
            metrics.update(
                {
                    f"vq{size}_psnr": 10 * math.log10(255**2 / max(mse, 1e-10)),
                    f"vq{size}_code_perplexity": perplexity,
                    f"vq{size}_dead_codes": dead,
                    f"vq{size}_grid": codes.shape[-1],
                }
            )
            pairs = np.concatenate([images[:16].numpy(), out[:16].numpy()])
            save_grid(pairs, self.ctx.stage_dir / f"reconstructions_{size}.png", columns=16)
        metrics["vq_codebook_size"] = self.vq.codebook_size
        return metrics

    def save_pretrained(self, out_dir: Path) -> None:
        self.vq.save_pretrained(out_dir)
