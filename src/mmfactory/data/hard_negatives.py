"""World hard negatives for ``image-text`` training batches, in the manner of NegCLIP.

:func:`with_shape_twins` replaces part of a batch of world scenes with their shape twins
(:func:`~mmfactory.data.world_source.world_shape_twin`): scenes that differ from an original only in the
shapes of their objects, each captioned like it, so a contrastive loss can tell the two apart by shape only.
"""

from __future__ import annotations

import numpy as np
import torch

from mmfactory.data.source_config import SourceConfig
from mmfactory.data.world_source import world_shape_twin


def with_shape_twins(samples: list[dict], fraction: float, source: SourceConfig) -> list[dict]:
    """``samples`` (training items of the world ``source``, with ``scene`` and ``caption_index``) with its
    last ``floor(fraction * B) // 2`` samples replaced by the shape twins of its first as many (each
    captioned like its original: same language and detail level); the twins' shapes come from torch's RNG,
    so a step's batch is fixed by the seed and the step."""
    pairs = int(fraction * len(samples)) // 2
    twins = [
        world_shape_twin(
            sample["scene"],
            np.random.default_rng(int(torch.randint(2**62, ()))),
            source.world_languages,
            source.details,
            sample["caption_index"],
            source.image_size,
        )
        for sample in samples[:pairs]
    ]
    return samples[: len(samples) - pairs] + twins
