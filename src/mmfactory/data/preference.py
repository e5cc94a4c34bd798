"""``preference`` samples as a source (``format: preference``, :mod:`mmfactory.data.sources`).

Items are pairs ``{"id", "prompt", "chosen", "rejected"}`` or unpaired KTO rows ``{"id", "prompt",
"completion", "label"}``; ``media(i)`` is the list of the sample's images (none or one, decoded on
access). :func:`preference_pairs` is what the pair losses (DPO, KTO-pair) read.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np

from mmfactory.config import ConfigError
from mmfactory.data.policy import BadSampleCounter
from mmfactory.data.readers.records import RecordDataset
from mmfactory.data.samples import Samples

PAIR_FIELDS = ("id", "prompt", "chosen", "rejected")
KTO_FIELDS = ("id", "prompt", "completion", "label")


def _record_images(dataset: RecordDataset, index: int) -> list[np.ndarray]:
    image = dataset[index]["image"]
    return [] if image is None else [image]


def read_preference_source(source, kind, bad: BadSampleCounter, counts: Counter) -> Samples:
    """Preference JSONL; images are checked to exist here and decoded when a sample is drawn."""
    from mmfactory.data.readers.preference import read_preference

    image_root = Path(source.image_root).expanduser() if source.image_root else None
    dataset = read_preference(
        source.path, on_bad_sample=source.on_bad_sample, counter=bad, check_media=False, image_root=image_root
    )
    items = [
        {key: r.fields[key] for key in (PAIR_FIELDS if "chosen" in r.fields else KTO_FIELDS)}
        for r in dataset.records
    ]
    return Samples(items, partial(_record_images, dataset))


def preference_pairs(samples: Samples, where: str, images: bool | None) -> list[dict]:
    """``[{"prompt", "chosen", "rejected", "image"}]`` of paired samples (``image``: uint8 ``[H, W, 3]`` or
    None). ``images``: True every pair must have an image, False none may, None either. Unpaired KTO rows
    are refused: the pair losses compare a chosen and a rejected reply to one prompt."""
    pairs = []
    for index, item in enumerate(samples.items):
        if "chosen" not in item:
            raise ConfigError(
                f"{where}: sample {item['id']!r} is an unpaired KTO row (completion, label); this task "
                "trains on pairs (chosen, rejected)"
            )
        media = samples.media(index)
        if images is not None and bool(media) != images:
            has = "has an image" if media else "has no image"
            raise ConfigError(
                f"{where}: sample {item['id']!r} {has}; this task reads {'image' if images else 'text'} pairs"
            )
        pairs.append({**item, "image": media[0] if media else None})
    return pairs
