"""The collection every source reader returns: light fields in memory, media loaded when a sample is drawn.

:class:`ImageConversations` (chat, image-chat) and :class:`~mmfactory.data.image_text.ImageCaptions`
(image-text) are the typed collections of their kinds; :class:`Samples` is the one of the others
(video-text, labelled-image, preference, article). All of them support ``len``, ``+`` (concatenation),
``select`` (indices, repeats allowed) and ``first``, which is what :func:`mix`
needs; the lazy accessors stay picklable (``functools.partial`` of module functions) for DataLoader
workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from mmfactory.config import ConfigError


def selected(get: Callable, indices: list[int], index: int):
    """Item ``index`` of a selection: ``get(indices[index])`` (picklable, for DataLoader workers)."""
    return get(indices[index])


def concatenated(first: Callable, second: Callable, split: int, index: int):
    """Item ``index`` of two collections joined at ``split`` (picklable)."""
    return first(index) if index < split else second(index - split)


def _no_media(index: int) -> None:
    return None


@dataclass
class Samples:
    """Sample ``i`` is ``items[i]`` (a dict of light fields: captions, label, prompt, ...) and
    ``media(i)`` (its heavy part, loaded on access: a video's frames or file, an image, a list of
    images; None where the kind has none). ``classes`` names the labels of a labelled-image collection.

    The fields per kind are documented at :mod:`mmfactory.data.sources`.
    """

    items: list[dict[str, Any]]
    media: Callable[[int], Any] = _no_media
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __add__(self, other: Samples) -> Samples:
        if self.classes != other.classes:
            raise ValueError(
                f"sources name different classes ({self.classes} and {other.classes}): labelled sources "
                "mixed in one stage must share their class names"
            )
        media = partial(concatenated, self.media, other.media, len(self))
        return Samples(self.items + other.items, media, self.classes)

    def select(self, indices: Sequence[int]) -> Samples:
        indices = list(indices)
        return Samples([self.items[i] for i in indices], partial(selected, self.media, indices), self.classes)

    def first(self, n: int) -> Samples:
        return self if n >= len(self) else self.select(range(n))

    def sample(self, index: int) -> dict[str, Any]:
        """``items[index]`` with its media under ``"media"``."""
        return {**self.items[index], "media": self.media(index)}


def mix(parts: list, weights: list[float | None], seed: int = 0):
    """One collection (:class:`ImageConversations`, :class:`~mmfactory.data.image_text.ImageCaptions`) from
    several of one kind, in source order.

    With no weight set it is their concatenation. With weights (all set) it holds ``N = sum of sizes``
    samples of which ``round(N * w_i / sum w)`` come from source ``i``: each source is walked in a seeded
    permutation, repeated when it is shorter than its share, so proportions are exact and the result is
    a plain map-style dataset (resumed exactly by the step sampler).
    """
    if all(w is None for w in weights):
        out = parts[0]
        for part in parts[1:]:
            out = out + part
        return out
    if any(w is None for w in weights):
        raise ConfigError("weight: set it on every source of the stage or on none")
    total = sum(len(p) for p in parts)
    shares = _shares(total, weights)
    picked = []
    for index, (part, share) in enumerate(zip(parts, shares, strict=True)):
        size = len(part)
        if share and not size:
            raise ConfigError(f"weight: source {index} has no samples to draw its share of {share} from")
        gen = torch.Generator().manual_seed(seed + index)
        reps = -(-share // size) if size else 0
        order = torch.cat([torch.randperm(size, generator=gen) for _ in range(reps)]) if reps else None
        picked.append(part.select(order[:share].tolist() if order is not None else []))
    return mix(picked, [None] * len(picked))


def _shares(total: int, weights: list[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainders), summing exactly to ``total``."""
    exact = [total * w / sum(weights) for w in weights]
    shares = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: shares[i] - exact[i])
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares
