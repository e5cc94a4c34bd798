"""Training-time image augmentation for classification and pixel pretraining (ARM's recipes).

The official ARM code uses torchvision / timm transforms: pretraining ``RandomResizedCrop(scale=(0.2, 1),
bicubic)`` + horizontal flip; fine-tuning timm's ImageNet transform (``RandomResizedCrop(scale=(0.08, 1))``,
flip, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing with probability 0.25). :class:`ImageAugment`
implements the crop, the flip and the erasing in torch on uint8 images (RandAugment is not implemented);
:class:`AugmentedImages` applies it per sample, drawing from torch's global RNG so a resumed run replays
the same augmentations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mmfactory.config import ConfigError


@dataclass
class ImageAugment:
    """``crop_scale``: RandomResizedCrop's range of the crop's area as a fraction of the image (null: no
    crop), ``crop_ratio`` its aspect-ratio range; ``flip``: a horizontal flip with probability 0.5;
    ``erase_prob``: probability of one random-erasing rectangle (area 2-33 %, aspect 0.3-3.3, filled with
    uniform per-pixel noise; timm draws normal noise in the normalised space)."""

    crop_scale: list[float] | None = None
    crop_ratio: list[float] | None = None  # None: [3/4, 4/3]
    flip: bool = False
    erase_prob: float = 0.0

    def validate(self) -> None:
        if self.crop_scale is not None and not (
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1
        ):
            raise ConfigError(
                f"crop_scale: needs [low, high] with 0 < low <= high <= 1, got {self.crop_scale}"
            )
        if self.crop_ratio is not None and not (
            len(self.crop_ratio) == 2 and 0 < self.crop_ratio[0] <= self.crop_ratio[1]
        ):
            raise ConfigError(f"crop_ratio: needs [low, high] with 0 < low <= high, got {self.crop_ratio}")
        if not 0.0 <= self.erase_prob <= 1.0:
            raise ConfigError(f"erase_prob: must be in [0, 1], got {self.erase_prob}")

    @property
    def active(self) -> bool:
        return self.crop_scale is not None or self.flip or self.erase_prob > 0


def random_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    fallback: bool = True,
) -> tuple[int, int, int, int] | None:
    """``(top, left, h, w)`` of a box with area ``U(scale) * H * W`` and log-uniform aspect ratio in ``ratio``
    (torchvision's RandomResizedCrop sampling: 10 tries, then the central crop clamped to ``ratio``, or
    None without ``fallback``, as timm's random erasing gives up)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(height - h + 1, (), generator=generator))
            left = int(torch.randint(width - w + 1, (), generator=generator))
            return top, left, h, w
    if not fallback:
        return None
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_image(image: np.ndarray, aug: ImageAugment, generator: torch.Generator) -> np.ndarray:
    """uint8 ``[H, W, C]`` -> the same shape: crop and resize back (bicubic, antialiased), flip, erase."""
    x = torch.from_numpy(np.ascontiguousarray(image))
    h, w, _ = x.shape
    if aug.crop_scale is not None:
        ratio = tuple(aug.crop_ratio or (3 / 4, 4 / 3))
        top, left, ch, cw = random_box(h, w, tuple(aug.crop_scale), ratio, generator)
        crop = x[top : top + ch, left : left + cw].permute(2, 0, 1)[None].float()
        resized = F.interpolate(crop, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        x = resized[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)
    if aug.flip and float(torch.rand((), generator=generator)) < 0.5:
        x = x.flip(1)
    box = None
    if aug.erase_prob > 0 and float(torch.rand((), generator=generator)) < aug.erase_prob:
        box = random_box(h, w, (0.02, 1 / 3), (0.3, 1 / 0.3), generator, fallback=False)
    if box is not None:
        top, left, eh, ew = box
        x = x.clone()
        noise = torch.randint(0, 256, (eh, ew, x.shape[2]), generator=generator, dtype=torch.uint8)
        x[top : top + eh, left : left + ew] = noise
    return x.numpy()


class AugmentedImages(Dataset):
    """``dataset`` (items ``{"image": uint8 [H, W, C], ...}``) with ``aug`` applied to every image drawn."""

    def __init__(self, dataset: Dataset, aug: ImageAugment):
        self.dataset, self.aug = dataset, aug

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        item["image"] = augment_image(item["image"], self.aug, generator)
        return item
