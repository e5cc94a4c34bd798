"""``image-text`` samples: images with one or more captions (CLIP-style contrastive data, reward models).

:class:`ImageCaptions` is what every ``image-text`` source yields (see :mod:`mmfactory.data.sources`):
``format: world`` (``kind: scenes``), ``pairs`` (JSONL ``{"id", "image", "text"}``) and ``webdataset`` (tar
shards of ``{key}.png`` + ``{key}.txt``; ``path`` may be a glob). File records that share an image file
are one image with several captions; images are decoded when a sample is drawn.

:class:`ImageCaptionDataset` serves an :class:`ImageCaptions` one image and caption per item (training
draws the caption, evaluation takes the first); :func:`_stream_item` does the same for a streamed sample.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mmfactory.config import ConfigError
from mmfactory.data.policy import BadSampleCounter
from mmfactory.data.samples import concatenated, selected
from mmfactory.data.streaming import expand_shards


@dataclass
class ImageCaptions:
    """Image ``i`` is ``image(i)`` (uint8 ``[H, W, 3]``, decoded on access; the callable is picklable for
    DataLoader workers) and has the non-empty list ``captions[i]``; world sources also keep its ``Scene``."""

    captions: list[list[str]]
    image: Callable[[int], np.ndarray]
    scenes: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.captions)

    def __add__(self, other: ImageCaptions) -> ImageCaptions:
        scenes = None if self.scenes is None or other.scenes is None else self.scenes + other.scenes
        image = partial(concatenated, self.image, other.image, len(self))
        return ImageCaptions(self.captions + other.captions, image, scenes)

    def select(self, indices: Sequence[int]) -> ImageCaptions:
        """The images at ``indices`` (in that order; repeats allowed)."""
        indices = list(indices)
        scenes = None if self.scenes is None else [self.scenes[i] for i in indices]
        return ImageCaptions(
            [self.captions[i] for i in indices], partial(selected, self.image, indices), scenes
        )

    def first(self, n: int) -> ImageCaptions:
        return self if n >= len(self) else self.select(range(n))

    @classmethod
    def empty(cls) -> ImageCaptions:
        return cls([], partial(operator.getitem, []))


class ImageCaptionDataset(Dataset):
    """Item ``i``: ``{"image": uint8 [H, W, 3], "caption": str}`` of image ``indices[i]``. Training draws
    the caption from torch's RNG (so resumed runs replay it); evaluation takes the first. Training items of
    a world source also carry ``scene`` and ``caption_index`` (which of ``world_captions`` the caption is)."""

    def __init__(self, source: ImageCaptions, train: bool, indices: Sequence[int] | None = None):
        self.source, self.train = source, train
        self.indices = range(len(source)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        image = self.indices[index]
        captions = self.source.captions[image]
        chosen = int(torch.randint(len(captions), ())) if self.train else 0
        item = {"image": self.source.image(image), "caption": captions[chosen]}
        if self.train and self.source.scenes is not None:
            item.update(scene=self.source.scenes[image], caption_index=chosen)
        return item


def _stream_item(sample: dict, rng: np.random.Generator) -> dict:
    """A training item of a streamed sample: its image and one of its captions drawn with ``rng``."""
    captions = sample["captions"]
    return {"image": sample["image"], "caption": captions[int(rng.integers(len(captions)))]}


def _record_image(dataset: Dataset, record_of_image: list[int], index: int) -> np.ndarray:
    return dataset[record_of_image[index]]["image"]


def _grouped_by_image(dataset) -> ImageCaptions:
    records_of_image: dict[Any, list[int]] = {}
    for index, record in enumerate(dataset.records):
        records_of_image.setdefault(record.fields["image"], []).append(index)
    groups = list(records_of_image.values())
    captions = [[dataset.records[i].fields["text"] for i in group] for group in groups]
    return ImageCaptions(captions, partial(_record_image, dataset, [group[0] for group in groups]))


def read_pairs_source(source, kind, bad: BadSampleCounter, counts: Counter) -> ImageCaptions:
    from mmfactory.data.readers import read_pairs

    return _grouped_by_image(read_pairs(source.path, on_bad_sample=source.on_bad_sample, counter=bad))


def read_webdataset_source(source, kind, bad: BadSampleCounter, counts: Counter) -> ImageCaptions:
    from mmfactory.data.readers import read_webdataset

    shards = expand_shards(source.path)
    compressed = [s for s in shards if not s.endswith(".tar")]
    if compressed:
        raise ConfigError(
            f"{compressed[0]}: read up front, shards are indexed by byte offset and must be uncompressed "
            "'.tar'; stream compressed ones (streaming: true)"
        )
    return _grouped_by_image(read_webdataset(shards, on_bad_sample=source.on_bad_sample, counter=bad))
